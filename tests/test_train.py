"""Smoke tests of benchmarks/train.py: every optimizer trains, F3EO's loss is its gradient's."""

import functools
import json

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import f3eo_jax
from benchmarks import data, models, train

# Small versions of the benchmark models, so that the compiles stay fast.
SMALL_MODELS = {
    'mlp': lambda num_classes: models.MLP(hidden=(16,), num_classes=num_classes),
    'cnn': lambda num_classes: models.CNN(
        num_classes=num_classes, channels=(4, 8), dense=16, dropout_rate=0.3
    ),
}


@pytest.fixture(scope='module', autouse=True)
def small_models():
  """Swaps in the small models; compiled steps are shared by this module's tests."""
  train._step_functions.cache_clear()
  with pytest.MonkeyPatch.context() as mp:
    mp.setattr(train, 'MODELS', SMALL_MODELS)
    yield
  train._step_functions.cache_clear()


@pytest.fixture(scope='module')
def tiny_dataset():
  """64 train / 32 test signals of length 40 whose class is the position of a bump."""
  rng = np.random.default_rng(0)

  def make(n):
    y = rng.integers(0, 4, n).astype(np.int32)
    x = 0.3 * rng.normal(size=(n, 40)).astype(np.float32)
    x[np.arange(n), 5 + 10 * y] += 3.0
    return x, y

  (x_train, y_train), (x_test, y_test) = make(64), make(32)
  return data.Dataset('tiny', x_train, y_train, x_test, y_test, num_classes=4)


def _config(model, optimizer, **kwargs):
  return train.Config(
      model=model, optimizer=optimizer, num_steps=6, eval_every=3, batch_size=16,
      learning_rate=train.OPTIMIZERS[optimizer]['learning_rate'], **kwargs,
  )


@pytest.mark.parametrize('optimizer', list(train.OPTIMIZERS))
def test_every_optimizer_trains_with_finite_losses_and_records_history(optimizer, tiny_dataset):
  run = train.train_and_evaluate(_config('mlp', optimizer), tiny_dataset, progress=False)
  assert run['eval_steps'] == [0, 3, 6]
  assert len(run['test_accuracy']) == len(run['test_loss']) == len(run['wall_time']) == 3
  assert all(0.0 <= a <= 1.0 for a in run['test_accuracy'])
  assert np.all(np.isfinite(run['test_loss'])) and np.all(np.isfinite(run['train_loss'][1:]))
  assert np.all(np.isfinite(run['step_loss'])) and len(run['step_loss']) == 6
  assert np.all(np.diff(run['wall_time']) > 0)
  assert run['steps_done'] == 6 and run['steps_per_s'] > 0
  assert np.all(np.asarray(run['grad_sq_norm']) > 0)
  cos = np.asarray(run['cos_g_hg'])
  if optimizer in train.F3EO_FAMILY:
    assert np.all(np.abs(cos) <= 1.0 + 1e-5)
  else:
    assert np.all(np.isnan(cos))  # no H·g computed, reported as NaN rather than a fake 0


def test_cnn_obj_fn_is_the_loss_that_produced_the_gradient(tiny_dataset):
  # BatchNorm in train mode and dropout 0.3: any other batch, key or mode would differ by far
  # more than 1e-4. train_step builds obj_fn the same way for every F3EO variant.
  config = _config('cnn', 'f3eo', check_consistency=1e-4)
  run = train.train_and_evaluate(config, tiny_dataset, progress=False)
  assert np.all(np.isfinite(run['step_loss']))


def test_the_consistency_check_catches_another_dropout_key(tiny_dataset):
  """The negative control of the test above: the check is not vacuous for this CNN."""
  model = SMALL_MODELS['cnn'](4)
  x, y = jnp.asarray(tiny_dataset.x_train[:16]), jnp.asarray(tiny_dataset.y_train[:16])
  variables = model.init(jax.random.key(0), x)
  tx = f3eo_jax.f3eo(1e-3, check_consistency=1e-4)

  def loss_fn(params, key):
    logits, _ = model.apply(
        {'params': params, 'batch_stats': variables['batch_stats']}, x, train=True,
        rngs={'dropout': key}, mutable=['batch_stats'],
    )
    return models.cross_entropy(logits, y)

  @jax.jit
  def wrong_step(params, opt_state):
    grads = jax.grad(loss_fn)(params, jax.random.key(1))
    obj_fn = functools.partial(loss_fn, key=jax.random.key(2))  # another dropout mask
    return tx.update(grads, opt_state, params, obj_fn=obj_fn)

  with pytest.raises(Exception, match='GradientMismatchError'):
    jax.block_until_ready(wrong_step(variables['params'], tx.init(variables['params'])))


def test_cnn_batch_stats_update_in_training_and_are_used_in_evaluation(tiny_dataset):
  config = _config('cnn', 'adamw')
  model = SMALL_MODELS['cnn'](4)
  state = train.create_train_state(config, model, train.make_optimizer(config), tiny_dataset.x_train[:16])
  step = jax.jit(functools.partial(train.train_step, model=model, config=config))
  x, y = tiny_dataset.x_train[:16], tiny_dataset.y_train[:16]
  new_state, _ = step(state, x, y, jax.random.key(0), jnp.float32(1e-3))
  before, after = jax.tree.leaves(state.batch_stats), jax.tree.leaves(new_state.batch_stats)
  assert any(not np.allclose(a, b) for a, b in zip(before, after))
  # Evaluation uses the running statistics: it equals the model in eval mode, not train mode.
  out = train.eval_step(new_state, x, y, model=model)
  eval_logits = model.apply({'params': new_state.params, 'batch_stats': new_state.batch_stats}, x)
  expected = optax.softmax_cross_entropy_with_integer_labels(eval_logits, y).sum()
  np.testing.assert_allclose(out['loss_sum'], expected, rtol=1e-5)
  assert int(out['correct']) == int(jnp.sum(jnp.argmax(eval_logits, -1) == y))


def test_default_command_is_the_main_job():
  args = train.parse_args([])
  assert args.dataset == 'mnist1d' and args.models == ['mlp', 'cnn']
  assert 'f3eo' in args.optimizers and 'adamw' in args.optimizers
  assert args.seeds == 1 and not args.sweep and args.tag == 'main'
  full = train.parse_args(['--full'])
  assert full.optimizers == list(train.OPTIMIZERS) and full.seeds == 3 and full.sweep


def test_main_writes_table_plots_and_json(tmp_path, monkeypatch, tiny_dataset, capsys):
  monkeypatch.setattr(train, 'RESULTS_DIR', str(tmp_path))
  monkeypatch.setattr(train.data_lib, 'load_dataset', lambda *a, **k: tiny_dataset)
  train.main([
      # The settings of _config, so the steps compiled by the tests above are reused.
      '--models', 'mlp', '--optimizers', 'f3eo', 'adamw', '--steps', '6', '--eval-every', '3',
      '--seeds', '2', '--sweep', '--batch-size', '16', '--tag', 'test', '--no-progress',
  ])
  printed = capsys.readouterr().out
  assert '| MLP | F3EO (theory) |' in printed and '| MLP | AdamW |' in printed
  for suffix in ('.md', '.json', '_curves.png', '_diagnostics.png'):
    assert (tmp_path / f'train_test{suffix}').stat().st_size > 0
  payload = json.loads((tmp_path / 'train_test.json').read_text())
  assert payload['machine']['command'].startswith('python ')
  assert payload['machine']['versions']['jax'] == jax.__version__
  assert len(payload['runs']) == 4 and len(payload['sweeps']) == 2
  for sweep in payload['sweeps']:
    candidates = train.OPTIMIZERS[sweep['optimizer']]['sweep']
    assert sweep['chosen'] in candidates and len(sweep['validation_accuracy']) == len(candidates)
  chosen = {s['optimizer']: s['chosen'] for s in payload['sweeps']}
  for row in payload['summary']:
    assert row['seeds'] == 2 and row['learning_rate'] == chosen[row['optimizer']]
