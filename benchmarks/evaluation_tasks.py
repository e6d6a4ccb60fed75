"""Evaluation tasks: held out from the choice of F3EO's default, and of other kinds.

The selection tasks (``benchmarks/tasks.py``) are MNIST-1D with an MLP and a CNN, Friedman #1
with a tanh MLP and a character-level transformer. The two tasks here use other data and other
model families, need no download, and train in seconds on 2 CPU cores:

- ``digits_gru``: scikit-learn's bundled 8×8 digits (1797 images), read by a GRU two pixels
  per step (32 steps; rows of 8 would be too easy: AdamW 99%), the class from a linear layer
  on the last state. The same weights act 32 times in sequence, a product of Jacobians: the
  sequential-MNIST hard case at a size 2 CPU cores train in seconds. 1257 train / 540 test.
- ``modular_addition``: ``(a + b) mod 97``, embeddings of ``a`` and ``b`` and one ReLU layer;
  a fixed 75% of the 9409 pairs train. From the grokking literature (Power et al. 2022): the
  training set is fitted long before the rule generalises, so the test accuracy says where
  the path ends among zero-loss solutions (what a flatness term claims to improve). With
  weight decay 1e-4, AdamW's test accuracy is 72-93% at 70%, 97-99.7% at 75%, 99.6-100% at 80%.

Both metrics are test accuracy; the splits are fixed permutations (seed 0).

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
  sizes = dict(num_steps=meta['num_steps'], batch_size=meta['batch_size'])
  kw = dict(tasks_lib.ACCURACY, batches=tasks_lib.array_batches, description=description)
  return tasks_lib.Task(name, label, load, make_model, **kw, **sizes, meta=meta)


def digits_gru(*, hidden=64, pixels_per_step=2, num_steps=1000, batch_size=64):
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
  *, p=97, train_fraction=0.75, embed=64, hidden=256, num_steps=3000, batch_size=256
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
