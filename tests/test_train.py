"""benchmarks/training.py and the main job (benchmarks/train.py), at tiny sizes."""

import dataclasses
import functools
import json

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import f3eo_jax
from benchmarks import outputs, reporting, tasks, train, training


@pytest.fixture(scope='module')
def cache():
  """Compiled steps shared by this module's tests."""
  return training.StepCache()


@functools.cache
def _task(name):
  return tasks.get(name, **tasks.SMOKE_SIZES[name])


def _config(task, optimizer, **kwargs):
  # The smoke preset's batch (128, from 256 examples), so train.main reuses these compiles.
  kwargs = (
    dict(
      task=task,
      optimizer=optimizer,
      learning_rate=3e-3,
      num_steps=6,
      eval_every=3,
      train_subset=256,
    )
    | kwargs
  )
  return training.Config(**kwargs)


@pytest.mark.parametrize(
  'task_name, optimizer',
  [
    ('mnist1d_mlp', 'f3eo'),
    ('mnist1d_cnn', 'f3eo'),
    ('regression', 'f3eo'),
    ('char_lm', 'f3eo'),
    ('mnist1d_mlp', 'adamw'),
    ('regression', 'adamw'),
  ],
)
def test_every_task_trains_and_records_history(task_name, optimizer, cache):
  task = _task(task_name)
  run = training.train_and_evaluate(
    _config(task_name, optimizer), task, task.load(), cache=cache, progress=False
  )
  assert run['eval_steps'] == [0, 3, 6] and run['steps_done'] == 6 and not run['diverged']
  assert np.all(np.isfinite(run['metric'])) and np.all(np.isfinite(run['train_loss'][1:]))
  assert np.all(np.diff(run['wall_time']) > 0) and run['steps_per_s'] > 0
  values = run['step_values']
  assert len(values['loss']) == 6 and np.all(np.asarray(values['grad_sq_norm']) > 0)
  if optimizer == 'f3eo':
    assert np.all(np.abs(values['cos_g_hg']) <= 1 + 1e-5)
    assert run['counters']['nonfinite_count'] == 0 and run['counters']['mismatch_count'] == 0
    # The harness's obj_fn is the loss that produced g (same batch, dropout key, batch
    # statistics): the library measures their relative mismatch on every step.
    assert max(values['grad_mismatch']) < 1e-4
  else:
    assert 'cos_g_hg' not in values and run['counters'] == {}
  if task_name == 'mnist1d_mlp':
    assert 0 <= run['final_metric'] <= 1


def test_the_consistency_check_catches_another_dropout_key():
  """The negative control of the mismatch check above: not vacuous for this CNN (dropout 0.1)."""
  task = _task('mnist1d_cnn')
  data = task.load()
  model = task.make_model(data)
  x, y = jnp.asarray(data.x_train[:16]), jnp.asarray(data.y_train[:16])
  variables = jax.jit(model.init)(jax.random.key(0), x)
  tx = f3eo_jax.f3eo(1e-3, check_consistency=1e-4)

  def loss_fn(params, key):
    out, _ = model.apply(
      {'params': params, 'batch_stats': variables['batch_stats']},
      x,
      train=True,
      rngs={'dropout': key},
      mutable=['batch_stats'],
    )
    return task.loss(out, y).mean()

  @jax.jit
  def wrong_step(params):
    grads = jax.grad(loss_fn)(params, jax.random.key(1))
    obj_fn = functools.partial(loss_fn, key=jax.random.key(2))  # another dropout mask
    return tx.update(grads, tx.init(params), params, obj_fn=obj_fn)[1]

  state = wrong_step(variables['params'])
  assert int(f3eo_jax.diagnostics(state)['mismatch_count']) == 1
  with pytest.raises(f3eo_jax.GradientMismatchError):
    f3eo_jax.raise_on_mismatch(state)


def test_batch_stats_update_in_training_and_evaluation_uses_them(cache):
  task = _task('mnist1d_cnn')
  data = task.load()
  batch = (data.x_train[:128], data.y_train[:128])
  variant = _config('mnist1d_cnn', 'f3eo').variant()  # compiled by the test above
  compiled, _ = cache.get(task, variant, data, batch)
  state = compiled.init(0)
  before = jax.tree.map(np.asarray, state.model_state)
  new_state, _ = compiled.train_step(state, *batch, training.hyperparams(variant, 1e-3, None, 10))
  assert any(
    not np.allclose(a, b)
    for a, b in zip(jax.tree.leaves(before), jax.tree.leaves(new_state.model_state))
  )
  out = compiled.eval_step(new_state, *batch)
  logits = compiled.model.apply({'params': new_state.params, **new_state.model_state}, batch[0])
  np.testing.assert_allclose(
    out['loss_sum'],
    optax.softmax_cross_entropy_with_integer_labels(logits, batch[1]).sum(),
    rtol=1e-5,
  )


def test_cosine_schedule_is_optax_cosine_decay():
  optax_schedule = optax.cosine_decay_schedule(0.3, 50)
  ours = training.cosine_schedule(jnp.float32(0.3), jnp.float32(50))
  for count in (0, 1, 17, 49, 50, 80):
    np.testing.assert_allclose(ours(count), optax_schedule(count), rtol=1e-6, atol=1e-8)


def test_sweep_shares_one_compilation_and_picks_by_the_metric_direction(cache):
  task = _task('regression')
  base = _config('regression', 'sgd', train_subset=None)
  best, records = training.sweep(base, task, task.load(), cache=cache, progress=False)
  assert [r['learning_rate'] for r in records] == list(training.registry.SGD_SWEEP)
  metrics = [r['metric'] for r in records]
  assert best.learning_rate == records[int(np.argmin(metrics))]['learning_rate']  # lower is better
  assert best.weight_decay is None
  second = training.train_and_evaluate(
    dataclasses.replace(base, learning_rate=0.05), task, task.load(), cache=cache, progress=False
  )
  assert second['compile_time_s'] == 0.0  # learning rate is a traced input


def test_a_diverged_run_stops_early_and_says_so(cache):
  task = _task('regression')
  config = _config('regression', 'sgd', learning_rate=1e6, num_steps=60, eval_every=3)
  run = training.train_and_evaluate(config, task, task.load(), cache=cache, progress=False)
  assert run['diverged'] and run['steps_done'] < 60 and run['final_metric'] == np.inf
  rows = reporting.summarize([run])
  assert 'diverged (1/1)' in reporting.results_table(rows, {'regression': task})


def test_time_steps_interleaves_and_reports_ratios(cache):
  task = _task('regression')
  configs = {n: _config('regression', n) for n in ('f3eo', 'adamw')}
  times = training.time_steps(configs, task, task.load(), cache=cache, rounds=2, block=2)
  assert times['f3eo']['ratio'] == 1.0 and len(times['adamw']['per_round_s']) == 2
  assert all(t['step_s'] > 0 for t in times.values())


def test_main_job_defaults_and_smoke_run_writes_its_report(tmp_path, capsys, cache):
  args = train.parse_args([])
  assert args.tasks == ('mnist1d_mlp', 'mnist1d_cnn') and args.seeds == 1 and not args.sweep
  assert args.optimizers == ('f3eo', 'f3eo_reference', 'f3eo_theory_uncapped_global', 'adamw')
  assert outputs.directory(args) == outputs.OUT_DIR
  assert outputs.directory(train.parse_args(['--update-results'])) == outputs.RESULTS_DIR
  text = train.main(
    ['--preset', 'smoke', '--out', str(tmp_path), '--no-progress', '--seeds', '2'], cache=cache
  )
  assert '| MNIST-1D CNN | F3EO (library default) |' in text and '| MNIST-1D MLP | AdamW |' in text
  for suffix in ('.md', '.json', '_curves.png', '_diagnostics.png'):
    assert (tmp_path / f'train_smoke{suffix}').stat().st_size > 0
  payload = json.loads((tmp_path / 'train_smoke.json').read_text())
  assert payload['machine']['versions']['jax'] == jax.__version__
  assert payload['machine']['command'].startswith('python ')
  assert len(payload['runs']) == 2 * 2 * 2 and all(r['steps_done'] == 6 for r in payload['runs'])
  assert {row['seeds'] for row in payload['summary']} == {2}
  assert 'test accuracy' in capsys.readouterr().out
