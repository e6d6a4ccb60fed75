"""benchmarks/evaluation_tasks.py: the data are what they claim, split apart; the models learn."""

import jax
import numpy as np
import optax
import pytest

from benchmarks import evaluation_tasks as ev

pytest.importorskip('sklearn', reason='the digits task reads scikit-learn bundled data')


def _rows(x):
  return {r.tobytes() for r in np.ascontiguousarray(x).reshape(len(x), -1)}


def test_digits_are_sklearn_images_as_rows_split_disjoint_and_deterministic():
  from sklearn.datasets import load_digits

  data = ev.load_digits()
  assert data.x_train.shape == (1257, 32, 2) and data.x_test.shape == (540, 32, 2)
  assert data.x_train.dtype == np.float32 and data.y_train.dtype == np.int32
  assert data.x_train.min() == 0 and data.x_train.max() == 1 and data.num_classes == 10
  images = load_digits().images / 16.0
  all_x = np.concatenate([data.x_train, data.x_test])
  assert _rows(all_x.astype(np.float64)) == _rows(images)  # every image once, in reading order
  assert len(_rows(all_x)) == len(images) == 1797  # all distinct: train and test are disjoint
  assert set(np.unique(data.y_test)) == set(range(10))
  val = data.validation_split()
  assert val.x_train.shape == (1131, 32, 2) and val.x_test.shape == (126, 32, 2)
  np.testing.assert_array_equal(val.x_test, data.x_train[-126:])
  ev.load_digits.cache_clear()
  np.testing.assert_array_equal(ev.load_digits().y_train, data.y_train)


def test_modular_addition_labels_are_the_sum_mod_p_and_splits_cover_every_pair_once():
  data = ev.load_modular_addition()
  assert data.x_train.shape == (7057, 2) and data.x_test.shape == (2352, 2)
  for x, y in ((data.x_train, data.y_train), (data.x_test, data.y_test)):
    np.testing.assert_array_equal(y, [(int(a) + int(b)) % 97 for a, b in x])
  pairs = [tuple(r) for r in np.concatenate([data.x_train, data.x_test])]
  assert len(set(pairs)) == len(pairs) == 97 * 97
  val = data.validation_split()
  assert not _rows(val.x_test) & _rows(val.x_train) and not _rows(data.x_test) & _rows(val.x_test)
  ev.load_modular_addition.cache_clear()
  np.testing.assert_array_equal(ev.load_modular_addition().x_train, data.x_train)


@pytest.mark.parametrize('name', sorted(ev.EVALUATION_TASKS))
def test_a_few_adamw_steps_reduce_the_training_loss(name):
  task = ev.EVALUATION_TASKS[name](**ev.SMOKE_SIZES[name])
  data = task.load()
  model = task.make_model(data)
  x, y = data.x_train[:64], data.y_train[:64]
  params = model.init(jax.random.key(0), x, train=False)['params']
  out = model.apply({'params': params}, x, train=True)
  assert out.shape == (64, data.num_classes) and task.loss(out, y).shape == (64,)
  tx = optax.adam(1e-2)

  def loss_fn(p):
    return task.loss(model.apply({'params': p}, x, train=True), y).mean()

  @jax.jit
  def step(p, s):
    loss, g = jax.value_and_grad(loss_fn)(p)
    u, s = tx.update(g, s, p)
    return optax.apply_updates(p, u), s, loss

  state, losses = tx.init(params), []
  for _ in range(50):
    params, state, loss = step(params, state)
    losses.append(float(loss))
  assert losses[-1] < 0.7 * losses[0]
  assert task.higher_is_better and task.metric_values(out, y).shape == (64,)
