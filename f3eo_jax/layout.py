"""Which parameter arrays get the meta term, and which of them are projected together."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

import jax

from f3eo_jax import checks
from f3eo_jax._types import MaskOrFn, PyTree
from f3eo_jax.hvp import is_differentiable


@dataclasses.dataclass(frozen=True)
class Layout:
  """The leaves of the params, as the transform groups them (static, per trace).

  Attributes:
    treedef: the structure of the params and updates.
    active: per leaf: differentiable and inside ``meta_mask``.
    differentiable: per leaf: floating-point or complex.
    segments: tuples of active leaf indices projected together: one segment of all
      active leaves for ``'global'``, one per active leaf for ``'per_leaf'``.
  """

  treedef: Any
  active: tuple[bool, ...]
  differentiable: tuple[bool, ...]
  segments: tuple[tuple[int, ...], ...]

  def active_only(self, leaves: Sequence[Any]) -> list[Any]:
    """``leaves`` with ``None`` in place of every leaf that gets no meta term."""
    return [x if a else None for x, a in zip(leaves, self.active)]


def make_layout(meta_mask: MaskOrFn, params: PyTree, updates: PyTree, projection: str) -> Layout:
  """The :class:`Layout` of ``updates`` under ``meta_mask`` and ``projection``.

  Raises:
    ValueError, TypeError: for a mask that does not fit the params, or is not known at
      trace time.
  """
  leaves, treedef = jax.tree.flatten(updates)
  differentiable = tuple(is_differentiable(u) for u in leaves)
  if meta_mask is None:
    in_mask = (True,) * len(leaves)
  else:
    if callable(meta_mask):
      if params is None:
        raise ValueError(
          'A callable meta_mask needs the params: call update(updates, state, params, ...).'
        )
      meta_mask = meta_mask(params)
      checks.check_mask_spec('meta_mask (as returned by the callable)', meta_mask)
    try:
      per_leaf = jax.tree.map(
        lambda m, u: jax.tree.map(lambda _: m, u), meta_mask, updates, is_leaf=checks.is_mask_leaf
      )
    except (ValueError, TypeError) as e:
      raise ValueError(
        'meta_mask must be a pytree of bools with the structure of the params (or a'
        f' prefix of it); got structure {jax.tree.structure(meta_mask)} for params of'
        f' structure {treedef}.'
      ) from e
    try:
      in_mask = tuple(bool(m) for m in jax.tree.leaves(per_leaf, is_leaf=checks.is_mask_leaf))
    except jax.errors.ConcretizationTypeError as e:
      raise TypeError('meta_mask must be known at trace time (Python bools).') from e
  active = tuple(d and m for d, m in zip(differentiable, in_mask))
  indices = tuple(i for i, a in enumerate(active) if a)
  segments: tuple[tuple[int, ...], ...]
  if projection == 'global':
    segments = (indices,) if indices else ()
  else:
    segments = tuple((i,) for i in indices)
  return Layout(treedef, active, differentiable, segments)
