"""The ``Example:`` sections of the library's docstrings run and print what they show."""

from __future__ import annotations

import doctest
import importlib
import pkgutil

import pytest

import f3eo_jax

# Every public module of the library, so that an example added anywhere runs.
MODULES = sorted(
  {'f3eo_jax'}
  | {
    f'f3eo_jax.{m.name}'
    for m in pkgutil.iter_modules(f3eo_jax.__path__)
    if not m.name.startswith('_')
  }
)
# The modules that define the public functions and classes: each carries an example.
MUST_HAVE_EXAMPLES = {
  f'f3eo_jax.{name}'
  for name in ('alias', 'amortize', 'amsgrad', 'flax', 'hvp', 'state', 'transform')
}


@pytest.mark.parametrize('module_name', MODULES)
def test_docstring_examples_pass(module_name):
  module = importlib.import_module(module_name)

  result = doctest.testmod(
    module, optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE, verbose=False
  )

  assert result.failed == 0, f'{result.failed} docstring example(s) failed in {module_name}'
  if module_name in MUST_HAVE_EXAMPLES:
    assert result.attempted > 0, f'{module_name} has no docstring examples'
