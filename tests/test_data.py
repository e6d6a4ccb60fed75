"""The benchmark data loader: MNIST-1D generated offline and cached, batches by seed."""

import os
import socket

import numpy as np
import pytest

from benchmarks import data


def _no_network(*args, **kwargs):
  raise AssertionError(f'the data loader tried to open a network connection: {args}')


@pytest.fixture(scope='module')
def offline():
  """Any attempt to connect a socket fails the test."""
  with pytest.MonkeyPatch.context() as mp:
    mp.setattr(socket.socket, 'connect', _no_network)
    mp.setattr(socket.socket, 'connect_ex', _no_network)
    mp.setattr(socket, 'create_connection', _no_network)
    yield


@pytest.fixture(scope='module')
def mnist1d_cache(tmp_path_factory, offline):
  """MNIST-1D generated once (offline) into a fresh cache directory."""
  del offline
  cache_dir = str(tmp_path_factory.mktemp('mnist1d_cache'))
  np.random.seed(123)
  before = np.random.get_state()[1].copy()
  ds = data.load_mnist1d(cache_dir=cache_dir)
  after = np.random.get_state()[1].copy()
  return ds, cache_dir, before, after


def test_mnist1d_has_the_published_shapes_and_classes(mnist1d_cache):
  ds = mnist1d_cache[0]
  assert ds.x_train.shape == (4000, 40) and ds.x_test.shape == (1000, 40)
  assert ds.y_train.shape == (4000,) and ds.y_test.shape == (1000,)
  assert ds.x_train.dtype == np.float32 and ds.y_train.dtype == np.int32
  assert ds.num_classes == 10
  assert set(np.unique(ds.y_train)) == set(range(10)) == set(np.unique(ds.y_test))
  # 500 signals per class over train + test, as make_dataset draws them.
  counts = np.bincount(np.concatenate([ds.y_train, ds.y_test]), minlength=10)
  np.testing.assert_array_equal(counts, np.full(10, 500))
  # Standardised over the whole set by the generator.
  everything = np.concatenate([ds.x_train, ds.x_test])
  assert abs(everything.mean()) < 1e-3 and abs(everything.std() - 1.0) < 1e-3
  assert np.all(np.isfinite(everything))


def test_mnist1d_is_deterministic_and_the_cache_returns_the_same_arrays(mnist1d_cache, offline):
  ds, cache_dir, _, _ = mnist1d_cache
  assert os.path.exists(os.path.join(cache_dir, 'mnist1d_seed42.npz'))
  cached = data.load_mnist1d(cache_dir=cache_dir)
  regenerated = data.load_mnist1d(cache_dir=None)
  for other in (cached, regenerated):
    for field in ('x_train', 'y_train', 'x_test', 'y_test'):
      np.testing.assert_array_equal(getattr(other, field), getattr(ds, field))


def test_mnist1d_generation_leaves_numpy_global_rng_alone(mnist1d_cache):
  _, _, before, after = mnist1d_cache
  np.testing.assert_array_equal(before, after)


def test_validation_split_holds_out_the_end_of_train(mnist1d_cache):
  ds = mnist1d_cache[0]
  val = ds.validation_split(0.1)
  assert val.x_train.shape == (3600, 40) and val.x_test.shape == (400, 40)
  np.testing.assert_array_equal(np.concatenate([val.x_train, val.x_test]), ds.x_train)
  with pytest.raises(ValueError, match='fraction'):
    ds.validation_split(1.0)


def test_batches_shuffle_by_seed_and_cover_each_example_once_per_epoch():
  x = np.arange(100, dtype=np.float32)[:, None]
  y = np.arange(100, dtype=np.int32)
  epoch = list(data.batches(x, y, batch_size=32, seed=0, num_epochs=1))
  assert len(epoch) == 3  # the partial batch of 4 is dropped
  seen = np.concatenate([b[1] for b in epoch])
  assert len(set(seen)) == 96 and set(seen) <= set(range(100))
  for bx, by in epoch:
    np.testing.assert_array_equal(bx[:, 0], by)  # inputs stay paired with labels
  assert not np.array_equal(seen, np.arange(96))  # shuffled
  again = np.concatenate([b[1] for b in data.batches(x, y, 32, seed=0, num_epochs=1)])
  np.testing.assert_array_equal(seen, again)
  other = np.concatenate([b[1] for b in data.batches(x, y, 32, seed=1, num_epochs=1)])
  assert not np.array_equal(seen, other)
  two_epochs = list(data.batches(x, y, 32, seed=0, num_epochs=2))
  assert len(two_epochs) == 6 and not np.array_equal(two_epochs[0][1], two_epochs[3][1])
  with pytest.raises(ValueError, match='batch_size'):
    next(data.batches(x, y, 101, seed=0))
