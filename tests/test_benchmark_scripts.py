"""Smoke tests of ``benchmarks/step_time.py`` and ``benchmarks/data_parallel.py``.

Each entry point runs its real code path at tiny sizes (``--quick``: tiny batches, one or
two rounds) in a subprocess with a kill timeout, with XLA:CPU's expensive passes turned
off to cut compile time (same HLO, same math), and the tests read the ``.json`` and
``.md`` it wrote. ``data_parallel`` needs 8 simulated devices, which must be set before
JAX starts, hence the subprocess. The report prose of ``data_parallel`` is also checked
in-process on made-up numbers, including numbers for which a check fails.
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

import numpy as np
import pytest

from benchmarks import xla_utils

pytestmark = pytest.mark.slow

REPO = pathlib.Path(__file__).resolve().parents[1]
STEP_TIME_VARIANTS = (
  'adamw',
  'f3eo',
  'f3eo_every10_linearize',
  'f3eo_every10_python',
  'adamw_one_pass',
  'torch_adamw',
  'torch_f3eo',
)
JAX_ROWS = STEP_TIME_VARIANTS[:5]


@pytest.mark.parametrize('name', ['xla_utils', 'timing', 'outputs', 'torch_f3eo'])
def test_helper_docstring_examples(name):
  if name == 'torch_f3eo':
    pytest.importorskip('torch', reason='benchmarks.torch_f3eo needs torch (the test extra)')
  module = importlib.import_module(f'benchmarks.{name}')
  result = doctest.testmod(module, optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE)
  assert result.attempted > 0 and result.failed == 0, result


def run_benchmark(module: str, *args: str, devices: int, timeout: int) -> None:
  """``python -m module args`` from the repository root, killed after ``timeout`` s."""
  env = {k: v for k, v in os.environ.items() if k != 'XLA_FLAGS'}
  env['XLA_FLAGS'] = xla_utils.host_device_flags(devices, fast_compile=True)
  env['JAX_PLATFORMS'] = 'cpu'
  result = subprocess.run(
    [sys.executable, '-m', module, *args],
    cwd=REPO,
    env=env,
    capture_output=True,
    text=True,
    timeout=timeout,
  )
  assert result.returncode == 0, (
    f'{module} failed:\n{result.stdout[-3000:]}\n{result.stderr[-6000:]}'
  )


def _positive(x) -> bool:
  return x is not None and math.isfinite(x) and x > 0


@pytest.fixture(scope='module')
def step_time_out(tmp_path_factory):
  pytest.importorskip('torch', reason='the PyTorch rows of step_time need torch (the test extra)')
  out = tmp_path_factory.mktemp('step_time')
  run_benchmark(
    'benchmarks.step_time',
    '--quick',
    '--models',
    'mlp',
    '--variants',
    ','.join(STEP_TIME_VARIANTS),
    '--out',
    str(out),
    devices=1,
    timeout=600,
  )
  return json.loads((out / 'step_time.json').read_text()), (out / 'step_time.md').read_text()


def test_step_time_writes_every_row(step_time_out):
  from benchmarks import step_time

  results, md = step_time_out
  rows = results['mlp']['variants']
  assert list(rows) == list(STEP_TIME_VARIANTS)
  if not step_time.library_has_refresh_hvp():
    assert 'refresh_hvp' in rows['f3eo_every10_python']['skipped']
  for name, row in rows.items():
    if 'skipped' in row:
      continue
    assert f'| {name} |' in md
    assert _positive(row['median_ms']) and len(row['times_ms']) == 1, (name, row)
    assert _positive(row['memory']['peak']), (name, row)
    base = 'torch_adamw' if name.startswith('torch') else 'adamw'
    if name != base:
      assert _positive(results['mlp']['ratios'][f'{name}/{base}']), name
  assert _positive(results['mlp']['ratios']['adamw/torch_adamw'])


def test_step_time_flops_and_memory_are_consistent(step_time_out):
  rows = step_time_out[0]['mlp']['variants']
  adamw, exact = rows['adamw']['flops'], rows['f3eo']['flops']
  assert exact > 1.5 * adamw  # the exact product is a second pass through forward and backward
  # the in-graph lax.cond is counted with both branches; its per-step average is unknown
  assert rows['f3eo_every10_linearize']['flops'] is None
  assert rows['f3eo_every10_linearize']['flops_compiled']['None'] > adamw
  python = rows['f3eo_every10_python']
  if 'skipped' not in python:
    refresh, reuse = python['flops_compiled']['True'], python['flops_compiled']['False']
    assert reuse < refresh
    assert python['flops'] == pytest.approx((refresh + 9 * reuse) / 10)
    assert adamw < python['flops'] < exact
  for name in JAX_ROWS:
    if 'skipped' not in rows[name]:
      mem = rows[name]['memory']
      assert mem['alias'] > 0, name  # params and optimizer state were donated
      assert mem['peak'] == mem['argument'] + mem['output'] + mem['temp'] - mem['alias']
  assert rows['f3eo']['memory']['peak'] > rows['adamw']['memory']['peak']


def test_step_time_targets_and_wide_memory_rows(step_time_out):
  results, md = step_time_out
  targets = {(t['kind'], t['variant']): t for t in results['mlp']['targets']}
  exact = targets[('time', 'f3eo')]
  assert exact['value'] == results['mlp']['ratios']['f3eo/adamw']
  assert exact['status'] == ('met' if exact['value'] <= 2.3 else 'unmet')
  assert _positive(exact['floor'])
  assert targets[('time', 'f3eo_linearize')]['status'].startswith('not measured')
  assert targets[('time', 'f3eo_every10_linearize')]['bound'] == 1.2
  # The pass floor: one refresh step (the lower of its FLOP and time ratios), nine steps
  # of the one-pass floor.
  rows, ratios = results['mlp']['variants'], results['mlp']['ratios']
  refresh = min(rows['f3eo']['flops'] / rows['adamw']['flops'], ratios['f3eo/adamw'])
  expected = (refresh + 9 * ratios['adamw_one_pass/adamw']) / 10
  assert targets[('time', 'f3eo_every10_python')]['pass_floor'] == pytest.approx(expected)
  assert targets[('time', 'f3eo')]['pass_floor'] is None
  assert '| pass floor |' in md
  wide = results['mlp_wide']
  assert wide['kind'] == 'memory_only' and wide['num_params'] > 0
  peaks = {v: row['memory']['peak'] for v, row in wide['variants'].items()}
  assert set(peaks) == {'adamw', 'f3eo'} and peaks['f3eo'] > peaks['adamw'] > 0
  assert wide['targets'][0]['value'] == pytest.approx(peaks['f3eo'] / peaks['adamw'])
  assert '## mlp_wide: memory only' in md and 'Targets (CPU)' in md


def test_one_pass_floor_computes_the_capped_projection_it_stands_for():
  """The floor's transform does the work it claims: ``g + κ·(v − r·g)``, checked in numpy."""
  import jax.numpy as jnp

  from benchmarks import step_time

  rng = np.random.default_rng(0)
  g = {'a': rng.standard_normal((4, 16)), 'b': rng.standard_normal(5)}  # rows of 8, and whole
  v = {'a': rng.standard_normal((4, 16)), 'b': rng.standard_normal(5)}
  tx = step_time.one_pass_reuse(max_ratio=0.1)
  as32 = lambda t: {k: jnp.asarray(x, jnp.float32) for k, x in t.items()}
  out, state = tx.update(as32(g), as32(v))

  flat = lambda t: np.concatenate([np.ravel(np.asarray(t[k], np.float64)) for k in ('a', 'b')])
  g64, v64 = flat(as32(g)), flat(as32(v))
  r = g64 @ v64 / (g64 @ g64)
  perp = v64 - r * g64
  kappa = min(1.0, 0.1 * np.linalg.norm(g64) / np.linalg.norm(perp))
  assert kappa < 1  # the cap binds
  np.testing.assert_allclose(flat(out), g64 + kappa * perp, rtol=1e-5, atol=1e-6)
  np.testing.assert_array_equal(flat(state), v64)  # the stored vector is kept


def test_step_time_linearize_objective_matches_the_flax_helper():
  """The ``hvp_fn=`` path writes its objective by hand (with batch norm and dropout)."""
  import jax
  import jax.numpy as jnp

  import f3eo_jax
  from benchmarks import step_time

  model = step_time.jax_model('cnn')
  x, y = (jnp.asarray(a) for a in step_time.make_batch('cnn', 4))
  variables = model.init(jax.random.key(0), x)
  params = variables['params']
  model_state = {k: v for k, v in variables.items() if k != 'params'}
  outs = {}
  for name in ('f3eo', 'f3eo_linearize'):
    variant = step_time.JAX_VARIANTS[name]
    tx = step_time.make_optimizer(variant)
    step = jax.jit(step_time.make_step(model, tx, variant))
    outs[name] = step(params, model_state, tx.init(params), x, y, jax.random.key(1))
  (p1, s1, o1, l1), (p2, s2, o2, l2) = outs['f3eo'], outs['f3eo_linearize']
  for a, b in zip(jax.tree.leaves((p1, s1, l1)), jax.tree.leaves((p2, s2, l2))):
    assert jnp.allclose(a, b, rtol=1e-5, atol=1e-6)
  assert jax.tree.leaves(s1) and not jnp.allclose(
    s1['batch_stats']['BatchNorm_0']['mean'], model_state['batch_stats']['BatchNorm_0']['mean']
  )
  d1, d2 = f3eo_jax.diagnostics(o1), f3eo_jax.diagnostics(o2)
  assert float(d1['hg_norm']) > 0
  assert float(d1['hg_norm']) == pytest.approx(float(d2['hg_norm']), rel=1e-5)


# ---------------------------------------------------------------- data_parallel


@pytest.fixture(scope='module')
def data_parallel_out(tmp_path_factory):
  out = tmp_path_factory.mktemp('data_parallel')
  run_benchmark(
    'benchmarks.data_parallel',
    '--quick',
    '--hidden',
    '32,32',
    '--batch',
    '64',
    '--out',
    str(out),
    devices=8,
    timeout=600,
  )
  return (
    json.loads((out / 'data_parallel.json').read_text()),
    (out / 'data_parallel.md').read_text(),
  )


def test_data_parallel_layouts_match_one_device(data_parallel_out):
  from benchmarks import data_parallel as dp

  results, md = data_parallel_out
  rows = results['equivalence']
  assert [(r['layout'], r['optimizer']) for r in rows] == list(dp.EQUIVALENCE_RUNS)
  for r in rows:
    assert r['early_param_diff'] <= dp.EARLY_TOL, r
    assert math.isfinite(r['final_loss']) and 0 <= r['test_accuracy'] <= 1
  assert 'every layout is within' in md and '**above**' not in md


def test_data_parallel_times_and_counts_collectives(data_parallel_out):
  from benchmarks import data_parallel as dp

  results, md = data_parallel_out
  n = results['num_params']
  rows = {(r['layout'], r['optimizer']): r for r in results['timing']}
  assert list(rows) == list(dp.TIMING_RUNS)
  for key, r in rows.items():
    assert _positive(r['step_ms']) and _positive(r['vs_adamw'] or 1.0), key
  reduced = lambda key, where='always': (
    rows[key]['collectives'].get(f'all-reduce ({where})', {}).get('elements', 0)
  )
  assert reduced(('1 device', 'f3eo')) == 0
  # g, plus the scalar loss where XLA reduces it in the same op
  for layout in ('jit', 'shard_map (vma)', 'shard_map (local)'):
    assert n <= reduced((layout, 'adamw')) <= n + 1, layout
  for layout in ('shard_map (vma)', 'shard_map (local)'):
    assert 2 * n <= reduced((layout, 'f3eo')) <= 2 * n + 1, layout
  assert reduced(('jit', 'f3eo hvp_every=10'), 'in_cond') > 0
  assert 'exactly one more parameter-sized all-reduce' in md
  assert f'{reduced(("jit", "f3eo")) / n:.2f}×' in md


def _results(early=1e-7, acc=(0.6, 0.6), shard_map_f3eo=2.0):
  """Made-up results, in the layout the script writes, for the prose generators."""
  n = 1000
  equivalence = [
    dict(
      layout=layout,
      optimizer=opt,
      final_loss=0.5,
      test_accuracy=acc[layout != '1 device'],
      early_param_diff=0.0 if layout == '1 device' else early,
      max_param_diff=0.0 if layout == '1 device' else 1e-2,
      param_scale=0.8,
    )
    for layout, opt in (
      ('1 device', 'f3eo'),
      ('jit', 'f3eo'),
      ('1 device', 'adamw'),
      ('jit', 'adamw'),
    )
  ]
  collectives = lambda k: {'all-reduce (always)': {'count': 1, 'elements': int(k * n)}}
  timing = [
    dict(
      layout='shard_map (vma)',
      optimizer='adamw',
      vs_one_device=2.0,
      vs_adamw=1.0,
      collectives=collectives(1),
    ),
    dict(
      layout='shard_map (vma)',
      optimizer='f3eo',
      vs_one_device=2.5,
      vs_adamw=2.5,
      collectives=collectives(shard_map_f3eo),
    ),
  ]
  return dict(
    equivalence=equivalence,
    timing=timing,
    train_steps=300,
    num_params=n,
    machine={'cores_available': 2},
  )


def test_data_parallel_prose_states_the_numbers():
  from benchmarks import data_parallel as dp

  text = '\n'.join(dp.equivalence_prose(_results()) + dp.traffic_prose(_results()))
  assert 'is 1.0e-07' in text and 'every layout is within' in text
  assert 'they agree within 10% and 1 point' in text
  assert 'AdamW all-reduces 1.00×' in text and 'F3EO 2.00×' in text
  assert 'exactly one more parameter-sized all-reduce' in text
  assert 'F3EO moves 2.00× the bytes AdamW moves' in text


def test_data_parallel_prose_says_when_a_check_fails():
  from benchmarks import data_parallel as dp

  bad = _results(early=3e-4, acc=(0.6, 0.5), shard_map_f3eo=2.5)
  text = '\n'.join(dp.equivalence_prose(bad) + dp.traffic_prose(bad))
  assert '**above**' in text and 'every layout is within' not in text
  assert 'do **not** agree' in text and '10.0 percentage points' in text
  assert '1.50 parameter counts more' in text and 'exactly one more' not in text
