"""Datasets for the benchmarks, as numpy arrays, with nothing downloaded at run time.

- ``'mnist1d'`` (the default): MNIST-1D, generated locally by the ``mnist1d`` package
  with its default arguments (the published benchmark: 4000 train / 1000 test
  signals of 40 samples, 10 classes, seed 42), cached as an ``.npz``.
- Any TFDS image-classification dataset with ``image`` and ``label`` features
  (``'mnist'``, ``'fashion_mnist'``, ``'cifar10'``), read with ``tfds.data_source``
  from a data directory prepared beforehand in the ``array_record`` format (no
  TensorFlow needed to read it). An absent or unprepared directory raises
  :class:`DatasetNotPreparedError`, which says how to prepare it.

Example:
  >>> from benchmarks import data
  >>> ds = data.load_dataset('mnist1d')
  >>> ds.x_train.shape, ds.x_test.shape, ds.num_classes
  ((4000, 40), (1000, 40), 10)
  >>> x, y = next(data.batches(ds.x_train, ds.y_train, batch_size=32, seed=0))
  >>> x.shape, y.shape
  ((32, 40), (32,))
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Iterator

import numpy as np

MNIST1D = 'mnist1d'
TFDS_DATASETS = ('mnist', 'fashion_mnist', 'cifar10')
DEFAULT_CACHE_DIR = os.path.join(
  os.environ.get('XDG_CACHE_HOME', os.path.expanduser('~/.cache')), 'f3eo_jax'
)


class DatasetNotPreparedError(FileNotFoundError):
  """Raised when a TFDS dataset has not been prepared in ``data_dir``."""


@dataclasses.dataclass(frozen=True)
class Dataset:
  """A classification (or regression) dataset held in memory.

  Attributes:
    name: the dataset's name.
    x_train: float32 inputs, ``(N, L)`` signals or ``(N, H, W, C)`` images.
    y_train: int32 labels, ``(N,)`` (float32 targets for a regression).
    x_test: float32 inputs of the test split.
    y_test: int32 labels of the test split.
    num_classes: number of classes (0 for a regression).
  """

  name: str
  x_train: np.ndarray
  y_train: np.ndarray
  x_test: np.ndarray
  y_test: np.ndarray
  num_classes: int

  def validation_split(self, fraction: float = 0.1) -> Dataset:
    """Returns a dataset whose test split is the last ``fraction`` of the train split.

    Used to pick hyperparameters without looking at the test set.

    Args:
      fraction: share of the training examples held out, in ``(0, 1)``.

    Returns:
      A :class:`Dataset` named ``'<name>/validation'``.
    """
    if not 0 < fraction < 1:
      raise ValueError(f'fraction must be in (0, 1), got {fraction}.')
    n_val = int(round(len(self.y_train) * fraction))
    cut = len(self.y_train) - n_val
    return Dataset(
      name=f'{self.name}/validation',
      x_train=self.x_train[:cut],
      y_train=self.y_train[:cut],
      x_test=self.x_train[cut:],
      y_test=self.y_train[cut:],
      num_classes=self.num_classes,
    )


def _mnist1d_arrays(seed: int) -> dict[str, np.ndarray]:
  """Generates MNIST-1D with the package's default arguments (no download)."""
  from mnist1d.data import get_dataset_args, make_dataset

  args = get_dataset_args()
  args.seed = seed
  # make_dataset seeds numpy's global generator; keep the caller's stream intact.
  saved = np.random.get_state()
  try:
    raw = make_dataset(args)
  finally:
    np.random.set_state(saved)
  return {
    'x_train': raw['x'].astype(np.float32),
    'y_train': raw['y'].astype(np.int32),
    'x_test': raw['x_test'].astype(np.float32),
    'y_test': raw['y_test'].astype(np.int32),
  }


def load_mnist1d(seed: int = 42, cache_dir: str | None = DEFAULT_CACHE_DIR) -> Dataset:
  """MNIST-1D, generated locally and cached; deterministic given ``seed``.

  The package's defaults give the published benchmark (seed 42): 5000 signals of
  length 40, split 4000/1000, standardised over the whole set. Nothing is downloaded.

  Args:
    seed: the generator's seed; 42 is the published dataset.
    cache_dir: where to keep ``mnist1d_seed{seed}.npz``; ``None`` disables the cache.

  Returns:
    A :class:`Dataset` with ``(N, 40)`` float32 signals.
  """
  path = None if cache_dir is None else os.path.join(cache_dir, f'mnist1d_seed{seed}.npz')
  if path is not None and os.path.exists(path):
    with np.load(path) as f:
      arrays = {k: f[k] for k in f.files}
  else:
    arrays = _mnist1d_arrays(seed)
    if path is not None:
      os.makedirs(cache_dir, exist_ok=True)
      tmp = f'{path}.{os.getpid()}.tmp.npz'  # atomic: concurrent runs never read half a file
      np.savez(tmp, **arrays)
      os.replace(tmp, path)
  return Dataset(name=MNIST1D, num_classes=10, **arrays)


def _how_to_prepare(name: str, data_dir: str) -> str:
  return (
    f'TFDS dataset {name!r} is not prepared in data_dir={data_dir!r}, and this loader'
    ' never downloads at run time. Prepare it once on a machine with network access'
    ' (TensorFlow is needed only for that step), then copy the directory here:\n'
    '  pip install tensorflow tensorflow-datasets\n'
    f'  tfds build {name} --data_dir {data_dir} --file_format array_record\n'
    'or, in Python:\n'
    f"  tfds.builder({name!r}, data_dir={data_dir!r}, file_format='array_record')"
    '.download_and_prepare()'
  )


def _read_split(source) -> tuple[np.ndarray, np.ndarray]:
  """Reads every example of a TFDS data source into stacked image and label arrays."""
  examples = [source[i] for i in range(len(source))]
  images = np.stack([np.asarray(e['image']) for e in examples])
  labels = np.asarray([e['label'] for e in examples], dtype=np.int32)
  return images, labels


def _scale_images(images: np.ndarray) -> np.ndarray:
  """uint8 images to float32 in [0, 1]; other dtypes just cast to float32."""
  if images.dtype == np.uint8:
    return images.astype(np.float32) / 255.0
  return images.astype(np.float32)


def load_tfds(name: str, data_dir: str | None = None) -> Dataset:
  """An image-classification dataset from a prepared TFDS ``array_record`` directory.

  Args:
    name: a TFDS name with ``image`` and ``label`` features, e.g. ``'mnist'``.
    data_dir: the TFDS data directory; defaults to ``$TFDS_DATA_DIR`` or
      ``~/tensorflow_datasets``.

  Returns:
    A :class:`Dataset` with float32 images in ``[0, 1]`` of shape ``(N, H, W, C)``.

  Raises:
    DatasetNotPreparedError: if ``data_dir`` does not hold the prepared dataset.
  """
  import tensorflow_datasets as tfds

  if data_dir is None:
    data_dir = os.environ.get('TFDS_DATA_DIR', os.path.expanduser('~/tensorflow_datasets'))
  if not os.path.isdir(data_dir):
    raise DatasetNotPreparedError(_how_to_prepare(name, data_dir))
  try:
    sources = tfds.data_source(
      name, split=['train', 'test'], data_dir=data_dir, download=False, try_gcs=False
    )
    builder = tfds.builder(name, data_dir=data_dir)
    num_classes = builder.info.features['label'].num_classes
  except (FileNotFoundError, NotImplementedError, AssertionError, ValueError) as e:
    # An unprepared dataset surfaces as one of these, with a message about file formats.
    raise DatasetNotPreparedError(_how_to_prepare(name, data_dir)) from e
  (x_train, y_train), (x_test, y_test) = (_read_split(s) for s in sources)
  return Dataset(
    name=name,
    x_train=_scale_images(x_train),
    y_train=y_train,
    x_test=_scale_images(x_test),
    y_test=y_test,
    num_classes=int(num_classes),
  )


def load_dataset(
  name: str = MNIST1D,
  *,
  data_dir: str | None = None,
  cache_dir: str | None = DEFAULT_CACHE_DIR,
) -> Dataset:
  """Loads ``name``: MNIST-1D generated locally, or a prepared TFDS dataset.

  Args:
    name: ``'mnist1d'`` or a TFDS name (``'mnist'``, ``'fashion_mnist'``, ``'cifar10'``).
    data_dir: the TFDS data directory (ignored for MNIST-1D).
    cache_dir: the MNIST-1D cache directory, or ``None`` for no cache.

  Returns:
    A :class:`Dataset`.
  """
  if name == MNIST1D:
    return load_mnist1d(cache_dir=cache_dir)
  return load_tfds(name, data_dir=data_dir)


def batches(
  x: np.ndarray,
  y: np.ndarray,
  batch_size: int,
  seed: int,
  *,
  num_epochs: int | None = None,
) -> Iterator[tuple[np.ndarray, np.ndarray]]:
  """Shuffled minibatches, reshuffled every epoch; the last partial batch is dropped.

  Args:
    x: inputs, first axis the examples.
    y: labels, like ``x`` along the first axis.
    batch_size: examples per batch, at most ``len(x)``.
    seed: seeds the shuffling; the same seed gives the same sequence of batches.
    num_epochs: stop after this many epochs; ``None`` runs forever.

  Yields:
    ``(x_batch, y_batch)`` numpy arrays.
  """
  n = len(x)
  if len(y) != n:
    raise ValueError(f'x and y differ in length: {n} and {len(y)}.')
  if not 0 < batch_size <= n:
    raise ValueError(f'batch_size must be in [1, {n}], got {batch_size}.')
  rng = np.random.default_rng(seed)
  epoch = 0
  while num_epochs is None or epoch < num_epochs:
    order = rng.permutation(n)
    for start in range(0, n - batch_size + 1, batch_size):
      idx = order[start : start + batch_size]
      yield x[idx], y[idx]
    epoch += 1
