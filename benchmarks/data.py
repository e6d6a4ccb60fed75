"""Every dataset of the benchmarks, as numpy arrays, nothing downloaded.

MNIST-1D (the ``mnist1d`` package's defaults: 4000 / 1000 signals of 40 samples, cached);
Friedman #1 (``10 sin(π x1 x2) + 20 (x3 − 0.5)² + 10 x4 + 5 x5 + N(0, 1)``); the characters
of 40 Python standard-library modules, split 90/10; TFDS image datasets with ``image`` and
``label`` features (``TFDS_DATASETS``), read with ``tfds.data_source`` from a ``data_dir``
prepared beforehand in the ``array_record`` format (no TensorFlow needed to read it).

Example:
  >>> from benchmarks import data
  >>> data.load_mnist1d().x_train.shape
  (4000, 40)
"""

from __future__ import annotations

import dataclasses
import functools
import os
import pathlib
import sysconfig

import numpy as np

MNIST1D = 'mnist1d'
TFDS_DATASETS = ('mnist', 'fashion_mnist', 'cifar10')
CACHE_DIR = os.path.join(os.environ.get('XDG_CACHE_HOME', '~/.cache'), 'f3eo_jax')
STDLIB_FILES = tuple(
  sorted(
    f'{m}.py'
    for m in """abc argparse ast base64 bisect calendar contextlib copy csv dataclasses difflib enum
    fnmatch fractions functools glob gzip heapq inspect ipaddress keyword linecache numbers
    operator os pprint queue random shlex shutil statistics string tempfile textwrap threading
    tokenize traceback typing warnings weakref""".split()
  )
)


def _cut(n: int, fraction: float) -> int:
  if not 0 < fraction < 1:
    raise ValueError(f'fraction must be in (0, 1), got {fraction}.')
  return n - int(round(n * fraction))


@dataclasses.dataclass(frozen=True)
class Dataset:
  """Arrays in memory: ``x_*`` float32, ``y_*`` int32 labels (float32 targets if no classes)."""

  name: str
  x_train: np.ndarray
  y_train: np.ndarray
  x_test: np.ndarray
  y_test: np.ndarray
  num_classes: int

  def validation_split(self, fraction: float = 0.1) -> Dataset:
    """The last ``fraction`` of the training split becomes the test split."""
    cut, x, y = _cut(len(self.y_train), fraction), self.x_train, self.y_train
    return Dataset(f'{self.name}/validation', x[:cut], y[:cut], x[cut:], y[cut:], self.num_classes)


def load_mnist1d(seed: int = 42, cache_dir: str | None = CACHE_DIR) -> Dataset:
  """MNIST-1D with the package's default arguments (seed 42: the published set)."""
  path = cache_dir and os.path.expanduser(os.path.join(cache_dir, f'mnist1d_seed{seed}.npz'))
  if path and os.path.exists(path):
    with np.load(path) as f:
      arrays = {k: f[k] for k in f.files}
  else:
    from mnist1d.data import get_dataset_args, make_dataset

    args = get_dataset_args()
    args.seed = seed
    saved = np.random.get_state()  # make_dataset seeds numpy's global generator
    try:
      raw = make_dataset(args)
    finally:
      np.random.set_state(saved)
    arrays = dict(x_train=raw['x'], y_train=raw['y'], x_test=raw['x_test'], y_test=raw['y_test'])
    arrays = {k: v.astype(np.float32 if k[0] == 'x' else np.int32) for k, v in arrays.items()}
    if path:
      os.makedirs(os.path.dirname(path), exist_ok=True)
      tmp = f'{path}.{os.getpid()}.tmp.npz'  # atomic: concurrent runs never read half a file
      np.savez(tmp, **arrays)
      os.replace(tmp, path)
  return Dataset(name=MNIST1D, num_classes=10, **arrays)


class DatasetNotPreparedError(FileNotFoundError):
  """A TFDS dataset is not prepared in ``data_dir``; the message says how to prepare it."""


def _how_to_prepare(name: str, data_dir: str) -> str:
  return (
    f'TFDS dataset {name!r} is not prepared in data_dir={data_dir!r}, and nothing is downloaded'
    ' at run time. Prepare it once where there is network (TensorFlow is needed only then):\n'
    '  pip install tensorflow tensorflow-datasets\n'
    f'  tfds build {name} --data_dir {data_dir} --file_format array_record\n'
    f"or in Python: tfds.builder({name!r}, data_dir={data_dir!r}, file_format='array_record')"
    '.download_and_prepare()'
  )


def _read_split(source) -> tuple[np.ndarray, np.ndarray]:
  """Every example of a TFDS data source; uint8 images scaled to float32 in [0, 1]."""
  examples = [source[i] for i in range(len(source))]
  x = np.stack([np.asarray(e['image']) for e in examples])
  x = x.astype(np.float32) / (255.0 if x.dtype == np.uint8 else 1.0)
  return x, np.asarray([e['label'] for e in examples], dtype=np.int32)


def load_tfds(name: str, data_dir: str | None = None) -> Dataset:
  """Train and test splits of a prepared TFDS dataset (``data_dir``: ``$TFDS_DATA_DIR``).

  Raises:
    DatasetNotPreparedError: if ``data_dir`` does not hold the prepared dataset.
  """
  import tensorflow_datasets as tfds

  default = os.environ.get('TFDS_DATA_DIR', os.path.expanduser('~/tensorflow_datasets'))
  data_dir = data_dir or default
  if not os.path.isdir(data_dir):
    raise DatasetNotPreparedError(_how_to_prepare(name, data_dir))
  try:
    kw = dict(data_dir=data_dir, download=False, try_gcs=False)
    sources = tfds.data_source(name, split=['train', 'test'], **kw)
    num_classes = tfds.builder(name, data_dir=data_dir).info.features['label'].num_classes
  except (FileNotFoundError, NotImplementedError, AssertionError, ValueError) as e:
    raise DatasetNotPreparedError(_how_to_prepare(name, data_dir)) from e  # unprepared
  (x_train, y_train), (x_test, y_test) = map(_read_split, sources)
  return Dataset(name, x_train, y_train, x_test, y_test, int(num_classes))


def load_dataset(name: str = MNIST1D, *, data_dir: str | None = None) -> Dataset:
  """MNIST-1D generated locally, or the TFDS dataset ``name`` prepared in ``data_dir``."""
  return load_mnist1d() if name == MNIST1D else load_tfds(name, data_dir)


def batches(x: np.ndarray, y: np.ndarray, batch_size: int, seed: int, *, num_epochs=None):
  """Shuffled minibatches, reshuffled every epoch; the last partial batch is dropped."""
  n = len(x)
  if len(y) != n:
    raise ValueError(f'x and y differ in length: {n} and {len(y)}.')
  if not 0 < batch_size <= n:
    raise ValueError(f'batch_size must be in [1, {n}], got {batch_size}.')
  rng, epoch = np.random.default_rng(seed), 0
  while num_epochs is None or epoch < num_epochs:
    order = rng.permutation(n)
    for start in range(0, n - batch_size + 1, batch_size):
      yield x[order[start : start + batch_size]], y[order[start : start + batch_size]]
    epoch += 1


def friedman1_target(x: np.ndarray) -> np.ndarray:
  x1, x2, x3, x4, x5 = x[:, :5].T
  return 10 * np.sin(np.pi * x1 * x2) + 20 * (x3 - 0.5) ** 2 + 10 * x4 + 5 * x5


def friedman1(n: int, seed: int, noise: float = 1.0, num_features: int = 10):
  """``n`` draws: ``x ~ U[0, 1]^num_features``, ``y = f(x) + noise·N(0, 1)``."""
  rng = np.random.default_rng(seed)
  x = rng.uniform(size=(n, num_features))
  y = friedman1_target(x) + noise * rng.normal(size=n)
  return x.astype(np.float32), y.astype(np.float32)


@functools.lru_cache(maxsize=4)
def friedman1_scale(n_train: int = 2000, seed: int = 0) -> tuple[float, float]:
  """Mean and standard deviation of the training targets (float32 rounded)."""
  _, y = friedman1(n_train, seed)
  return float(np.float32(y.mean())), float(np.float32(y.std()))


@functools.lru_cache(maxsize=4)
def load_friedman1(n_train: int = 2000, n_test: int = 1000, seed: int = 0) -> Dataset:
  """Train (seed) and test (seed + 1) draws, targets standardised by the training set."""
  (x_train, y_train), (x_test, y_test) = friedman1(n_train, seed), friedman1(n_test, seed + 1)
  mean, std = friedman1_scale(n_train, seed)
  return Dataset('friedman1', x_train, (y_train - mean) / std, x_test, (y_test - mean) / std, 0)


@dataclasses.dataclass(frozen=True)
class TextData:
  """A character corpus as ids; id ``len(vocab)`` is a character never seen in training."""

  name: str
  train_tokens: np.ndarray
  eval_tokens: np.ndarray
  vocab: str
  seq_len: int
  num_eval_windows: int = 256

  vocab_size = property(lambda self: len(self.vocab) + 1)

  @functools.cached_property
  def test_windows(self) -> tuple[np.ndarray, np.ndarray]:
    """``num_eval_windows`` non-overlapping held-out windows, evenly spaced, and their targets."""
    fit = (len(self.eval_tokens) - 1) // self.seq_len
    if fit < 1:
      raise ValueError(f'held-out text of {len(self.eval_tokens)} tokens is shorter than a window.')
    count = min(self.num_eval_windows, fit)
    starts = self.seq_len * np.unique(np.linspace(0, fit - 1, count).round().astype(int))
    idx = starts[:, None] + np.arange(self.seq_len + 1)
    return self.eval_tokens[idx[:, :-1]], self.eval_tokens[idx[:, 1:]]

  x_test = property(lambda self: self.test_windows[0])
  y_test = property(lambda self: self.test_windows[1])

  def validation_split(self, fraction: float = 0.1) -> TextData:
    cut, tokens = _cut(len(self.train_tokens), fraction), self.train_tokens
    name = f'{self.name}/validation'
    return dataclasses.replace(self, name=name, train_tokens=tokens[:cut], eval_tokens=tokens[cut:])


def read_stdlib_corpus(files: tuple[str, ...] = STDLIB_FILES) -> str:
  root = sysconfig.get_paths()['stdlib']
  return ''.join(pathlib.Path(root, name).read_text(encoding='utf-8') for name in files)


def encode(text: str, vocab: str) -> np.ndarray:
  table = {c: i for i, c in enumerate(vocab)}
  return np.fromiter((table.get(c, len(vocab)) for c in text), dtype=np.int32, count=len(text))


@functools.lru_cache(maxsize=4)
def load_char_corpus(seq_len: int = 64, num_eval_windows: int = 256) -> TextData:
  """Standard-library source, a contiguous 90/10 split, the vocabulary from the training part."""
  text = read_stdlib_corpus()
  cut = _cut(len(text), 0.1)
  vocab = ''.join(sorted(set(text[:cut])))
  tokens = encode(text, vocab)
  return TextData('stdlib_chars', tokens[:cut], tokens[cut:], vocab, seq_len, num_eval_windows)


def text_batches(data: TextData, batch_size: int, seed: int):
  """Windows of the training text at uniform random starts, forever."""
  rng, offsets = np.random.default_rng(seed), np.arange(data.seq_len + 1)
  high = len(data.train_tokens) - data.seq_len
  if high < 1:
    raise ValueError(f'training text of {len(data.train_tokens)} tokens is shorter than a window.')
  while True:
    chunk = data.train_tokens[rng.integers(0, high, size=batch_size)[:, None] + offsets]
    yield chunk[:, :-1], chunk[:, 1:]


def take_train(data, n: int | None):
  """The data with only the first ``n`` training examples (characters for text)."""
  if n is None:
    return data
  if isinstance(data, TextData):
    return dataclasses.replace(data, train_tokens=data.train_tokens[:n])
  return dataclasses.replace(data, x_train=data.x_train[:n], y_train=data.y_train[:n])
