"""The transform's ``H·g``: computed now, checked against ``g``, stored, or reused.

With ``obj_fn``, one forward-over-reverse pass gives both ``∇obj_fn`` and ``H·g``;
comparing the first with ``g`` is the gradient check (``check_consistency``). With
``hvp_every > 1`` the state stores the product, zeroed unless finite and consistent, and
later updates reuse it.
"""

from __future__ import annotations

import functools
import warnings
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from f3eo_jax import hvp as hvp_lib
from f3eo_jax import reductions
from f3eo_jax._types import AxisName, HvpFn, ObjFn, PyTree, ScalarLike
from f3eo_jax.layout import Layout

IN_GRAPH_SCHEDULE_ON_CPU = (
  'hvp_every > 1 scheduled inside the compiled step (jax.lax.cond) is slow on XLA:CPU:'
  ' XLA:CPU moves convolutions into its fast layout only outside conditionals, so the'
  " convolutions of a model's gradient and H·g run through a slow fallback on every"
  ' refresh. f3eo_jax.jit_amortized(step_fn, hvp_every=k) compiles a refresh step and a'
  ' reuse step instead (pass refresh_hvp= on to tx.update): no conditional, same schedule.'
)
"""The warning :func:`scheduled` gives, once, when it builds a ``lax.cond`` on CPU."""


class Product(NamedTuple):
  """``H·g`` for one update, and what the gradient check measured."""

  hg: list[Any]  # H·g per leaf: arrays on active leaves, None on the others.
  mismatch: jax.Array  # measured relative mismatch, or NaN where not measured.
  finite: jax.Array  # False if a stored product had to be zeroed as non-finite.


def compute(
  layout: Layout,
  updates: Sequence[jax.Array],
  params: PyTree,
  *,
  obj_fn: ObjFn | None,
  hvp_fn: HvpFn | None,
  axis_name: AxisName | None,
  check_consistency: ScalarLike | None,
) -> Product:
  """``H·g`` at the params, and the gradient check when ``obj_fn`` is given."""
  tangent = layout.treedef.unflatten(
    [u if a else jnp.zeros_like(u) for u, a in zip(updates, layout.active)]
  )
  mismatch = jnp.full((), jnp.nan, jnp.float32)
  if obj_fn is not None:
    grad_obj, hg = hvp_lib.grad_and_hvp(obj_fn, params, tangent)
    _check_like('the gradient of obj_fn', grad_obj, layout, updates)
    if check_consistency is not None:
      if axis_name is not None:
        grad_obj = jax.lax.pmean(grad_obj, axis_name)
      mismatch = _relative_mismatch(layout, jax.tree.leaves(grad_obj), updates)
  else:
    assert hvp_fn is not None
    hg = hvp_fn(tangent)
    _check_like('hvp_fn', hg, layout, updates)
  if axis_name is not None:
    hg = jax.lax.pmean(hg, axis_name)
  return Product(layout.active_only(jax.tree.leaves(hg)), mismatch, jnp.ones((), bool))


def _check_like(name: str, tree: PyTree, layout: Layout, updates: Sequence[jax.Array]) -> None:
  """Raises at trace time unless ``tree`` has the structure and shapes of the gradients."""
  leaves, treedef = jax.tree.flatten(tree)
  if treedef != layout.treedef:
    raise ValueError(
      f'{name} returned a pytree of structure {treedef}; expected {layout.treedef}, like'
      ' the gradients.'
    )
  for leaf, u in zip(leaves, updates):
    if jnp.shape(leaf) != jnp.shape(u):
      raise ValueError(
        f'{name} returned a leaf of shape {jnp.shape(leaf)} where the gradient has shape'
        f' {jnp.shape(u)}.'
      )


def _relative_mismatch(
  layout: Layout, grad_obj: Sequence[jax.Array], updates: Sequence[jax.Array]
) -> jax.Array:
  """``‖∇obj_fn − g‖ / ‖g‖`` over the differentiable leaves, in float32."""
  pairs = [(o, u) for o, u, d in zip(grad_obj, updates, layout.differentiable) if d]
  if not pairs:
    return jnp.zeros((), jnp.float32)
  scale = reductions.pow2_scale(jnp.max(jnp.concatenate([reductions.max_abs(u) for _, u in pairs])))
  scaled = lambda x: reductions.scaled_components(x, scale)
  diff_sq, grad_sq = functools.reduce(
    jnp.add,
    [
      reductions.inner_products([scaled(o - u), scaled(u)], [scaled(o - u), scaled(u)])
      for o, u in pairs
    ],
  )
  mismatch = jnp.where(
    grad_sq > 0,
    jnp.sqrt(diff_sq / jnp.where(grad_sq > 0, grad_sq, 1)),
    jnp.where(diff_sq > 0, jnp.inf, 0.0),
  )
  return mismatch.astype(jnp.float32)


def is_mismatched(mismatch: jax.Array, rtol: ScalarLike | None) -> jax.Array:
  """Whether a measured mismatch exceeds ``rtol`` (a NaN mismatch was not measured)."""
  if rtol is None:
    return jnp.zeros((), bool)
  return ~jnp.isnan(mismatch) & ~(mismatch <= jnp.real(jnp.asarray(rtol)).astype(jnp.float32))


def for_storage(
  layout: Layout, product: Product, buffer: PyTree, rtol: ScalarLike | None
) -> Product:
  """The product in the buffer's dtypes, zeroed unless finite and consistent.

  A product that later updates reuse must not carry a NaN, nor come from an
  objective whose gradient was not ``g``.
  """
  hg = [
    None if h is None else h.astype(b.dtype) for h, b in zip(product.hg, jax.tree.leaves(buffer))
  ]
  finite = jnp.all(
    jnp.stack([jnp.all(jnp.isfinite(h)) for h in hg if h is not None] or [jnp.ones((), bool)])
  )
  keep = finite & ~is_mismatched(product.mismatch, rtol)
  hg = [None if h is None else jnp.where(keep, h, jnp.zeros_like(h)) for h in hg]
  return Product(hg, product.mismatch, finite)


def buffer_leaves(product: Product, buffer: PyTree) -> list[jax.Array]:
  """The buffer's leaves for this product: the product where there is one, zeros elsewhere."""
  return [
    jnp.zeros_like(b) if h is None else h for h, b in zip(product.hg, jax.tree.leaves(buffer))
  ]


def scheduled(
  layout: Layout,
  step: jax.Array,
  buffer: PyTree,
  refresh: Callable[[], Product],
  *,
  refresh_hvp: bool | None,
  hvp_every: Any,
) -> Product:
  """This update's ``H·g`` when the state keeps a product (``hvp_every > 1``).

  ``refresh_hvp=True`` computes it, ``False`` reuses the stored one, and ``None``
  chooses inside the compiled step with ``jax.lax.cond``: refresh on updates
  ``0, k, 2k, …``. That last form warns once on CPU (:data:`IN_GRAPH_SCHEDULE_ON_CPU`).
  """
  if refresh_hvp is True:
    return refresh()
  stored = Product(
    layout.active_only(jax.tree.leaves(buffer)),
    jnp.full((), jnp.nan, jnp.float32),  # a stored product was checked when computed
    jnp.ones((), bool),  # and is finite by construction
  )
  if refresh_hvp is False:
    return stored
  if jax.default_backend() == 'cpu':
    warnings.warn(IN_GRAPH_SCHEDULE_ON_CPU, UserWarning, stacklevel=1)  # once: one location
  every = jnp.maximum(jnp.asarray(hvp_every).astype(jnp.int32), 1)

  def refreshed():
    product = refresh()
    return buffer_leaves(product, buffer), product.mismatch, product.finite

  # Both branches return the buffer's leaves, so lax.cond sees one structure.
  leaves, mismatch, finite = jax.lax.cond(
    step % every == 0,
    refreshed,
    lambda: (jax.tree.leaves(buffer), stored.mismatch, stored.finite),
  )
  return Product(layout.active_only(leaves), mismatch, finite)
