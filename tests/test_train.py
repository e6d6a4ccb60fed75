"""benchmarks/harness.py and the main job (benchmarks/train.py), at tiny sizes."""

import dataclasses
import functools
import json

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import f3eo_jax
from benchmarks import config, harness, report, steps, tasks, train


@pytest.fixture(scope='module')
def cache():
  return harness.StepCache()


@functools.cache
def _task(name):
  return tasks.get(name, **tasks.SMOKE_SIZES[name])


def _config(optimizer, **kwargs):
  base = dict(learning_rate=3e-3, num_steps=6, eval_every=3, train_subset=256)
  return harness.RunConfig(config.get(optimizer), **{**base, **kwargs})


@pytest.mark.parametrize(
  'task_name, optimizer',
  [
    ('mnist1d_mlp', 'f3eo'),
    ('mnist1d_cnn', 'f3eo'),
    ('regression', 'f3eo'),
    ('char_lm', 'f3eo'),
    ('mnist1d_mlp', 'adamw'),
  ],
)
def test_every_task_trains_and_records_history(task_name, optimizer, cache):
  task = _task(task_name)
  run = harness.train_and_evaluate(_config(optimizer), task, task.load(), cache=cache)
  assert run['eval_steps'] == [0, 3, 6] and run['steps_done'] == 6 and not run['diverged']
  assert np.all(np.isfinite(run['metric'])) and np.all(np.isfinite(run['train_loss'][1:]))
  assert np.all(np.diff(run['wall_time']) > 0) and run['steps_per_s'] > 0
  values = run['step_values']
  assert len(values['loss']) == 6 and np.all(np.asarray(values['grad_sq_norm']) > 0)
  if optimizer == 'f3eo':
    assert np.all(np.abs(values['cos_g_hg']) <= 1 + 1e-5)
    assert run['counters']['nonfinite_count'] == 0 and run['counters']['mismatch_count'] == 0
    # obj_fn is the loss that produced g (same batch, dropout key, batch statistics)
    assert max(values['grad_mismatch']) < 1e-4
  else:
    assert 'cos_g_hg' not in values and run['counters'] == {}


def test_the_python_schedule_follows_the_in_graph_one(cache):
  """jit_amortized refreshes H·g on the steps the in-graph lax.cond does. Inside this step
  XLA fuses the two forms differently, so they agree to float32 rounding, not bit for bit."""
  task = _task('mnist1d_cnn')  # batch norm and dropout: the state and the key must follow too
  cfg = lambda name, steps=23: _config(name, num_steps=steps, eval_every=steps)
  run = lambda name: harness.train_and_evaluate(cfg(name), task, task.load(), cache=cache)
  graph, python, again = run('f3eo_hvp10'), run('f3eo_hvp10_python'), run('f3eo_hvp10_python')
  assert again['step_values'] == python['step_values']  # the host count restarts with each run
  for key, values in graph['step_values'].items():
    np.testing.assert_allclose(
      python['step_values'][key], values, rtol=2e-4, atol=1e-6, err_msg=key
    )
  exact = run('f3eo')
  assert not np.allclose(exact['step_values']['cos_g_hg'], graph['step_values']['cos_g_hg'])


def test_the_consistency_check_catches_another_dropout_key():
  """The negative control of the mismatch check above: not vacuous for this CNN (dropout)."""
  task = _task('mnist1d_cnn')
  data = task.load()
  model = task.make_model(data)
  x, y = jnp.asarray(data.x_train[:16]), jnp.asarray(data.y_train[:16])
  variables = jax.jit(model.init)(jax.random.key(0), x)
  tx = f3eo_jax.f3eo(1e-3, check_consistency=1e-4)

  def loss_fn(params, key):
    v = {'params': params, 'batch_stats': variables['batch_stats']}
    out, _ = model.apply(v, x, train=True, rngs={'dropout': key}, mutable=['batch_stats'])
    return task.loss(out, y).mean()

  @jax.jit
  def wrong_step(params):
    grads = jax.grad(loss_fn)(params, jax.random.key(1))
    obj_fn = functools.partial(loss_fn, key=jax.random.key(2))  # another dropout mask
    return tx.update(grads, tx.init(params), params, obj_fn=obj_fn)[1]

  state = wrong_step(variables['params'])
  assert int(f3eo_jax.diagnostics(state)['mismatch_count']) == 1


def test_batch_stats_update_in_training_and_evaluation_uses_them(cache):
  task = _task('mnist1d_cnn')
  data = task.load()
  batch = (data.x_train[:128], data.y_train[:128])
  variant = config.get('f3eo')
  compiled, _ = cache.get(task, variant, data, batch)
  state = compiled.init(0)
  before = jax.tree.map(np.asarray, state.model_state)
  new_state, _ = compiled.train_step(state, *batch, steps.hyperparams(variant, 1e-3, None, 10))
  changed = [
    not np.allclose(a, b)
    for a, b in zip(jax.tree.leaves(before), jax.tree.leaves(new_state.model_state))
  ]
  assert any(changed)
  out = compiled.eval_step(new_state, *batch)
  logits = compiled.model.apply({'params': new_state.params, **new_state.model_state}, batch[0])
  expected = optax.softmax_cross_entropy_with_integer_labels(logits, batch[1]).sum()
  np.testing.assert_allclose(out['loss_sum'], expected, rtol=1e-5)


def test_each_step_draws_a_new_dropout_mask(cache):
  task = _task('mnist1d_cnn')  # dropout 0.1
  data = task.load()
  batch = (data.x_train[:128], data.y_train[:128])
  compiled, _ = cache.get(task, config.get('adamw'), data, batch)
  hp = steps.hyperparams(config.get('adamw'), 0.0, 0.0, 10)  # lr 0: the params stay put
  state, first = compiled.train_step(compiled.init(0), *batch, hp)
  kernel = np.asarray(state.params['Dense_0']['kernel'])  # the step donates its state
  again, second = compiled.train_step(state, *batch, hp)
  np.testing.assert_array_equal(again.params['Dense_0']['kernel'], kernel)
  assert first['loss'] != second['loss']  # same params and batch: only the mask differs


def test_cosine_schedule_is_optax_cosine_decay():
  ours = steps.cosine_schedule(jnp.float32(0.3), jnp.float32(50))
  for count in (0, 1, 17, 49, 50, 80):
    np.testing.assert_allclose(
      ours(count), optax.cosine_decay_schedule(0.3, 50)(count), rtol=1e-6, atol=1e-8
    )


def test_sweep_shares_one_compilation_and_picks_by_the_metric_direction(cache):
  task = _task('regression')
  base = _config('sgd', train_subset=None)
  best, records = harness.sweep(base, task, task.load(), cache=cache)
  assert [r['learning_rate'] for r in records] == list(config.SGD_SWEEP)
  metrics = [r['metric'] for r in records]
  assert best == (records[int(np.argmin(metrics))]['learning_rate'], None)  # lower is better
  again = harness.train_and_evaluate(
    dataclasses.replace(base, learning_rate=0.05), task, task.load(), cache=cache
  )
  assert again['compile_time_s'] == 0.0  # the learning rate is a traced input


def test_a_diverged_run_stops_early_and_says_so(cache):
  task = _task('regression')
  cfg = _config('sgd', learning_rate=1e6, num_steps=60, eval_every=3)
  run = harness.train_and_evaluate(cfg, task, task.load(), cache=cache)
  assert run['diverged'] and run['steps_done'] < 60 and run['final_metric'] == np.inf


def test_equal_wall_clock_gives_each_config_the_reference_time(cache):
  task = _task('regression')
  configs = {n: _config(n, num_steps=20) for n in ('f3eo', 'adamw')}
  out = harness.equal_wall_clock(configs, 'f3eo', task, task.load(), cache=cache)
  assert out['f3eo']['ratio'] == 1.0 and out['f3eo']['steps'] == 20 and out['f3eo']['runs'] == []
  budget = max(1, round(20 / out['adamw']['ratio']))
  assert out['adamw']['steps'] == budget
  if abs(budget - 20) > 1:
    assert [r['steps_done'] for r in out['adamw']['runs']] == [budget]


def test_main_job_smoke_run_writes_tables_and_results(tmp_path, cache):
  args = train.parse_args([])
  assert args.tasks == ('mnist1d_mlp', 'mnist1d_cnn') and args.seeds == 1 and not args.sweep
  assert 'f3eo_hvp10_python' in args.optimizers and args.wall_clock_reference == 'f3eo'
  text = train.main(['--preset', 'smoke', '--out', str(tmp_path)], cache=cache)
  assert '## Equal steps' in text and '## Equal wall-clock' in text
  payload = json.loads((tmp_path / 'train_smoke.json').read_text())
  assert payload['machine']['versions']['jax'] == jax.__version__
  assert payload['machine']['command'].startswith('python ')
  assert len(payload['runs']) == 2 * 3 and all(r['steps_done'] == 20 for r in payload['runs'])
  for wall in payload['wall_clock'].values():
    assert set(wall) == {'f3eo', 'f3eo_hvp10_python', 'adamw'} and wall['f3eo']['ratio'] == 1.0
  for suffix in ('.md', '_eval_steps.png', '_wall_time.png', '_grad_sq_norm.png', '_cos_g_hg.png'):
    assert (tmp_path / f'train_smoke{suffix}').stat().st_size > 0


def test_report_cells_give_mean_and_population_std_and_name_divergence():
  assert report.fmt([0.9, 0.8], 'accuracy') == '85.0 ± 5%'
  assert report.fmt([2.0, 4.0], 'value') == '3 ± 1' and report.fmt([0.25], 'value') == '0.25'
  assert report.fmt([1.0, np.inf], 'value') == 'diverged (1/2)'
