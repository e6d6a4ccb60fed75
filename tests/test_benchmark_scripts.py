"""Smoke runs of ``benchmarks/step_time.py`` and ``benchmarks/data_parallel.py``, and the
benchmarks' docstring examples.

Each entry point runs its real code path at tiny sizes in a subprocess with a kill timeout,
XLA:CPU's expensive passes off (same HLO, same math, less compile time); the tests read the
JSON it wrote. ``data_parallel`` needs 8 simulated devices, set before JAX starts.
"""

from __future__ import annotations

import doctest
import importlib
import json
import math
import os
import pathlib
import subprocess
import sys

import pytest

from benchmarks import xla_utils

pytestmark = pytest.mark.slow
REPO = pathlib.Path(__file__).resolve().parents[1]


@pytest.mark.parametrize(
  'name', ['config', 'data', 'harness', 'report', 'steps', 'tasks', 'xla_utils', 'torch_f3eo']
)
def test_docstring_examples(name):
  if name == 'torch_f3eo':
    pytest.importorskip('torch', reason='benchmarks.torch_f3eo needs torch (the test extra)')
  module = importlib.import_module(f'benchmarks.{name}')
  result = doctest.testmod(module, optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE)
  assert result.attempted > 0 and result.failed == 0, result


def run_benchmark(module: str, *args: str, devices: int, timeout: int = 300) -> None:
  env = {k: v for k, v in os.environ.items() if k != 'XLA_FLAGS'}
  env.update(XLA_FLAGS=xla_utils.host_device_flags(devices, fast_compile=True), JAX_PLATFORMS='cpu')
  cmd = [sys.executable, '-m', module, *args]
  result = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)
  assert result.returncode == 0, f'{module}:\n{result.stdout[-3000:]}\n{result.stderr[-6000:]}'


def _positive(x) -> bool:
  return x is not None and math.isfinite(x) and x > 0


def test_step_time_smoke_preset_measures_every_row(tmp_path):
  pytest.importorskip('torch', reason='the PyTorch rows of step_time need torch (the test extra)')
  from benchmarks import step_time

  run_benchmark('benchmarks.step_time', '--preset', 'smoke', '--out', str(tmp_path), devices=1)
  results = json.loads((tmp_path / 'step_time_smoke.json').read_text())
  rows = {(r['model'], r['dtype'], r['row']): r for r in results['rows']}
  preset = step_time.PRESETS['smoke']
  assert set(rows) == {(m, d, r) for m, d, _, names in preset['runs'] for r in names}
  assert {m for m, *_ in preset['runs']} == {'mlp', 'cnn', 'gpt', 'resnet18'}
  for key, r in rows.items():
    assert r['skipped'] is None and _positive(r['ms/step']) and _positive(r['× AdamW']), key
    assert _positive(r['peak MiB']) or key[2].startswith('torch'), key
  for m, dtype in (('mlp', 'float32'), ('mlp', 'bfloat16')):
    flops = {r: rows[(m, dtype, r)]['GFLOP/step'] for r in ('adamw', 'f3eo', 'f3eo_hvp10_python')}
    assert flops['f3eo'] > 1.5 * flops['adamw']  # H·g is a second pass through the model
    assert flops['adamw'] < flops['f3eo_hvp10_python'] < flops['f3eo']
    assert rows[(m, dtype, 'f3eo')]['peak MiB'] > rows[(m, dtype, 'adamw')]['peak MiB']
  assert rows[('mlp', 'float32', 'f3eo_hvp10')]['GFLOP/step'] is None  # lax.cond: both branches
  assert (
    rows[('mlp', 'bfloat16', 'f3eo')]['peak MiB'] < rows[('mlp', 'float32', 'f3eo')]['peak MiB']
  )
  assert len({(r['task'], r['optimizer']) for r in results['training']}) == 4
  assert results['machine']['versions']['torch'] and results['machine']['devices']


def test_data_parallel_layouts_match_one_device_and_count_collectives(tmp_path):
  from benchmarks import data_parallel as dp

  args = ('--quick', '--hidden', '32', '32', '--batch', '64', '--out', str(tmp_path))
  run_benchmark('benchmarks.data_parallel', *args, devices=8)
  results = json.loads((tmp_path / 'data_parallel.json').read_text())
  rows = results['equivalence']
  assert [(r['layout'], r['optimizer']) for r in rows] == list(dp.EQUIVALENCE)
  for r in rows:
    assert r[f'Δθ after {dp.EARLY_STEPS} steps'] <= 1e-5, r  # float32 summation order only
    assert math.isfinite(r['final train loss']) and 0 <= r['test accuracy'] <= 1
  timed = {(r['layout'], r['optimizer']): r for r in results['timing']}
  assert list(timed) == list(dp.TIMED)
  reduced = lambda key, where='always': (
    timed[key].get(f'all-reduce ({where}): elements / params') or 0
  )
  assert reduced(('1 device', 'f3eo')) == 0
  for layout in ('jit', 'shard_map (vma)', 'shard_map (local)'):
    assert 1 <= reduced((layout, 'adamw')) < 1.01, layout  # g (and the scalar loss)
  for layout in ('shard_map (vma)', 'shard_map (local)'):
    assert 2 <= reduced((layout, 'f3eo')) < 2.01, layout  # g and H·g
  assert reduced(('jit', 'f3eo_hvp10'), 'in_cond') > 0
