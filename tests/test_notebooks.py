"""The notebooks in ``notebooks/`` run top to bottom and are committed with their outputs.

Each notebook is executed with ``nbclient`` in a ``python3`` kernel started from this
interpreter (``jupyter_client`` replaces the kernel spec's ``python`` with
``sys.executable``; the test checks it through the kernel's ``sys.prefix``). Any
cell that raises fails the test with the cell's traceback; no cell may carry the
``raises-exception`` tag that would let an error pass. The executed copy stays in
memory: the committed files are not rewritten.
"""

from __future__ import annotations

import os
import pathlib
import sys

import nbclient
import nbclient.exceptions
import nbformat
import pytest

NOTEBOOKS_DIR = pathlib.Path(__file__).resolve().parents[1] / 'notebooks'
EXPECTED = ('f3eo_tour.ipynb', 'f3eo_mnist1d.ipynb', 'f3eo_flax_nnx.ipynb')
MAX_BYTES = 1_000_000  # committed with outputs, but small enough to review and render
EXECUTION_TIMEOUT_S = 600  # per cell; each notebook aims at under two minutes on 2 CPU cores
_PREFIX_MARK = 'KERNEL_PREFIX='


def _notebooks():
  return sorted(NOTEBOOKS_DIR.glob('*.ipynb'))


def _code_cells(nb):
  return [cell for cell in nb.cells if cell.cell_type == 'code']


def _error_outputs(nb):
  return [
    (i, out.get('ename'), out.get('evalue'))
    for i, cell in enumerate(nb.cells)
    if cell.cell_type == 'code'
    for out in cell.get('outputs', [])
    if out.output_type == 'error'
  ]


def test_the_three_notebooks_exist():
  names = {path.name for path in _notebooks()}
  assert set(EXPECTED) <= names, f'missing from notebooks/: {sorted(set(EXPECTED) - names)}'


@pytest.mark.parametrize('path', _notebooks(), ids=lambda p: p.name)
def test_notebook_is_committed_with_outputs(path):
  assert path.stat().st_size < MAX_BYTES, f'{path.name} is {path.stat().st_size} bytes'
  nb = nbformat.read(path, as_version=4)
  nbformat.validate(nb)
  assert nb.metadata.get('kernelspec', {}).get('name') == 'python3'
  cells = _code_cells(nb)
  assert cells, f'{path.name} has no code cells'
  counts = [cell.execution_count for cell in cells]
  assert counts == list(range(1, len(cells) + 1)), (
    f'{path.name} was not saved from one top-to-bottom run: execution counts {counts}'
  )
  assert not _error_outputs(nb), f'{path.name} was saved with errors: {_error_outputs(nb)}'
  images = [out for cell in cells for out in cell.outputs if 'image/png' in out.get('data', {})]
  assert images, f'{path.name} has no plots in its saved outputs'


@pytest.mark.slow
@pytest.mark.parametrize('path', _notebooks(), ids=lambda p: p.name)
def test_notebook_runs_top_to_bottom(path):
  nb = nbformat.read(path, as_version=4)
  tagged = [i for i, c in enumerate(nb.cells) if 'raises-exception' in c.metadata.get('tags', [])]
  assert not tagged, f'cells {tagged} of {path.name} are allowed to fail; catch the error instead'
  nb.cells.insert(0, nbformat.v4.new_code_cell(f'import sys\nprint({_PREFIX_MARK!r} + sys.prefix)'))
  client = nbclient.NotebookClient(
    nb,
    timeout=EXECUTION_TIMEOUT_S,
    kernel_name='python3',
    allow_errors=False,
    record_timing=False,
    resources={'metadata': {'path': str(NOTEBOOKS_DIR)}},
  )
  env = dict(
    os.environ, JAX_PLATFORMS='cpu', MPLBACKEND='module://matplotlib_inline.backend_inline'
  )
  try:
    client.execute(env=env)
  except nbclient.exceptions.CellExecutionError as e:
    pytest.fail(f'{path.name}: a cell raised {e.ename}:\n{e}', pytrace=False)

  kernel_prefix = ''.join(out.get('text', '') for out in nb.cells[0].outputs).strip()
  assert kernel_prefix == _PREFIX_MARK + sys.prefix, (
    f'the kernel ran another interpreter: {kernel_prefix!r}, expected {sys.prefix!r}'
  )
  assert not _error_outputs(nb)
  assert all(cell.execution_count is not None for cell in _code_cells(nb)), 'some cells did not run'
