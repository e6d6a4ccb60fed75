"""The selection tasks: a dataset, a model, a loss and a metric each, all offline.

``mnist1d_mlp``, ``mnist1d_cnn`` (MNIST-1D, an MLP 512-512 and a 1-D CNN with batch norm and
dropout; test accuracy); ``regression`` (Friedman #1, a tanh MLP 10-64-64-1 on standardised
targets; test MSE in the units of ``y``, noise alone gives 1.0); ``char_lm`` (a 2-layer
character-level transformer on standard-library source; held-out nats per character).

Example:
  >>> from benchmarks import tasks
  >>> tasks.get('regression').load().x_train.shape
  (2000, 10)
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable, Mapping
from typing import Any

import flax.linen as nn
import jax.numpy as jnp
import numpy as np
import optax

from benchmarks import data as data_lib
from benchmarks import models

MNIST1D_PUBLISHED = {'logistic regression': 0.32, 'MLP': 0.68, 'CNN': 0.94}


@dataclasses.dataclass(frozen=True)
class Task:
  """A dataset, a model, a loss and a metric, as data.

  ``loss`` and ``metric_values`` map ``(outputs, targets)`` to per-example values; training
  minimises the mean loss, the metric is the mean over the test (or validation) split.
  ``batches(data, batch_size, seed)`` yields numpy ``(x, y)``; ``lr_scale`` multiplies
  every variant's learning rates; ``meta`` holds the builder's arguments.
  """

  name: str
  label: str
  load: Callable[[], Any]
  make_model: Callable[[Any], nn.Module]
  loss: Callable
  metric_values: Callable
  metric: str
  metric_kind: str  # 'accuracy' (a percentage) or 'value'
  higher_is_better: bool
  num_steps: int
  batch_size: int
  batches: Callable
  lr_scale: float = 1.0
  references: Mapping[str, float] = dataclasses.field(default_factory=dict)
  description: str = ''
  meta: Mapping[str, Any] = dataclasses.field(default_factory=dict)

  def model_key(self) -> tuple[str, str]:
    """What a compiled step depends on: the name and the sizes (not steps, batch, lr)."""
    skip = ('num_steps', 'batch_size', 'lr_scale')
    return self.name, repr(sorted((k, v) for k, v in self.meta.items() if k not in skip))

  def better(self, a: float, b: float) -> bool:
    """Whether ``a`` is strictly better than ``b`` (a non-finite value never is)."""
    better = a > b if self.higher_is_better else a < b
    return bool(np.isfinite(a)) and (not np.isfinite(b) or better)

  def worst(self) -> float:
    return -np.inf if self.higher_is_better else np.inf


def array_batches(data: data_lib.Dataset, batch_size: int, seed: int):
  return data_lib.batches(data.x_train, data.y_train, batch_size, seed=seed)


xent = optax.softmax_cross_entropy_with_integer_labels


def correct(logits, labels):
  return (jnp.argmax(logits, -1) == labels).astype(jnp.float32)


ACCURACY = dict(loss=xent, metric_values=correct, metric='test accuracy', metric_kind='accuracy')
ACCURACY['higher_is_better'] = True
LOWER = dict(metric_kind='value', higher_is_better=False)


def classification(
  model='mlp',
  *,
  dataset=data_lib.MNIST1D,
  data_dir=None,
  hidden=(512, 512),
  channels=(32, 64),
  dense=128,
  dropout_rate=0.1,
  **sizes,
) -> Task:
  """MNIST-1D (or a TFDS dataset prepared in ``data_dir``) with the MLP or the CNN."""
  if model == 'mlp':
    make = lambda d: models.MLP(hidden=hidden, num_classes=d.num_classes)
  else:
    make = lambda d: models.CNN(d.num_classes, channels, dense, dropout_rate)
  sizes = {'num_steps': 1000, 'batch_size': 128, **sizes, 'batches': array_batches}
  mnist1d = dataset == data_lib.MNIST1D
  label = f'{"MNIST-1D" if mnist1d else dataset.upper()} {model.upper()}'
  load = functools.partial(data_lib.load_dataset, dataset, data_dir=data_dir)
  refs = MNIST1D_PUBLISHED if mnist1d else {}
  return Task(f'{dataset}_{model}', label, load, make, **ACCURACY, **sizes, references=refs)


def regression(*, hidden=(64, 64), n_train=2000, n_test=1000, seed=0, **sizes) -> Task:
  """Friedman #1 with a tanh MLP; MSE on standardised targets, test MSE in y's units."""
  std = data_lib.friedman1_scale(n_train, seed)[1]
  sq = lambda out, y: (out[:, 0] - y) ** 2
  metric = dict(loss=sq, metric_values=lambda out, y: std**2 * sq(out, y), metric='test MSE')
  return Task(
    'regression',
    'Friedman #1 regression',
    functools.partial(data_lib.load_friedman1, n_train, n_test, seed),
    lambda d: models.MLP(hidden=hidden, num_classes=1, activation=nn.tanh),
    **metric,
    **{'num_steps': 2000, 'batch_size': 128, **sizes, **LOWER, 'batches': array_batches},
    references={'noise floor (σ² of ε)': 1.0},
  )


def char_lm(*, d_model=64, n_layer=2, n_head=4, seq_len=64, num_eval_windows=256, **sizes) -> Task:
  """A character-level GPT on standard-library source; metric held-out nats per character."""
  return Task(
    'char_lm',
    'char LM (stdlib source)',
    functools.partial(data_lib.load_char_corpus, seq_len, num_eval_windows),
    lambda d: models.GPT(d.vocab_size, seq_len, d_model, n_layer, n_head),
    **dict(loss=xent, metric_values=xent, metric='held-out loss (nats/char)', **LOWER),
    **{'num_steps': 400, 'batch_size': 32, **sizes, 'batches': data_lib.text_batches},
  )


SMOKE_SIZES = {  # tiny models for smoke runs and tests: seconds instead of minutes
  'mnist1d_mlp': dict(hidden=(16,)),
  'mnist1d_cnn': dict(channels=(4, 8), dense=16),
  'regression': dict(hidden=(8,), n_train=256, n_test=64),
  'char_lm': dict(d_model=16, n_layer=1, n_head=2, seq_len=16, num_eval_windows=16),
}
TASKS: dict[str, Callable[..., Task]] = {
  'mnist1d_mlp': functools.partial(classification, 'mlp'),
  'mnist1d_cnn': functools.partial(classification, 'cnn'),
  'regression': regression,
  'char_lm': char_lm,
}


def get(name: str, builders: Mapping[str, Callable[..., Task]] = TASKS, **kwargs: Any) -> Task:
  """The task ``name`` built with ``kwargs``, which are recorded in its ``meta``."""
  if name not in builders:
    raise KeyError(f'unknown task {name!r}; known: {sorted(builders)}')
  return dataclasses.replace(builders[name](**kwargs), meta=dict(kwargs))


def add_arguments(parser) -> None:
  parser.add_argument('--tasks', nargs='+', metavar='TASK', help=f'among {sorted(TASKS)}')
  parser.add_argument('--steps', type=int, help="every task's step count")
  tfds_names = ', '.join(data_lib.TFDS_DATASETS)
  parser.add_argument('--dataset', default=data_lib.MNIST1D, help=f'mnist1d, or {tfds_names}')
  parser.add_argument('--data-dir', help='where the TFDS --dataset is prepared (array_record)')


def build(names, args, sizes=None, builders=TASKS) -> dict[str, Task]:
  """``{task.name: task}``, sized by ``sizes[name]``, ``args``' steps, dataset and data_dir."""
  steps = {} if getattr(args, 'steps', None) is None else {'num_steps': args.steps}
  dataset = getattr(args, 'dataset', data_lib.MNIST1D)
  source = {} if dataset == data_lib.MNIST1D else dict(dataset=dataset, data_dir=args.data_dir)
  extra = lambda n: source if getattr(builders.get(n), 'func', None) is classification else {}
  built = [get(n, builders, **{**(sizes or {}).get(n, {}), **steps, **extra(n)}) for n in names]
  return {t.name: t for t in built}
