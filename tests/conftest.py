"""Shared fixtures: float64 on demand, and small random MLPs with their losses."""

from __future__ import annotations

import functools
import types
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


@pytest.fixture
def make_mlp():
  """The :func:`random_mlp` factory: ``make_mlp('relu', data_seed=2) -> (params, loss_fn)``."""
  return random_mlp


def ravel(tree: PyTree) -> np.ndarray:
  """A pytree's leaves as one float64 numpy vector, in ``jax.tree.leaves`` order."""
  return np.concatenate([np.asarray(x, np.float64).ravel() for x in jax.tree.leaves(tree)])


_DERIVATIVES: dict[Any, types.SimpleNamespace] = {}


@functools.cache
def _jitted_derivatives(loss_fn, unravel):
  flat_loss = lambda f: loss_fn(unravel(f))
  # Jitted: one compilation rather than one per primitive, much faster on small CPUs.
  return jax.jit(lambda f: (flat_loss(f), jax.grad(flat_loss)(f), jax.hessian(flat_loss)(f)))


def dense_derivatives(
  loss_fn: Callable[[PyTree], jax.Array], params: PyTree
) -> types.SimpleNamespace:
  """``loss``, ``grad`` (raveled) and the explicit ``hessian`` of ``loss_fn`` at ``params``.

  The Hessian is ``jax.hessian`` on the raveled parameter vector; all three are float64
  numpy values, cached per ``(loss_fn, params)``.
  """
  flat, unravel = jax.flatten_util.ravel_pytree(params)
  treedef = jax.tree.structure(params)
  key = (loss_fn, treedef, str(flat.dtype), np.asarray(flat).tobytes())
  if key not in _DERIVATIVES:
    shapes = tuple((np.shape(x), str(jnp.result_type(x))) for x in jax.tree.leaves(params))
    loss, grad, hessian = _jitted_derivatives(loss_fn, _Unravel(treedef, shapes, unravel))(flat)
    _DERIVATIVES[key] = types.SimpleNamespace(
      loss=float(loss),
      grad=np.asarray(grad, np.float64),
      hessian=np.asarray(hessian, np.float64),
    )
  return _DERIVATIVES[key]


class _Unravel:
  """``ravel_pytree``'s inverse, hashable by the tree and shapes it rebuilds."""

  def __init__(self, treedef, shapes, unravel):
    self.key, self.unravel = (treedef, shapes), unravel

  def __call__(self, flat):
    return self.unravel(flat)

  def __hash__(self):
    return hash(self.key)

  def __eq__(self, other):
    return isinstance(other, _Unravel) and self.key == other.key


def dense_hessian(loss_fn: Callable[[PyTree], jax.Array], params: PyTree) -> np.ndarray:
  """The explicit Hessian of ``loss_fn`` at ``params``; see :func:`dense_derivatives`."""
  return dense_derivatives(loss_fn, params).hessian


def meta_gradient_reference(
  hessian: np.ndarray,
  grads: np.ndarray,
  leaf_sizes: Sequence[int],
  *,
  meta_coef: float = 1.0,
  orthogonalize: bool = True,
  projection: str = 'global',
  meta_clip_norm: float | None = None,
  meta_max_ratio: float | None = None,
  mask: np.ndarray | None = None,
  hg: np.ndarray | None = None,
) -> tuple[np.ndarray, dict[str, float]]:
  """The rule in numpy: the effective gradient ``e = g + (c·H·g)⊥`` and the diagnostics.

  Clip (global norm of ``m``, before the projection), projection (over the tree or per
  leaf), relative cap (``‖m⊥‖ ≤ ρ‖g‖`` over the same segments as the projection).
  ``mask`` is a bool per coordinate; outside it ``g`` passes unchanged and the tangent
  of the Hessian-vector product is zero. ``hg`` overrides ``H·g`` (a stored product).
  """
  mask = np.ones_like(grads, bool) if mask is None else np.asarray(mask, bool)
  g = np.where(mask, grads, 0.0)
  if hg is None:
    hg = hessian @ g
  hg = np.where(mask, hg, 0.0)
  m = meta_coef * hg
  if meta_clip_norm is not None:
    m = m * min(1.0, meta_clip_norm / (np.linalg.norm(m) + 1e-6))
  if projection == 'global':
    segments = [slice(0, g.size)]
  else:
    bounds = np.cumsum([0, *leaf_sizes])
    segments = [slice(a, b) for a, b in zip(bounds[:-1], bounds[1:])]
  m = m.copy()
  uncapped_sq, capped = 0.0, False
  for s in segments:
    gg = g[s] @ g[s]
    if orthogonalize and gg > 0:
      m[s] -= (m[s] @ g[s]) / gg * g[s]
    uncapped_sq += m[s] @ m[s]
    if meta_max_ratio is not None:
      norm = np.linalg.norm(m[s])
      if norm > meta_max_ratio * np.sqrt(gg):
        m[s] *= meta_max_ratio * np.sqrt(gg) / norm
        capped = True
  grad_sq_norm = g @ g
  hg_norm = np.linalg.norm(hg)
  denom = np.sqrt(grad_sq_norm) * hg_norm
  diagnostics = {
    'grad_sq_norm': grad_sq_norm,
    'g_dot_hg': g @ hg,
    'hg_norm': hg_norm,
    'meta_norm': np.linalg.norm(m),
    'cos_g_hg': (g @ hg) / denom if denom > 0 else 0.0,
    'cap_scale': np.sqrt(m @ m / uncapped_sq) if uncapped_sq > 0 else 1.0,
    'cap_bound': capped,
  }
  return grads + m, diagnostics


def leaf_sizes(tree: PyTree) -> list[int]:
  return [int(np.size(x)) for x in jax.tree.leaves(tree)]


def mask_per_coordinate(leaf_mask: PyTree) -> np.ndarray:
  """A per-leaf bool pytree (leaves are arrays of the params' shapes) as one bool vector."""
  return np.concatenate([np.asarray(m, bool).ravel() for m in jax.tree.leaves(leaf_mask)])


@pytest.fixture
def dense():
  """Independent dense references: ``dense.derivatives``, ``dense.hessian``, ``dense.ravel``,
  ``dense.meta_gradient``, ``dense.leaf_sizes``, ``dense.mask_per_coordinate``."""
  return types.SimpleNamespace(
    derivatives=dense_derivatives,
    hessian=dense_hessian,
    ravel=ravel,
    meta_gradient=meta_gradient_reference,
    leaf_sizes=leaf_sizes,
    mask_per_coordinate=mask_per_coordinate,
  )
