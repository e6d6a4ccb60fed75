"""Shared fixtures: float64 on demand, both reduction forms, small random MLPs and their losses."""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.flatten_util
import jax.numpy as jnp
import numpy as np
import optax
import pytest

PyTree = Any

_ACTIVATIONS = {'tanh': jnp.tanh, 'relu': jax.nn.relu}


@pytest.fixture
def x64():
  """Enables float64 for one test and restores the previous setting afterwards."""
  with jax.enable_x64(True):
    yield


def random_mlp(
  activation: str = 'tanh',
  *,
  widths: Sequence[int] = (3, 4, 3),
  num_examples: int = 8,
  param_seed: int = 0,
  data_seed: int = 1,
  dtype: Any = None,
) -> tuple[PyTree, Callable[[PyTree], jax.Array]]:
  """A small MLP (weights and biases) and its mean cross-entropy on fixed random data.

  The parameters depend only on ``param_seed`` and the data only on ``data_seed``, so
  two calls that differ in ``data_seed`` give the same params and the loss on another
  batch. ``dtype`` defaults to JAX's default float (float64 inside the ``x64`` fixture).
  Calls with equal arguments return the same ``loss_fn`` object, so jitted functions
  that take it as a static argument, and the dense Hessians below, are reused.

  Returns:
    ``(params, loss_fn)`` with ``params = {'layer_i': {'w', 'b'}}`` and ``loss_fn(params)``
    a scalar.
  """
  dtype = jnp.dtype(jnp.result_type(float) if dtype is None else dtype)
  params, loss_fn = _random_mlp(
    activation,
    tuple(widths),
    num_examples,
    param_seed,
    data_seed,
    dtype,
    jax.config.jax_enable_x64,
  )
  return jax.tree.map(lambda x: x, params), loss_fn  # fresh containers for each caller


@functools.cache
def _random_mlp(activation, widths, num_examples, param_seed, data_seed, dtype, x64):
  del x64  # only part of the cache key: the label dtype depends on it
  act = _ACTIVATIONS[activation]
  param_rng = np.random.default_rng(param_seed)
  params = {}
  for i, (fan_in, fan_out) in enumerate(zip(widths[:-1], widths[1:])):
    params[f'layer_{i}'] = {
      'w': jnp.asarray(param_rng.normal(size=(fan_in, fan_out)) / np.sqrt(fan_in), dtype),
      'b': jnp.asarray(0.5 * param_rng.normal(size=(fan_out,)), dtype),
    }
  data_rng = np.random.default_rng(1000 + data_seed)
  x = jnp.asarray(data_rng.normal(size=(num_examples, widths[0])), dtype)
  labels = jnp.asarray(data_rng.integers(0, widths[-1], size=num_examples))

  def loss_fn(p: PyTree) -> jax.Array:
    h = x
    for i in range(len(widths) - 1):
      layer = p[f'layer_{i}']
      h = h @ layer['w'] + layer['b']
      if i < len(widths) - 2:
        h = act(h)
    return optax.softmax_cross_entropy_with_integer_labels(h, labels).mean()

  return params, loss_fn


@pytest.fixture(params=['rows_first', 'one_by_one'])
def reduction_form(request, monkeypatch):
  """Both forms of the transform's reductions, whichever this machine's platform compiles:
  a variadic ``lax.reduce`` over short rows of the last axis per pass (CPU) and separate
  reductions (GPU, TPU)."""
  from f3eo_jax import reductions

  platforms = (jax.default_backend(),) if request.param == 'rows_first' else ()
  monkeypatch.setattr(reductions, 'ROWS_FIRST_PLATFORMS', platforms)
  return request.param


@pytest.fixture
def make_mlp():
  """The :func:`random_mlp` factory: ``make_mlp('relu', data_seed=2) -> (params, loss_fn)``."""
  return random_mlp
