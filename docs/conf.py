"""Sphinx configuration of the f3eo-jax documentation.

Build (warnings are errors, as in CI):

  sphinx-build -W --keep-going -b html docs docs/_build/html

The API reference is generated from the docstrings of the working tree (not of an installed
copy). The notebooks are rendered from their committed outputs; nothing is executed.
"""

from __future__ import annotations

import ast
import filecmp
import functools
import importlib
import inspect
import os
import re
import shutil
import sys
import urllib.request
from pathlib import Path

from sphinx.util import logging
from sphinx.util.docutils import SphinxDirective

LOGGER = logging.getLogger('f3eo_jax.docs')
DOCS = Path(__file__).resolve().parent
ROOT = DOCS.parent
sys.path.insert(0, str(ROOT))

import f3eo_jax  # noqa: E402  (after the path is set)

# -- Project ----------------------------------------------------------------------------------

project = 'f3eo-jax'
author = 'f3eo-jax developers'
copyright = 'f3eo-jax developers'  # noqa: A001
release = f3eo_jax.__version__
version = '.'.join(release.split('.')[:2])

# -- General ----------------------------------------------------------------------------------

extensions = [
  'myst_nb',  # Markdown (MyST) pages and the notebooks
  'sphinx.ext.autodoc',
  'sphinx.ext.autosummary',  # the summary tables at the top of the API page
  'sphinx.ext.napoleon',
  'sphinx.ext.intersphinx',
  'sphinx.ext.mathjax',
  'sphinx.ext.viewcode',
]
exclude_patterns = ['_build', 'Thumbs.db', '.DS_Store', '**.ipynb_checkpoints']
source_suffix = {'.rst': 'restructuredtext', '.md': 'myst-nb', '.ipynb': 'myst-nb'}
root_doc = 'index'
default_role = 'code'
suppress_warnings: list[str] = []

# -- Autodoc and napoleon (Google style) ------------------------------------------------------

autodoc_member_order = 'bysource'
autodoc_typehints = 'description'
autodoc_typehints_description_target = 'documented_params'
autodoc_preserve_defaults = True
# Keep the library's type aliases by name in signatures rather than expanding them.
autodoc_type_aliases = {
  name: name
  for name in (
    *('PyTree', 'ObjFn', 'HvpFn', 'MaskOrFn', 'Projection', 'ScalarLike', 'AxisName'),
    *('optax.ScalarOrSchedule', 'optax.Updates', 'optax.Params'),
  )
}
napoleon_google_docstring = True
napoleon_numpy_docstring = False
napoleon_use_rtype = False
napoleon_custom_sections = [('References', 'notes_style')]

# -- MyST and notebooks -----------------------------------------------------------------------

myst_enable_extensions = ['dollarmath', 'amsmath', 'colon_fence', 'deflist']
myst_heading_anchors = 3
nb_execution_mode = 'off'  # render the committed outputs; CI runs the notebooks as tests
nb_merge_streams = True

# -- Theme ------------------------------------------------------------------------------------

html_theme = 'furo'
html_title = f'f3eo-jax {release}'
html_static_path = ['_static']
html_css_files = ['custom.css']  # code and equations within the page's width

# -- Intersphinx ------------------------------------------------------------------------------

_INTERSPHINX = {
  'python': 'https://docs.python.org/3/',
  'numpy': 'https://numpy.org/doc/stable/',
  'jax': 'https://docs.jax.dev/en/latest/',
  'optax': 'https://optax.readthedocs.io/en/latest/',
  'flax': 'https://flax.readthedocs.io/en/latest/',
}


def _reachable(url: str) -> bool:
  try:
    with urllib.request.urlopen(url + 'objects.inv', timeout=5) as response:
      return response.status == 200
  except OSError:
    return False


# Without network (CI has only the package index), an inventory that cannot be fetched would
# be a warning, hence a failed build; such projects are left out and links to them are plain
# text. F3EO_DOCS_INTERSPHINX=require keeps every project, so an unreachable one fails the
# build (for a published build).
if os.environ.get('F3EO_DOCS_INTERSPHINX') == 'require':
  _available = dict(_INTERSPHINX)
else:
  _available = {name: url for name, url in _INTERSPHINX.items() if _reachable(url)}
  _missing = sorted(set(_INTERSPHINX) - set(_available))
  if _missing:
    print(
      f'intersphinx: no inventory reachable for {", ".join(_missing)}; links to them '
      'are plain text in this build.'
    )
intersphinx_mapping = {name: (url, None) for name, url in _available.items()}
intersphinx_timeout = 10

# -- The notebooks: copied from ../notebooks, rendered from their committed outputs -----------


def _copy_notebooks() -> None:
  target = DOCS / 'notebooks'
  target.mkdir(exist_ok=True)
  sources = sorted((ROOT / 'notebooks').glob('*.ipynb'))
  for source in sources:
    copy = target / source.name
    if not copy.exists() or not filecmp.cmp(source, copy, shallow=False):
      shutil.copyfile(source, copy)  # only when changed, so incremental builds stay cheap
  for stale in set(target.glob('*.ipynb')) - {target / s.name for s in sources}:
    stale.unlink()


_copy_notebooks()

# -- Checks that make the build fail (with -W) ------------------------------------------------

_FORBIDDEN = re.compile(r'SPEC\.md|STYLE\.md|\.\./shared|\bshared/')


@functools.cache
def _public_names() -> dict[str, str]:
  """Fully qualified public name -> the module it is documented under."""
  import f3eo_jax.flax as f3eo_flax

  names = {f'f3eo_jax.{n}': 'f3eo_jax' for n in f3eo_jax.__all__}

  def defined_here(name: str, value: object) -> bool:
    return not name.startswith('_') and getattr(value, '__module__', '') == f3eo_flax.__name__

  flax_all = getattr(f3eo_flax, '__all__', None) or [
    n for n, v in vars(f3eo_flax).items() if callable(v) and defined_here(n, v)
  ]
  names.update({f'f3eo_jax.flax.{n}': 'f3eo_jax.flax' for n in flax_all})
  return names


# Comments addressed to tools, not readers (type checkers, linters, coverage, formatters).
_TOOL_COMMENT = re.compile(r'^(type:|noqa\b|pyright:|pragma\b|fmt:)')


def _field_comment(cls: type, field: str) -> str | None:
  """The trailing comment of a NamedTuple field in the source: `step: jax.Array  # text`.

  Comments for tools (`# type: ignore[assignment]  # text`) are skipped: the text is the first
  comment after them.
  """
  try:
    source = inspect.getsource(cls)
  except (OSError, TypeError):
    return None
  match = re.search(rf'^\s+{re.escape(field)}\s*:[^#\n]*#(.+)$', source, re.MULTILINE)
  if not match:
    return None
  comments = [part.strip().removeprefix(':').strip() for part in match.group(1).split('  #')]
  readable = [part for part in comments if part and not _TOOL_COMMENT.match(part)]
  return readable[0] if readable else None


def _module_attribute_doc(name: str) -> list[str] | None:
  """The doc-string after `NAME = value` in the f3eo_jax module that defines a re-exported NAME."""
  from sphinx.pycode import ModuleAnalyzer

  short = name.rsplit('.', 1)[-1]
  for module in _library_modules():
    try:
      docs = ModuleAnalyzer.for_module(module).find_attr_docs()
    except Exception:  # noqa: BLE001  (a module whose source cannot be analysed)
      continue
    if ('', short) in docs:
      return list(docs[('', short)])
  return None


@functools.cache
def _library_modules() -> tuple[str, ...]:
  """The modules of the f3eo_jax package, the package first."""
  import pkgutil

  names = [m.name for m in pkgutil.iter_modules(f3eo_jax.__path__, prefix='f3eo_jax.')]
  return ('f3eo_jax', *sorted(names))


def _fill_docstring(app, what, name, obj, options, lines):
  """Documents NamedTuple fields from their source comments, and re-exported constants."""
  del app, options
  if what in ('attribute', 'property') and lines and lines[0].startswith('Alias for field number'):
    owner_name, field = name.rsplit('.', 1)
    owner = _resolve(owner_name)
    comment = _field_comment(owner, field) if owner is not None else None
    lines[:] = [comment] if comment else []
  elif what == 'data' and obj.__doc__ and lines and lines[0] == obj.__doc__.splitlines()[0]:
    doc = _module_attribute_doc(name)
    if doc is not None:
      lines[:] = doc


def _resolve(dotted: str):
  """The object of a dotted name, or None."""
  parts = dotted.split('.')
  for i in range(len(parts), 0, -1):
    try:
      obj = importlib.import_module('.'.join(parts[:i]))
    except ImportError:
      continue
    try:
      for part in parts[i:]:
        obj = getattr(obj, part)
    except AttributeError:
      return None
    return obj
  return None


def _check_docstring(app, what, name, obj, options, lines):
  """The docs explain the project in its own words: no pointers to files outside the repo."""
  del what, obj, options
  for line in lines:
    if _FORBIDDEN.search(line):
      LOGGER.warning('the docstring of %s points outside the repository: %r', name, line.strip())


def _check_source(app, docname, source):
  """The same rule for the pages and the notebooks."""
  del app
  match = _FORBIDDEN.search(source[0])
  if match:
    LOGGER.warning(
      '%s points outside the repository: %r', docname, match.group(0), location=docname
    )


def _resolve_private_module_paths(app, env, node, contnode):
  """`f3eo_jax.transform.MetaGradientState` (from a signature) -> `f3eo_jax.MetaGradientState`.

  The API is documented under the names users import; annotations name the defining module.
  A reference to an f3eo_jax name that resolves nowhere is a warning (an error with -W).
  """
  if node.get('refdomain') != 'py':
    return None
  target = node.get('reftarget', '')
  module = node.get('py:module') or ''
  candidates = [target]
  if module and not target.startswith('f3eo_jax'):
    candidates.insert(0, f'{module}.{target}')
  public = _public_names()
  domain = env.get_domain('py')
  for candidate in candidates:
    if not candidate.startswith('f3eo_jax.'):
      continue
    short = candidate.rsplit('.', 1)[-1]
    for alias in (f'f3eo_jax.{short}', f'f3eo_jax.flax.{short}'):
      if alias in public and alias != candidate:
        new = node.deepcopy()
        new['reftarget'] = alias
        resolved = domain.resolve_xref(
          env, node['refdoc'], app.builder, node['reftype'], alias, new, contnode
        )
        if resolved is not None:
          return resolved
  looks_internal = target.startswith('f3eo_jax') or any(
    target == name.rsplit('.', 1)[-1] for name in public
  )
  # A private name (`f3eo_jax._types.PyTree`, `f3eo_jax.product._stored`) from a signature is
  # left as plain text; any other f3eo_jax name must resolve.
  private = any(part.startswith('_') for part in target.split('.'))
  if looks_internal and not private:
    LOGGER.warning('unresolved reference to %r (%s)', target, node['reftype'], location=node)
  return None


def _check_api_coverage(app, env):
  """Every public name is in the API reference."""
  documented = set(env.get_domain('py').objects)
  for name in sorted(_public_names()):
    if name not in documented:
      LOGGER.warning('public name %s is not in the API reference', name)


def _show_aliases_by_name() -> None:
  """`ScalarLike | None` rather than `TypeAliasForwardRef('ScalarLike') | None` in the API."""
  from sphinx.util import inspect as sphinx_inspect

  alias = getattr(sphinx_inspect, 'TypeAliasForwardRef', None)
  if alias is not None:
    alias.__repr__ = lambda self: self.name


# Napoleon reads the first line of an attribute's or a constant's docstring as `type: text`
# (Google style's inline attribute type), so "A JAX pytree: nested dicts, ..." would render as
# the type "A JAX pytree". The library's attribute docstrings are prose: keep them as written.
_PROSE_DOCSTRINGS: dict[str, list[str]] = {}


def _keep_prose_before_napoleon(app, what, name, obj, options, lines):
  del app, obj, options
  if what in ('data', 'attribute') and name.startswith('f3eo_jax.'):
    _PROSE_DOCSTRINGS[name] = list(lines)


def _keep_prose_after_napoleon(app, what, name, obj, options, lines):
  del app, what, obj, options
  original = _PROSE_DOCSTRINGS.pop(name, None)
  if original is not None:
    lines[:] = original


class TypeAliases(SphinxDirective):
  """`.. f3eo-type-aliases::`: each alias of f3eo_jax/_types.py, its docstring and its definition.

  autodoc shows some aliases as `: TypeAlias` and expands the others ("alias of Array | ndarray |
  bool | number | bool | ..." for `jax.typing.ArrayLike`); this shows each one as written.
  """

  def run(self):
    path = ROOT / 'f3eo_jax' / '_types.py'
    self.env.note_dependency(str(path))
    source = path.read_text(encoding='utf-8')
    body = ast.parse(source).body
    lines: list[str] = []
    for node, after in zip(body, [*body[1:], None]):
      if not (
        isinstance(node, ast.AnnAssign)
        and isinstance(node.target, ast.Name)
        and ast.unparse(node.annotation) == 'TypeAlias'
        and node.value is not None
      ):
        continue
      doc = ''
      if isinstance(after, ast.Expr) and isinstance(after.value, ast.Constant):
        doc = inspect.cleandoc(str(after.value.value))
      if _FORBIDDEN.search(doc):
        LOGGER.warning('the docstring of %s points outside the repository', node.target.id)
      definition = ast.get_source_segment(source, node.value)
      lines += [f'.. py:data:: {node.target.id}', '   :module: f3eo_jax._types', '']
      lines += [f'   {line}' if line else '' for line in doc.splitlines()]
      lines += ['', f'   Defined as ``{definition}``.', '']
    return self.parse_text_to_nodes('\n'.join(lines))


def setup(app):
  app.add_directive('f3eo-type-aliases', TypeAliases)
  _show_aliases_by_name()
  app.connect('autodoc-process-docstring', _keep_prose_before_napoleon, priority=400)
  app.connect('autodoc-process-docstring', _keep_prose_after_napoleon, priority=600)
  app.connect('autodoc-process-docstring', _fill_docstring, priority=650)  # after the restore
  app.connect('autodoc-process-docstring', _check_docstring)
  app.connect('source-read', _check_source)
  app.connect('missing-reference', _resolve_private_module_paths)
  app.connect('env-check-consistency', _check_api_coverage)
  return {'parallel_read_safe': True, 'parallel_write_safe': True}
