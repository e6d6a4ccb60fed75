"""Evaluation tasks: held out from the choice of F3EO's default, and of other kinds.

The selection tasks (``benchmarks/tasks.py``) are MNIST-1D with an MLP and a CNN, Friedman #1
with a tanh MLP and a character-level transformer. The two tasks here use other data and other
model families, need no download, and train in seconds on 2 CPU cores:

- ``digits_gru``: scikit-learn's bundled 8×8 handwritten digits (1797 images, 10 classes),
  read by a GRU two pixels per time step in reading order (32 steps), the class from a linear
  layer on the last hidden state. A recurrent network is none of the selection families: the
  same weights act 32 times in sequence, so the loss couples distant inputs through a product
  of Jacobians, the classic hard case for first-order methods (the sequential-MNIST setting
  at a size 2 CPU cores train in seconds). Rows of 8 pixels per step would be too easy
  (AdamW reaches 99% test accuracy); two pixels per step leaves AdamW at about 96%. A fixed
  permutation (seed 0) splits 1257 training / 540 test images. Metric: test accuracy.
- ``modular_addition``: ``(a + b) mod p`` for ``p = 97``, every pair ``(a, b)`` one example,
  a fixed 75% of the 9409 pairs for training and the rest for test. Each of ``a`` and ``b``
  gets a learned embedding, and one ReLU layer on their concatenation gives the ``p``
  logits. An algorithmic task of the grokking literature (Power et al. 2022): the training
  set is fitted long before the rule generalises, so the test accuracy measures where the
  optimizer's path ends among the many zero-loss solutions, the property a flatness term such
  as F3EO's Fisher-trace descent claims to improve. The inputs are symbols and the model an
  embedding table, both new to the study. With the study's weight decay (1e-4) the training
  fraction sets the difficulty: at 70% AdamW's test accuracy spreads from 72% to 93% over
  seeds, at 80% it is 99.6-100%; at 75% it is 97-99.7%. Metric: test accuracy.

Both loaders return a :class:`benchmarks.data.Dataset`; its ``validation_split()`` holds out
the last 10% of the training set for choosing learning rates.

Example:
  >>> from benchmarks import evaluation_tasks
  >>> data = evaluation_tasks.load_digits()
  >>> data.x_train.shape, data.x_test.shape, data.validation_split().x_test.shape
  ((1257, 32, 2), (540, 32, 2), (126, 32, 2))
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import flax.linen as nn
import jax
import numpy as np

from benchmarks import data as data_lib
from benchmarks import tasks as tasks_lib

SPLIT_SEED = 0  # fixes which examples are training and which are test


def _split(x: np.ndarray, y: np.ndarray, n_train: int, name: str, num_classes: int):
  order = np.random.default_rng(SPLIT_SEED).permutation(len(x))
  train, test = order[:n_train], order[n_train:]
  return data_lib.Dataset(name, x[train], y[train], x[test], y[test], num_classes)


@functools.lru_cache(maxsize=2)
def load_digits(n_train: int = 1257, pixels_per_step: int = 2) -> data_lib.Dataset:
  """The 8×8 digits as sequences of ``pixels_per_step`` pixels in ``[0, 1]``; labels 0-9."""
  from sklearn import datasets  # bundled with scikit-learn: no download

  digits = datasets.load_digits()
  x = (digits.images / 16.0).astype(np.float32).reshape(-1, 64 // pixels_per_step, pixels_per_step)
  return _split(x, digits.target.astype(np.int32), n_train, 'digits', 10)


@functools.lru_cache(maxsize=2)
def load_modular_addition(p: int = 97, train_fraction: float = 0.75) -> data_lib.Dataset:
  """All pairs ``(a, b)`` in ``[0, p)²`` as int32 ``(N, 2)``, labels ``(a + b) mod p``."""
  a, b = np.meshgrid(np.arange(p), np.arange(p), indexing='ij')
  x = np.stack([a.ravel(), b.ravel()], axis=1).astype(np.int32)
  y = ((x[:, 0] + x[:, 1]) % p).astype(np.int32)
  return _split(x, y, int(round(train_fraction * p * p)), f'mod{p}_addition', p)


class SequenceGRU(nn.Module):
  """A GRU over a sequence ``(batch, time, features)``, then a linear layer on its last state."""

  hidden: int = 64
  num_classes: int = 10

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
    del train  # no dropout, no batch norm
    states = nn.RNN(nn.GRUCell(self.hidden))(x)  # (batch, time, hidden)
    return nn.Dense(self.num_classes)(states[:, -1])


class EmbedMLP(nn.Module):
  """Embeddings of ``a`` and ``b``, concatenated, a ReLU layer, then ``p`` logits."""

  p: int = 97
  embed: int = 64
  hidden: int = 256

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
    del train
    e = nn.Embed(self.p, self.embed)(x).reshape((x.shape[0], -1))
    return nn.Dense(self.p)(nn.relu(nn.Dense(self.hidden)(e)))


def _classification_task(name, label, load, make_model, description, meta):
  return tasks_lib.Task(
    name=name,
    label=label,
    load=load,
    make_model=make_model,
    **tasks_lib.ACCURACY,
    num_steps=meta['num_steps'],
    batch_size=meta['batch_size'],
    batches=tasks_lib.array_batches,
    description=description,
    meta=meta,
  )


def digits_gru(
  *, hidden: int = 64, pixels_per_step: int = 2, num_steps: int = 1000, batch_size: int = 64
):
  """The ``digits_gru`` task (sizes as keyword arguments)."""
  meta = dict(locals())  # the arguments, recorded in the task
  return _classification_task(
    'digits_gru',
    'digits GRU',
    functools.partial(load_digits, 1257, pixels_per_step),
    lambda d: SequenceGRU(hidden=hidden, num_classes=d.num_classes),
    f'GRU (hidden {hidden}) reading scikit-learn 8x8 digits {pixels_per_step} pixels per'
    ' step, 1257 train / 540 test; metric: test accuracy.',
    meta,
  )


def modular_addition(
  *,
  p: int = 97,
  train_fraction: float = 0.75,
  embed: int = 64,
  hidden: int = 256,
  num_steps: int = 3000,
  batch_size: int = 256,
):
  """The ``modular_addition`` task (sizes as keyword arguments)."""
  meta = dict(locals())
  return _classification_task(
    'modular_addition',
    f'(a + b) mod {p}',
    functools.partial(load_modular_addition, p, train_fraction),
    lambda d: EmbedMLP(p=p, embed=embed, hidden=hidden),
    f'(a + b) mod {p} on {train_fraction:.0%} of all pairs, embeddings {embed} + ReLU'
    f' {hidden}; metric: accuracy on the other pairs.',
    meta,
  )


EVALUATION_TASKS: dict[str, Callable[..., tasks_lib.Task]] = {
  'digits_gru': digits_gru,
  'modular_addition': modular_addition,
}
SMOKE_SIZES = {
  'digits_gru': dict(hidden=8),
  'modular_addition': dict(p=23, embed=8, hidden=16, batch_size=64),
}
