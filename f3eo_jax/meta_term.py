r"""The meta term ``m⊥`` from a few sums: clip, projection, cap, guard, combination.

Each step works per *segment*: the whole tree (``projection='global'``) or one leaf
(``'per_leaf'``). Two passes over ``g`` and ``H·g`` (:func:`segment_sums`) give, on
vectors scaled by powers of two, ``ĝ = ŝ_g·g`` and ``ĥ = ŝ_h·H·g``, the sums ``‖ĝ‖²``,
``⟨ĝ, ĥ⟩`` and ``‖ĥ‖²``. Everything after is scalar algebra on them, ending in one
coefficient ``κ`` and one ratio ``r`` per segment:

.. math::

  m_\perp = \kappa\,(\hat h - r\,\hat g), \qquad e = g + m_\perp,

the last in one elementwise pass (:func:`combine`).
The scaling keeps every quantity representable whenever the result is, so huge or tiny
gradients are handled exactly.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from f3eo_jax import reductions
from f3eo_jax._types import ScalarLike
from f3eo_jax.layout import Layout

_CLIP_EPS = 1e-6  # m ← m · min(1, τ / (‖m‖ + 1e-6)), as the published code clips.


class Sums(NamedTuple):
  """One segment's sums of the scaled vectors ``ĝ = ŝ_g·g`` and ``ĥ = ŝ_h·H·g``."""

  scale_g: jax.Array  # ŝ_g, a power of two
  scale_h: jax.Array  # ŝ_h
  gg: jax.Array  # ‖ĝ‖²
  gh: jax.Array  # ⟨ĝ, ĥ⟩
  hh: jax.Array  # ‖ĥ‖²
  max_g: jax.Array  # max |g| (unscaled)
  max_h: jax.Array  # max |H·g| (unscaled)
  top: float  # the largest finite value of the segment's output dtypes


class Projection(NamedTuple):
  """Per segment, ``(H·g)⊥ = (ĥ − r·ĝ) / ŝ_h``."""

  ratios: list[jax.Array]  # r = ⟨ĝ, ĥ⟩ / ‖ĝ‖²; 0 when not projected or where g = 0
  perp_sq: list[jax.Array]  # ‖ĥ − r·ĝ‖²


def segment_sums(layout: Layout, g: Sequence[jax.Array], hg: Sequence[Any]) -> list[Sums]:
  """Passes 1 and 2: the maxima of every active leaf, then each segment's scaled sums."""
  acc = functools.reduce(
    jnp.promote_types,
    [reductions.accumulation_dtype(g[i]) for seg in layout.segments for i in seg],
  )
  maxima = {i: reductions.max_abs(g[i], hg[i]) for seg in layout.segments for i in seg}
  sums = []
  for seg in layout.segments:
    segment_max = jnp.max(jnp.stack([maxima[i].astype(acc) for i in seg]), axis=0)
    scale_g, scale_h = reductions.pow2_scale(segment_max[0]), reductions.pow2_scale(segment_max[1])
    total = jnp.zeros(3, acc)
    for i in seg:
      g_i = reductions.scaled_components(g[i], scale_g)
      h_i = reductions.scaled_components(hg[i], scale_h)
      total = total + reductions.inner_products([g_i, g_i, h_i], [g_i, h_i, h_i])
    top = min(float(jnp.finfo(g[i].dtype).max) for i in seg)
    gg, gh, hh = total
    sums.append(Sums(scale_g, scale_h, gg, gh, hh, segment_max[0], segment_max[1], top))
  return sums


def _in_common_units(sums: Sequence[Sums]) -> tuple[jax.Array, ...]:
  """``‖ĝ‖², ⟨ĝ, ĥ⟩, ‖ĥ‖²`` over all segments, at the smallest scales ``ŝ_g, ŝ_h``."""
  unit_g = jnp.min(jnp.stack([s.scale_g for s in sums]))
  unit_h = jnp.min(jnp.stack([s.scale_h for s in sums]))
  total = lambda terms: functools.reduce(jnp.add, terms)
  gg = total([s.gg * (unit_g / s.scale_g) ** 2 for s in sums])
  gh = total([s.gh * (unit_g / s.scale_g) * (unit_h / s.scale_h) for s in sums])
  hh = total([s.hh * (unit_h / s.scale_h) ** 2 for s in sums])
  return gg, gh, hh, unit_g, unit_h


def clip(
  sums: Sequence[Sums], meta_coef: ScalarLike, meta_clip_norm: ScalarLike | None
) -> tuple[list[jax.Array], jax.Array]:
  """``m = c·H·g``, clipped to global norm ``τ``: ``m = κ·ĥ`` with ``κ = c·s_clip / ŝ_h``.

  Returns:
    ``κ`` per segment, and whether ``c`` (and ``τ``) are usable: finite, ``τ > 0``.
  """
  acc = sums[0].gg.dtype
  c = jnp.real(jnp.asarray(meta_coef)).astype(acc)
  valid = jnp.isfinite(c)
  if meta_clip_norm is None:
    return [c * (1 / s.scale_h) for s in sums], valid
  tau = jnp.real(jnp.asarray(meta_clip_norm)).astype(acc)
  valid &= tau > 0
  _, _, hh, _, unit_h = _in_common_units(sums)
  hg_norm = jnp.sqrt(hh)  # ‖H·g‖·ŝ with ŝ = unit_h
  # s_clip / ŝ_h, written so that neither factor overflows on its own.
  kappa = [
    c
    * jnp.minimum(
      1 / s.scale_h, tau / (jnp.abs(c) * hg_norm * (s.scale_h / unit_h) + _CLIP_EPS * s.scale_h)
    )
    for s in sums
  ]
  return kappa, valid


def project(
  layout: Layout,
  g: Sequence[jax.Array],
  hg: Sequence[Any],
  sums: Sequence[Sums],
  *,
  orthogonalize: bool,
  exact: bool,
) -> Projection:
  """``(H·g)⊥ = H·g − (⟨H·g, g⟩ / ⟨g, g⟩)·g`` per segment (skipped where ``g = 0``).

  With ``exact`` (the relative cap needs it), pass 3 computes ``‖ĥ − r·ĝ‖²`` directly,
  without cancellation, and measures what is left of ``ĝ`` in ``d = ĥ − r·ĝ``,
  ``⟨d, ĝ⟩``: one more Gram-Schmidt step refines ``r``, so the rounding of the first
  inner products no longer shows in ``⟨m⊥, g⟩``. Otherwise ``‖ĥ − r·ĝ‖²`` is
  ``‖ĥ‖² − r⟨ĝ, ĥ⟩`` (for the diagnostics only).
  """
  if not orthogonalize:
    ratios = [jnp.zeros_like(s.gg) for s in sums]
  else:
    ratios = [reductions.safe_div(s.gh, s.gg) for s in sums]
  if not (exact and orthogonalize):
    return Projection(ratios, [jnp.maximum(s.hh - r * s.gh, 0) for s, r in zip(sums, ratios)])
  perp, refined = [], []
  for seg, s, r in zip(layout.segments, sums, ratios):
    total = jnp.zeros(2, s.gg.dtype)
    for i in seg:
      g_i = reductions.scaled_components(g[i], s.scale_g)
      h_i = reductions.scaled_components(hg[i], s.scale_h)
      diff = tuple(h - r * x for h, x in zip(h_i, g_i))
      total = total + reductions.inner_products([diff, diff], [diff, g_i])
    correction = reductions.safe_div(total[1], s.gg)
    refined.append(r + correction)
    perp.append(jnp.maximum(total[0] - correction * total[1], 0))
  return Projection(refined, perp)


def cap(
  sums: Sequence[Sums],
  projection: Projection,
  kappa: Sequence[jax.Array],
  meta_max_ratio: ScalarLike | None,
) -> tuple[list[jax.Array], jax.Array, jax.Array]:
  """``m⊥ ← m⊥ · min(1, ρ‖g‖ / ‖m⊥‖)`` per segment, as a bound on ``|κ|``.

  Returns:
    The capped ``κ`` per segment, whether the cap bound in some segment, and whether
    ``ρ`` is usable (``ρ ≥ 0``).
  """
  if meta_max_ratio is None:
    return list(kappa), jnp.zeros((), bool), jnp.ones((), bool)
  acc = sums[0].gg.dtype
  rho = jnp.real(jnp.asarray(meta_max_ratio)).astype(acc)
  capped, bound = [], []
  for s, p, r, k in zip(sums, projection.perp_sq, projection.ratios, kappa):
    # ĥ − r·ĝ, rounded elementwise, is a few ulps of ‖ĥ‖ + |r|‖ĝ‖ even where (H·g)⊥
    # is zero (a one-element leaf, or H·g parallel to g). Scaled up to ρ‖g‖, that
    # rounding would be the whole meta term: below 16× its level, κ is 0.
    rounding = (4 * jnp.finfo(acc).eps) ** 2 * (s.hh + r**2 * s.gg)
    resolved = p > 16 * rounding
    denominator = s.scale_g * jnp.sqrt(jnp.where(resolved, p, 1))
    # ρ‖g‖ / ‖(H·g)⊥‖ in the same units: the largest |κ| the cap allows.
    limit = rho * jnp.sqrt(s.gg) / denominator
    bound.append(resolved & (limit < jnp.abs(k)))
    capped.append(jnp.where(resolved, jnp.sign(k) * jnp.minimum(jnp.abs(k), limit), 0))
  return capped, functools.reduce(jnp.logical_or, bound), rho >= 0


def guard(sums: Sequence[Sums], projection: Projection, kappa: Sequence[jax.Array]) -> jax.Array:
  """Whether the meta term is finite and cannot overflow the output dtypes.

  Elementwise ``|g + κ·(ĥ − r·ĝ)| ≤ max|g| + |κ|·(max|ĥ| + |r|·max|ĝ|)``: a meta term
  that could overflow is as unusable as a NaN.
  """
  finite = jnp.ones((), bool)
  for s, k, r in zip(sums, kappa, projection.ratios):
    finite &= jnp.isfinite(s.hh) & jnp.isfinite(s.gg) & jnp.isfinite(k) & jnp.isfinite(r)
    bound = s.max_g + jnp.abs(k) * (s.max_h * s.scale_h + jnp.abs(r) * s.max_g * s.scale_g)
    finite &= bound < s.top
  return finite


def combine(
  layout: Layout,
  g: Sequence[jax.Array],
  hg: Sequence[Any],
  sums: Sequence[Sums],
  projection: Projection,
  kappa: Sequence[jax.Array],
  ok: jax.Array,
) -> list[jax.Array]:
  """``e = g + κ·(ŝ_h·H·g − r·ŝ_g·g)`` on active leaves; ``g`` elsewhere or if not ``ok``."""
  out = list(g)
  for seg, s, k, r in zip(layout.segments, sums, kappa, projection.ratios):
    acc = s.gg.dtype
    for i in seg:
      u, h = g[i], hg[i]
      meta = k * (
        h.astype(jnp.promote_types(h.dtype, acc)) * s.scale_h
        - r * s.scale_g * u.astype(jnp.promote_types(u.dtype, acc))
      )
      out[i] = jnp.where(ok, (u + meta).astype(u.dtype), u)
  return out


def applied_norm(
  projection: Projection,
  kappa: Sequence[jax.Array],
  uncapped_kappa: Sequence[jax.Array],
  ok: jax.Array,
) -> tuple[jax.Array, jax.Array]:
  """``‖m⊥‖`` as applied (0 if not ``ok``), and the factor the cap scaled it by (≤ 1)."""
  # ‖m⊥‖ = sqrt(Σ κ²·p) over segments; κ² alone over- or underflows (κ ~ 1/ŝ_h).
  norm = lambda ks: reductions.hypot(
    [jnp.abs(k) * jnp.sqrt(p) for k, p in zip(ks, projection.perp_sq)]
  )
  capped, uncapped = norm(kappa), norm(uncapped_kappa)
  cap_scale = jnp.where(ok & (uncapped > 0), reductions.safe_div(capped, uncapped), 1)
  return jnp.where(ok, capped, 0), jnp.minimum(cap_scale, 1)


def curvature(sums: Sequence[Sums]) -> tuple[jax.Array, jax.Array, jax.Array, jax.Array]:
  """``‖g‖², ⟨g, H·g⟩, ‖H·g‖`` and ``cos∠(g, H·g)`` over all segments, unscaled."""
  gg, gh, hh, unit_g, unit_h = _in_common_units(sums)
  cos = reductions.safe_div(gh, jnp.sqrt(gg * hh))
  return gg / unit_g**2, gh / (unit_g * unit_h), jnp.sqrt(hh) / unit_h, cos
