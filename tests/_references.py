"""Independent dense references for the tests: explicit Hessians and the meta rule by hand.

Everything here is computed on raveled float64 vectors with ``jax.hessian`` and numpy,
never with the library, so the library's results can be checked against it. Import it
explicitly: ``import _references as dense`` (``tests/`` is on the path; see pyproject's
``[tool.pytest.ini_options]``).
"""

from __future__ import annotations

import functools
import types
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.flatten_util
import jax.numpy as jnp
import numpy as np

PyTree = Any


def ravel(tree: PyTree) -> np.ndarray:
  """A pytree's leaves as one float64 numpy vector, in ``jax.tree.leaves`` order.

  A complex leaf counts as its pair of real parameters: its real parts, then its
  imaginary parts.
  """
  parts = []
  for x in jax.tree.leaves(tree):
    x = np.asarray(x)
    parts += [x.real, x.imag] if np.iscomplexobj(x) else [x]
  return np.concatenate([np.asarray(x, np.float64).ravel() for x in parts])


_DERIVATIVES: dict[Any, types.SimpleNamespace] = {}


@functools.cache
def _jitted_derivatives(loss_fn, unravel):
  flat_loss = lambda f: loss_fn(unravel(f))
  # Jitted: one compilation rather than one per primitive, much faster on small CPUs.
  return jax.jit(lambda f: (flat_loss(f), jax.grad(flat_loss)(f), jax.hessian(flat_loss)(f)))


def derivatives(loss_fn: Callable[[PyTree], jax.Array], params: PyTree) -> types.SimpleNamespace:
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


def hessian(loss_fn: Callable[[PyTree], jax.Array], params: PyTree) -> np.ndarray:
  """The explicit Hessian of ``loss_fn`` at ``params``; see :func:`derivatives`."""
  return derivatives(loss_fn, params).hessian


def meta_gradient(
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


def meta_gradient_at(
  reference: types.SimpleNamespace, params: PyTree, **options: Any
) -> tuple[np.ndarray, dict[str, float]]:
  """:func:`meta_gradient` with the Hessian and gradient of :func:`derivatives` at ``params``."""
  return meta_gradient(reference.hessian, reference.grad, leaf_sizes(params), **options)


def meta_to_grad_ratio(
  hessian: np.ndarray, grads: np.ndarray, leaf_sizes: Sequence[int], **options: Any
) -> float:
  """``‖m⊥‖ / ‖g‖`` of the uncapped rule (per leaf: the largest ratio over the leaves)."""
  meta = meta_gradient(hessian, grads, leaf_sizes, **options)[0] - grads
  if options.get('projection') == 'per_leaf':
    bounds = np.cumsum([0, *leaf_sizes])
    segments = [slice(a, b) for a, b in zip(bounds[:-1], bounds[1:])]
  else:
    segments = [slice(0, grads.size)]
  return max(np.linalg.norm(meta[s]) / np.linalg.norm(grads[s]) for s in segments)


def effective_gradient(
  loss_fn: Callable[[PyTree], jax.Array], params: PyTree, **options: Any
) -> tuple[np.ndarray, dict[str, float], types.SimpleNamespace]:
  """``(e, diagnostics, derivatives)`` of the rule in numpy, from ``jax.hessian`` in float64.

  The params are cast to float64 (same values) and raveled; ``options`` are those of
  :func:`meta_gradient`.
  """
  with jax.enable_x64(True):
    params64 = jax.tree.map(lambda p: jnp.asarray(np.asarray(p, np.float64)), params)
    reference = derivatives(loss_fn, params64)
  e, diagnostics = meta_gradient(reference.hessian, reference.grad, leaf_sizes(params), **options)
  return e, diagnostics, reference


def leaf_sizes(tree: PyTree) -> list[int]:
  return [int(np.size(x)) for x in jax.tree.leaves(tree)]


def mask_per_coordinate(leaf_mask: PyTree) -> np.ndarray:
  """A per-leaf bool pytree (leaves are arrays of the params' shapes) as one bool vector."""
  return np.concatenate([np.asarray(m, bool).ravel() for m in jax.tree.leaves(leaf_mask)])


# Comparisons of pytrees, leaf by leaf.


def assert_trees_equal(actual: PyTree, expected: PyTree) -> None:
  """The same tree structure, dtypes and values, to the bit."""
  assert jax.tree.structure(actual) == jax.tree.structure(expected)
  for a, e in zip(jax.tree.leaves(actual), jax.tree.leaves(expected), strict=True):
    assert a.dtype == e.dtype
    np.testing.assert_array_equal(a, e)


def assert_trees_close(actual: PyTree, expected: PyTree, rtol: float, atol: float = 0.0) -> None:
  """Leaf by leaf ``assert_allclose`` in float64."""
  for a, e in zip(jax.tree.leaves(actual), jax.tree.leaves(expected), strict=True):
    np.testing.assert_allclose(np.asarray(a, np.float64), np.asarray(e, np.float64), rtol, atol)


def all_finite(tree: PyTree) -> bool:
  return all(np.isfinite(np.asarray(x, np.float32)).all() for x in jax.tree.leaves(tree))
