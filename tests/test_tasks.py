"""benchmarks/tasks.py and data.py: each task's data are what they claim, shaped right."""

import math
import os
import sysconfig

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from benchmarks import data as data_lib
from benchmarks import tasks


def test_friedman1_matches_its_formula_and_noise_is_standard_normal():
  x, y = data_lib.friedman1(500, seed=3, noise=0.0)
  assert x.shape == (500, 10) and np.all((x >= 0) & (x < 1))
  formula = [
    10 * math.sin(math.pi * r[0] * r[1]) + 20 * (r[2] - 0.5) ** 2 + 10 * r[3] + 5 * r[4]
    for r in x.astype(float)
  ]
  np.testing.assert_allclose(y, formula, rtol=1e-5, atol=1e-4)
  x2, y2 = data_lib.friedman1(20000, seed=4)
  residual = y2.astype(float) - data_lib.friedman1_target(x2.astype(float))
  assert abs(residual.mean()) < 0.03 and abs(residual.std() - 1.0) < 0.03
  np.testing.assert_array_equal(data_lib.friedman1(20000, seed=4)[1], y2)  # deterministic per seed
  assert not np.allclose(data_lib.friedman1(20000, seed=5)[1], y2)


def test_regression_task_standardises_targets_and_reports_mse_in_original_units():
  task = tasks.get('regression')
  data = task.load()
  assert data.x_train.shape == (2000, 10) and data.x_test.shape == (1000, 10)
  assert abs(data.y_train.mean()) < 1e-5 and abs(data.y_train.std() - 1) < 1e-5
  _, y_test_raw = data_lib.friedman1(1000, seed=1)
  mean, std = data_lib.friedman1_scale()
  predict_train_mean = jnp.zeros((1000, 1))  # the standardised training mean
  mse = float(task.metric_values(predict_train_mean, jnp.asarray(data.y_test)).mean())
  np.testing.assert_allclose(mse, np.mean((y_test_raw - mean) ** 2), rtol=1e-4)
  assert not task.higher_is_better and task.better(1.0, 2.0)


def test_char_corpus_is_real_stdlib_source_deterministic_and_split_90_10():
  text = data_lib.read_stdlib_corpus()
  with open(os.path.join(sysconfig.get_paths()['stdlib'], data_lib.STDLIB_FILES[0])) as f:
    assert text.startswith(f.read())
  assert list(data_lib.STDLIB_FILES) == sorted(data_lib.STDLIB_FILES)
  assert (
    20 <= len(data_lib.STDLIB_FILES) <= 40 and 'def __init__(self' in text and len(text) > 500_000
  )
  data = data_lib.load_char_corpus()
  data_lib.load_char_corpus.cache_clear()
  again = data_lib.load_char_corpus()
  np.testing.assert_array_equal(data.train_tokens, again.train_tokens)
  n = len(data.train_tokens) + len(data.eval_tokens)
  assert n == len(text) and abs(len(data.eval_tokens) / n - 0.1) < 1e-3
  assert set(data.vocab) == set(text[: len(data.train_tokens)])
  decoded = ''.join(data.vocab[i] for i in data.train_tokens[:200])
  assert decoded == text[:200]
  unknown = data_lib.encode('a\u2603', data.vocab)  # a snowman is in no training text
  assert unknown[1] == len(data.vocab) == data.vocab_size - 1


def test_char_windows_and_batches():
  data = data_lib.load_char_corpus(seq_len=16, num_eval_windows=32)
  x, y = data.x_test, data.y_test
  assert x.shape == y.shape == (32, 16)
  np.testing.assert_array_equal(x[:, 1:], y[:, :-1])  # y is x shifted by one character
  start = int(
    np.flatnonzero(
      np.all(np.lib.stride_tricks.sliding_window_view(data.eval_tokens, 16) == x[5], axis=1)
    )[0]
  )
  np.testing.assert_array_equal(data.eval_tokens[start + 1 : start + 17], y[5])
  b1, b2 = (
    next(data_lib.text_batches(data, 4, seed=0)),
    next(data_lib.text_batches(data, 4, seed=0)),
  )
  np.testing.assert_array_equal(b1[0], b2[0])
  assert b1[0].shape == (4, 16) and np.array_equal(b1[0][:, 1:], b1[1][:, :-1])
  val = data.validation_split(0.1)
  np.testing.assert_array_equal(val.eval_tokens, data.train_tokens[len(val.train_tokens) :])


@pytest.mark.parametrize(
  'name, sizes, out_shape',
  [
    ('mnist1d_mlp', dict(hidden=(8,)), (3, 10)),
    ('mnist1d_cnn', dict(channels=(2, 4), dense=8), (3, 10)),
    ('regression', dict(hidden=(8,)), (3, 1)),
    ('char_lm', dict(d_model=8, n_layer=1, n_head=2, seq_len=16), (3, 16, None)),
  ],
)
def test_each_task_data_and_model_shapes(name, sizes, out_shape):
  task = tasks.get(name, **sizes)
  data = task.load()
  x, y = next(task.batches(data, 3, 0))
  x_again, _ = next(task.batches(data, 3, 0))
  np.testing.assert_array_equal(x, x_again)
  model = task.make_model(data)
  variables = jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.asarray(x), train=False))
  out = jax.eval_shape(lambda v: model.apply(v, jnp.asarray(x), train=False), variables)
  vocab = getattr(data, 'vocab_size', None)
  assert out.shape == tuple(vocab if s is None else s for s in out_shape)
  assert task.loss(jnp.zeros(out.shape), jnp.asarray(y)).shape == y.shape
  if name.startswith('mnist1d'):
    assert data.x_train.shape == (4000, 40) and data.x_test.shape == (1000, 40)
    assert task.references['MLP'] == 0.68 and task.higher_is_better
  small = data_lib.take_train(data, 10)
  assert (len(small.train_tokens) if name == 'char_lm' else len(small.x_train)) == 10
