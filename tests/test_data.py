"""The benchmark data loader: MNIST-1D generated offline and cached, batches by seed, TFDS read
without downloads."""

import os
import socket

import numpy as np
import pytest

from benchmarks import data, tasks, train

tfds = pytest.importorskip(
  'tensorflow_datasets', reason='the TFDS path needs tensorflow-datasets (the `examples` extra)'
)


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


@pytest.mark.parametrize(
  'name, shape', [('mnist', (28, 28, 1)), ('fashion_mnist', (28, 28, 1)), ('cifar10', (32, 32, 3))]
)
def test_tfds_path_reads_mocked_data_source(name, shape, tmp_path, offline):
  with tfds.testing.mock_data(num_examples=12, policy=tfds.testing.MockPolicy.USE_CODE):
    ds = data.load_dataset(name, data_dir=str(tmp_path))
  assert ds.x_train.shape == (12, *shape) and ds.x_test.shape == (12, *shape)
  assert ds.x_train.dtype == np.float32 and ds.y_train.dtype == np.int32
  assert 0.0 <= ds.x_train.min() and ds.x_train.max() <= 1.0
  assert ds.num_classes == 10
  assert np.all((0 <= ds.y_train) & (ds.y_train < 10))


def test_absent_data_dir_raises_a_clear_error_without_downloading(tmp_path, offline):
  missing = tmp_path / 'no_such_dir'
  with pytest.raises(data.DatasetNotPreparedError, match=r'tfds build mnist[\s\S]*array_record'):
    data.load_dataset('mnist', data_dir=str(missing))
  assert not missing.exists()


def test_unprepared_data_dir_raises_a_clear_error_without_downloading(tmp_path, offline):
  with pytest.raises(
    data.DatasetNotPreparedError, match=r'nothing is downloaded[\s\S]*download_and_prepare'
  ):
    data.load_dataset('cifar10', data_dir=str(tmp_path))
  downloaded = [p for p in tmp_path.rglob('*') if p.is_file()]
  assert downloaded == []


class TinyDigits(tfds.core.GeneratorBasedBuilder):
  """A local TFDS builder whose image ``i`` is filled with the value ``i``, label ``i % 10``.

  Tensor features (not ``tfds.features.Image``, whose PNG encoding needs TensorFlow)
  let it be written in the array_record format without TensorFlow.
  """

  VERSION = tfds.core.Version('1.0.0')
  SIZES = {'train': 30, 'test': 10}

  def _info(self):
    return tfds.core.DatasetInfo(
      builder=self,
      features=tfds.features.FeaturesDict(
        {
          'image': tfds.features.Tensor(shape=(4, 4, 1), dtype=np.uint8),
          'label': tfds.features.ClassLabel(num_classes=10),
        }
      ),
    )

  def _split_generators(self, dl_manager):
    del dl_manager
    offsets = {'train': 0, 'test': 100}
    return {s: self._generate_examples(offsets[s], n) for s, n in self.SIZES.items()}

  def _generate_examples(self, offset, n):
    for i in range(offset, offset + n):
      yield i, {'image': np.full((4, 4, 1), i, np.uint8), 'label': i % 10}


def test_a_locally_built_array_record_dataset_loads_through_data_source(tmp_path, offline):
  TinyDigits(data_dir=str(tmp_path), file_format='array_record').download_and_prepare()
  ds = data.load_dataset('tiny_digits', data_dir=str(tmp_path))
  assert ds.x_train.shape == (30, 4, 4, 1) and ds.x_test.shape == (10, 4, 4, 1)
  assert ds.num_classes == 10
  for x, y, values in (
    (ds.x_train, ds.y_train, range(30)),
    (ds.x_test, ds.y_test, range(100, 110)),
  ):
    index = np.rint(x[:, 0, 0, 0] * 255).astype(int)  # scaled to [0, 1] from uint8
    assert sorted(index) == list(values)
    np.testing.assert_array_equal(y, index % 10)
    np.testing.assert_allclose(
      x, np.broadcast_to(index[:, None, None, None] / 255.0, x.shape), atol=1e-7
    )


def test_train_options_give_the_classification_tasks_a_tfds_dataset(tmp_path, offline):
  args = train.parse_args(['--dataset', 'mnist', '--data-dir', str(tmp_path), '--steps', '3'])
  task_map = tasks.build(['mnist1d_mlp', 'regression'], args)
  assert sorted(task_map) == ['mnist_mlp', 'regression']
  with tfds.testing.mock_data(num_examples=8, policy=tfds.testing.MockPolicy.USE_CODE):
    assert task_map['mnist_mlp'].load().x_train.shape == (8, 28, 28, 1)
  with pytest.raises(data.DatasetNotPreparedError, match='tfds build mnist'):
    task_map['mnist_mlp'].load()
