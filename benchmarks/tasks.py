"""The benchmark tasks: each one a dataset, a model, a loss and a metric, all offline.

A :class:`Task` is plain data; the training harness (``benchmarks/training.py``) knows
nothing task-specific beyond it. All four tasks are small enough for 2 CPU cores:

- ``mnist1d_mlp``, ``mnist1d_cnn``: MNIST-1D (generated locally by the ``mnist1d``
  package; 4000 train / 1000 test signals of length 40, 10 classes) with an MLP 512-512
  and a 1-D CNN with batch norm and dropout. Metric: test accuracy. The dataset's paper
  reports test accuracies of about 32% (logistic regression), 68% (MLP) and 94% (CNN).
  ``dataset='mnist'``, ``'fashion_mnist'`` or ``'cifar10'`` (with ``data_dir``) swaps in a
  prepared TFDS dataset; see ``benchmarks/data.py``.
- ``regression``: Friedman #1 (Friedman 1991), ``y = 10 sin(π x1 x2) + 20 (x3 − 0.5)² +
  10 x4 + 5 x5 + ε``, ``x ~ U[0, 1]^10`` (five inputs are pure noise), ``ε ~ N(0, 1)``,
  generated with numpy from a fixed seed: 2000 train / 1000 test. A tanh MLP 10-64-64-1
  is trained on targets standardised with the training set's mean and standard deviation;
  the metric is the test MSE in the original units of ``y`` (the noise alone gives 1.0).
- ``char_lm``: a character-level causal transformer (2 layers, d_model 64, 4 heads,
  context 64) on real text available offline: the source of a fixed, sorted list of
  Python standard-library modules (:data:`STDLIB_FILES`, read from
  ``sysconfig.get_paths()['stdlib']``), split 90/10 by characters into training and
  held-out text. The vocabulary is the training text's characters plus one id for
  characters never seen in training. Metric: mean loss in nats per character on a fixed
  set of held-out windows (lower is better).

Example:
  >>> from benchmarks import tasks
  >>> task = tasks.get('regression')
  >>> data = task.load()
  >>> data.x_train.shape, data.x_test.shape, task.higher_is_better
  ((2000, 10), (1000, 10), False)
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
import os
import sysconfig
from collections.abc import Callable, Iterator, Mapping
from typing import Any, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from benchmarks import data as data_lib
from benchmarks import models

# Test accuracies published with MNIST-1D (Greydanus & Kobak).
MNIST1D_PUBLISHED = {'logistic regression': 0.32, 'MLP': 0.68, 'CNN': 0.94}

# The char_lm corpus: standard-library modules present as single files from Python 3.10
# to 3.13, read in this (sorted) order.
STDLIB_FILES = tuple(
  sorted(
    (
      'abc.py',
      'argparse.py',
      'ast.py',
      'base64.py',
      'bisect.py',
      'calendar.py',
      'contextlib.py',
      'copy.py',
      'csv.py',
      'dataclasses.py',
      'difflib.py',
      'enum.py',
      'fnmatch.py',
      'fractions.py',
      'functools.py',
      'glob.py',
      'gzip.py',
      'heapq.py',
      'inspect.py',
      'ipaddress.py',
      'keyword.py',
      'linecache.py',
      'numbers.py',
      'operator.py',
      'os.py',
      'pprint.py',
      'queue.py',
      'random.py',
      'shlex.py',
      'shutil.py',
      'statistics.py',
      'string.py',
      'tempfile.py',
      'textwrap.py',
      'threading.py',
      'tokenize.py',
      'traceback.py',
      'typing.py',
      'warnings.py',
      'weakref.py',
    )
  )
)


# ----------------------------------------------------------------------------- text data


@dataclasses.dataclass(frozen=True)
class TextData:
  """A character corpus as token ids, split into training and held-out text.

  Attributes:
    name: the corpus's name.
    train_tokens: int32 ids of the training text.
    eval_tokens: int32 ids of the held-out text (the last part of the corpus).
    vocab: the characters of ids ``0 .. len(vocab) − 1``; id ``len(vocab)`` is unknown.
    seq_len: the model's context length.
    num_eval_windows: how many windows of the held-out text the metric averages over.
  """

  name: str
  train_tokens: np.ndarray
  eval_tokens: np.ndarray
  vocab: str
  seq_len: int
  num_eval_windows: int = 256

  @property
  def vocab_size(self) -> int:
    return len(self.vocab) + 1

  @property
  def x_test(self) -> np.ndarray:
    """The fixed held-out windows: inputs ``(N, seq_len)``, evenly spaced over the text."""
    return _windows(self.eval_tokens, self.seq_len, self.num_eval_windows)[0]

  @property
  def y_test(self) -> np.ndarray:
    """The next characters of :attr:`x_test`."""
    return _windows(self.eval_tokens, self.seq_len, self.num_eval_windows)[1]

  @property
  def num_train(self) -> int:
    return len(self.train_tokens)

  def validation_split(self, fraction: float = 0.1) -> TextData:
    """The last ``fraction`` of the training text becomes the held-out text."""
    if not 0 < fraction < 1:
      raise ValueError(f'fraction must be in (0, 1), got {fraction}.')
    cut = len(self.train_tokens) - int(round(len(self.train_tokens) * fraction))
    return dataclasses.replace(
      self,
      name=f'{self.name}/validation',
      train_tokens=self.train_tokens[:cut],
      eval_tokens=self.train_tokens[cut:],
    )


def _windows(tokens: np.ndarray, seq_len: int, count: int) -> tuple[np.ndarray, np.ndarray]:
  """``count`` non-overlapping windows, evenly spaced (all of them if fewer fit)."""
  fit = (len(tokens) - 1) // seq_len
  if fit < 1:
    raise ValueError(
      f'held-out text of {len(tokens)} tokens is shorter than a window of {seq_len + 1}.'
    )
  starts = seq_len * np.unique(np.linspace(0, fit - 1, min(count, fit)).round().astype(int))
  idx = starts[:, None] + np.arange(seq_len + 1)
  return tokens[idx[:, :-1]], tokens[idx[:, 1:]]


def read_stdlib_corpus(files: tuple[str, ...] = STDLIB_FILES) -> str:
  """The concatenated source of ``files`` from this Python's standard library."""
  root = sysconfig.get_paths()['stdlib']
  parts = []
  for name in files:
    with open(os.path.join(root, name), encoding='utf-8') as f:
      parts.append(f.read())
  return '\n'.join(parts)


def encode(text: str, vocab: str) -> np.ndarray:
  """Character ids under ``vocab``; characters outside it get id ``len(vocab)``."""
  table = {c: i for i, c in enumerate(vocab)}
  unknown = len(vocab)
  return np.fromiter((table.get(c, unknown) for c in text), dtype=np.int32, count=len(text))


@functools.lru_cache(maxsize=4)
def load_char_corpus(
  seq_len: int = 64,
  num_eval_windows: int = 256,
  files: tuple[str, ...] = STDLIB_FILES,
  eval_fraction: float = 0.1,
) -> TextData:
  """The ``char_lm`` data: stdlib source, 90/10 contiguous split, vocabulary from train."""
  text = read_stdlib_corpus(files)
  cut = len(text) - int(round(len(text) * eval_fraction))
  vocab = ''.join(sorted(set(text[:cut])))
  tokens = encode(text, vocab)
  return TextData(
    name='stdlib_chars',
    train_tokens=tokens[:cut],
    eval_tokens=tokens[cut:],
    vocab=vocab,
    seq_len=seq_len,
    num_eval_windows=num_eval_windows,
  )


def text_batches(
  data: TextData, batch_size: int, seed: int
) -> Iterator[tuple[np.ndarray, np.ndarray]]:
  """Random windows of the training text (uniform start positions), forever."""
  rng = np.random.default_rng(seed)
  offsets = np.arange(data.seq_len + 1)
  high = len(data.train_tokens) - data.seq_len
  if high < 1:
    raise ValueError(f'training text of {len(data.train_tokens)} tokens is shorter than a window.')
  while True:
    idx = rng.integers(0, high, size=batch_size)[:, None] + offsets
    chunk = data.train_tokens[idx]
    yield chunk[:, :-1], chunk[:, 1:]


# ----------------------------------------------------------------------------- Friedman #1


def friedman1_target(x: np.ndarray) -> np.ndarray:
  """The noise-free Friedman #1 function of the first five columns of ``x``."""
  return (
    10 * np.sin(np.pi * x[:, 0] * x[:, 1]) + 20 * (x[:, 2] - 0.5) ** 2 + 10 * x[:, 3] + 5 * x[:, 4]
  )


def friedman1(n: int, seed: int, noise: float = 1.0, num_features: int = 10):
  """``n`` draws of Friedman #1: ``x ~ U[0, 1]^num_features``, ``y = f(x) + noise·N(0, 1)``."""
  rng = np.random.default_rng(seed)
  x = rng.uniform(size=(n, num_features))
  y = friedman1_target(x) + noise * rng.normal(size=n)
  return x.astype(np.float32), y.astype(np.float32)


@functools.lru_cache(maxsize=4)
def load_friedman1(n_train: int = 2000, n_test: int = 1000, seed: int = 0) -> data_lib.Dataset:
  """Train and test draws of Friedman #1, targets standardised by the training set.

  The test set is drawn from the seed ``seed + 1``. ``y_mean`` and ``y_std`` to undo the
  standardisation are in :func:`friedman1_scale`.
  """
  x_train, y_train = friedman1(n_train, seed)
  x_test, y_test = friedman1(n_test, seed + 1)
  mean, std = friedman1_scale(n_train, seed)
  return data_lib.Dataset(
    name='friedman1',
    x_train=x_train,
    y_train=(y_train - mean) / std,
    x_test=x_test,
    y_test=(y_test - mean) / std,
    num_classes=0,
  )


@functools.lru_cache(maxsize=4)
def friedman1_scale(n_train: int = 2000, seed: int = 0) -> tuple[float, float]:
  """Mean and standard deviation of the training targets (float32 rounded)."""
  _, y = friedman1(n_train, seed)
  return float(np.float32(y.mean())), float(np.float32(y.std()))


# ----------------------------------------------------------------------------- tasks

Data = data_lib.Dataset | TextData


@dataclasses.dataclass(frozen=True)
class Task:
  """A dataset, a model, a loss and a metric.

  Attributes:
    name: the key, e.g. ``'mnist1d_cnn'``.
    label: a short title for reports.
    load: returns the task's data (a ``data.Dataset`` or a :class:`TextData`), with
      ``validation_split`` and the evaluation arrays ``x_test``, ``y_test``.
    make_model: ``data -> flax module`` with ``__call__(x, train)``.
    loss: ``(outputs, targets) -> per-example losses`` (any shape); training minimises
      their mean.
    metric_values: ``(outputs, targets) -> per-example values``; the metric is their mean
      over the evaluation set.
    metric: the metric's name, e.g. ``'test accuracy'``.
    metric_kind: ``'accuracy'`` (printed as a percentage) or ``'value'``.
    higher_is_better: the metric's direction.
    num_steps: the default number of optimizer steps.
    batch_size: examples per step.
    batches: ``(data, batch_size, seed) -> iterator of (x, y)`` numpy batches.
    lr_scale: multiplies every variant's default learning rate and sweep (the hook for
      tasks that want smaller or larger learning rates).
    references: published results to quote beside the metric (name -> value).
    description: one paragraph for reports.
    meta: the builder's arguments (sizes, steps, dataset), for reports and cache keys.
  """

  name: str
  label: str
  load: Callable[[], Data]
  make_model: Callable[[Data], nn.Module]
  loss: Callable[[jax.Array, jax.Array], jax.Array]
  metric_values: Callable[[jax.Array, jax.Array], jax.Array]
  metric: str
  metric_kind: str
  higher_is_better: bool
  num_steps: int
  batch_size: int
  batches: Callable[[Data, int, int], Iterator[tuple[np.ndarray, np.ndarray]]]
  lr_scale: float = 1.0
  references: Mapping[str, float] = dataclasses.field(default_factory=dict)
  description: str = ''
  meta: Mapping[str, Any] = dataclasses.field(default_factory=dict)

  def __hash__(self) -> int:
    return hash((self.name, tuple(sorted((k, repr(v)) for k, v in self.meta.items()))))

  def model_key(self) -> tuple[str, str]:
    """What the compiled steps depend on: the name and the sizes (not steps, batch, lr)."""
    skip = ('num_steps', 'batch_size', 'lr_scale')
    return self.name, repr(sorted((k, v) for k, v in self.meta.items() if k not in skip))

  def better(self, a: float, b: float) -> bool:
    """Whether metric value ``a`` is strictly better than ``b`` (NaN is never better)."""
    if not np.isfinite(a):
      return False
    if not np.isfinite(b):
      return True
    return a > b if self.higher_is_better else a < b

  def worst(self) -> float:
    """The value a diverged run scores."""
    return -np.inf if self.higher_is_better else np.inf


def array_batches(data: data_lib.Dataset, batch_size: int, seed: int):
  """Shuffled minibatches of an in-memory dataset, reshuffled every epoch."""
  return data_lib.batches(data.x_train, data.y_train, batch_size, seed=seed)


def take_train(data: Data, n: int | None) -> Data:
  """The data with only the first ``n`` training examples (characters for text)."""
  if n is None:
    return data
  if isinstance(data, TextData):
    return dataclasses.replace(data, train_tokens=data.train_tokens[:n])
  return dataclasses.replace(data, x_train=data.x_train[:n], y_train=data.y_train[:n])


def _xent(logits, labels):
  return optax.softmax_cross_entropy_with_integer_labels(logits, labels)


def _correct(logits, labels):
  return (jnp.argmax(logits, -1) == labels).astype(jnp.float32)


def _sizes_as_meta(builder: Callable[..., Task]) -> Callable[..., Task]:
  """Records every argument of a task builder (defaults included) in the task's ``meta``."""

  @functools.wraps(builder)
  def build(*args: Any, **kwargs: Any) -> Task:
    bound = inspect.signature(builder).bind(*args, **kwargs)
    bound.apply_defaults()
    return dataclasses.replace(builder(*args, **kwargs), meta=dict(bound.arguments))

  return build


class _Metric(NamedTuple):
  """The loss and metric fields of a :class:`Task`."""

  loss: Callable[[jax.Array, jax.Array], jax.Array]
  metric_values: Callable[[jax.Array, jax.Array], jax.Array]
  metric: str
  metric_kind: str
  higher_is_better: bool


ACCURACY = _Metric(_xent, _correct, 'test accuracy', 'accuracy', True)
NATS_PER_CHAR = _Metric(_xent, _xent, 'held-out loss (nats/char)', 'value', False)


@_sizes_as_meta
def classification(
  model: str = 'mlp',
  *,
  dataset: str = data_lib.MNIST1D,
  data_dir: str | None = None,
  hidden: tuple[int, ...] = (512, 512),
  channels: tuple[int, ...] = (32, 64),
  dense: int = 128,
  dropout_rate: float = 0.1,
  num_steps: int = 1000,
  batch_size: int = 128,
) -> Task:
  """MNIST-1D (or a prepared TFDS dataset) with the MLP or the CNN; metric test accuracy."""
  if model == 'mlp':
    make = lambda d: models.MLP(hidden=hidden, num_classes=d.num_classes)
    arch = f'MLP {"-".join(map(str, hidden))}'
  elif model == 'cnn':
    make = lambda d: models.CNN(
      num_classes=d.num_classes, channels=channels, dense=dense, dropout_rate=dropout_rate
    )
    arch = (
      f'CNN (channels {", ".join(map(str, channels))}, dense {dense}, dropout {dropout_rate:g})'
    )
  else:
    raise ValueError(f"model must be 'mlp' or 'cnn', got {model!r}.")
  refs = {k: v for k, v in MNIST1D_PUBLISHED.items() if dataset == data_lib.MNIST1D}
  return Task(
    name=f'{dataset}_{model}',
    label=f'{dataset.upper() if dataset != "mnist1d" else "MNIST-1D"} {model.upper()}',
    load=functools.partial(data_lib.load_dataset, dataset, data_dir=data_dir),
    make_model=make,
    **ACCURACY._asdict(),
    num_steps=num_steps,
    batch_size=batch_size,
    batches=array_batches,
    references=refs,
    description=f'{arch} on {dataset}, cross-entropy loss; metric: accuracy on the test split.',
  )


@_sizes_as_meta
def regression(
  *,
  hidden: tuple[int, ...] = (64, 64),
  n_train: int = 2000,
  n_test: int = 1000,
  seed: int = 0,
  num_steps: int = 2000,
  batch_size: int = 128,
) -> Task:
  """Friedman #1 with a tanh MLP; MSE loss on standardised targets, test MSE in y's units."""
  _, std = friedman1_scale(n_train, seed)
  squared_error = lambda out, y: (out[:, 0] - y) ** 2
  in_units_of_y = lambda out, y: std**2 * squared_error(out, y)
  mse = _Metric(squared_error, in_units_of_y, 'test MSE', 'value', False)
  return Task(
    name='regression',
    label='Friedman #1 regression',
    load=functools.partial(load_friedman1, n_train, n_test, seed),
    make_model=lambda d: models.MLP(hidden=hidden, num_classes=1, activation=nn.tanh),
    **mse._asdict(),
    num_steps=num_steps,
    batch_size=batch_size,
    batches=array_batches,
    references={'noise floor (σ² of ε)': 1.0},
    description=(
      f'Friedman #1 (x ~ U[0,1]^10, noise N(0,1)), {n_train} train / {n_test} test, tanh MLP'
      f' 10-{"-".join(map(str, hidden))}-1, MSE on targets standardised with the training'
      ' mean and std; metric: test MSE in the original units (noise alone gives 1.0).'
    ),
  )


@_sizes_as_meta
def char_lm(
  *,
  d_model: int = 64,
  n_layer: int = 2,
  n_head: int = 4,
  seq_len: int = 64,
  num_eval_windows: int = 256,
  num_steps: int = 400,
  batch_size: int = 32,
  lr_scale: float = 1.0,
) -> Task:
  """A character-level GPT on Python standard-library source; metric held-out nats/char."""
  return Task(
    name='char_lm',
    label='char LM (stdlib source)',
    load=functools.partial(load_char_corpus, seq_len, num_eval_windows),
    make_model=lambda d: models.GPT(
      vocab_size=d.vocab_size, seq_len=seq_len, d_model=d_model, n_layer=n_layer, n_head=n_head
    ),
    **NATS_PER_CHAR._asdict(),
    num_steps=num_steps,
    batch_size=batch_size,
    batches=text_batches,
    lr_scale=lr_scale,
    description=(
      f'causal transformer ({n_layer} layers, d_model {d_model}, {n_head} heads, context'
      f' {seq_len}) on the source of {len(STDLIB_FILES)} Python standard-library modules,'
      ' split 90/10 by characters; metric: mean cross-entropy (nats/char) on'
      f' {num_eval_windows} fixed held-out windows.'
    ),
  )


# Tiny models for smoke runs and tests: seconds instead of minutes.
SMOKE_SIZES = {
  'mnist1d_mlp': dict(hidden=(16,)),
  'mnist1d_cnn': dict(channels=(4, 8), dense=16),
  'regression': dict(hidden=(8,), n_train=256, n_test=64),
  'char_lm': dict(d_model=16, n_layer=1, n_head=2, seq_len=16, num_eval_windows=16),
}
CLASSIFICATION_TASKS = ('mnist1d_mlp', 'mnist1d_cnn')  # these take dataset= and data_dir=
TASKS: dict[str, Callable[..., Task]] = {
  'mnist1d_mlp': functools.partial(classification, 'mlp'),
  'mnist1d_cnn': functools.partial(classification, 'cnn'),
  'regression': regression,
  'char_lm': char_lm,
}


def get(name: str, **kwargs: Any) -> Task:
  """The task ``name`` built with ``kwargs`` (sizes, steps; see the builders).

  Raises:
    KeyError: for an unknown name.
  """
  try:
    builder = TASKS[name]
  except KeyError:
    raise KeyError(f'unknown task {name!r}; known: {sorted(TASKS)}') from None
  return builder(**kwargs)


def add_arguments(parser) -> None:
  """The command-line options that choose and size tasks (``--tasks``, ``--dataset``...)."""
  parser.add_argument(
    '--tasks',
    nargs='+',
    default=None,
    choices=sorted(TASKS),
    metavar='TASK',
    help=f'among {sorted(TASKS)}',
  )
  parser.add_argument(
    '--dataset',
    default=data_lib.MNIST1D,
    help="the classification tasks' dataset: mnist1d (generated locally) or a"
    ' TFDS dataset prepared in --data-dir (mnist, fashion_mnist, cifar10)',
  )
  parser.add_argument('--data-dir', default=None, help='TFDS data directory (TFDS datasets only)')
  parser.add_argument('--steps', type=int, default=None, help="override every task's step count")


def build(names, args, sizes: Mapping[str, Mapping[str, Any]] | None = None) -> dict[str, Task]:
  """The tasks ``names`` with ``sizes[name]`` keyword arguments and the options of ``args``.

  Returns:
    ``{task.name: task}`` (a classification task on ``--dataset mnist`` is ``'mnist_mlp'``).
  """
  out = {}
  for name in names:
    kwargs = dict((sizes or {}).get(name, {}))
    if name in CLASSIFICATION_TASKS:
      kwargs.update(dataset=args.dataset, data_dir=args.data_dir)
    if args.steps is not None:
      kwargs['num_steps'] = args.steps
    task = get(name, **kwargs)
    out[task.name] = task
  return out
