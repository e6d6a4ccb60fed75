"""Properties of the orthogonal decoupling (SPEC §2) that hold for any g and H·g.

Hypothesis draws the values of ``g``, ``H·g`` (passed as a constant ``hvp_fn``) and the
coefficients; shapes stay fixed, so each jitted function compiles once per projection.
"""

from __future__ import annotations

import functools

import hypothesis
import jax
import numpy as np
import pytest
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

import f3eo_jax

SHAPES = {'kernel': (3, 2), 'bias': (4,), 'scale': ()}
PROJECTIONS = ('global', 'per_leaf')
SETTINGS = hypothesis.settings(max_examples=25, deadline=None, derandomize=True)

# Magnitudes in [1e-3, 10] or exactly zero: whole-zero leaves occur, underflow does not.
_values = st.one_of(st.just(0.0), st.floats(1e-3, 10.0), st.floats(-10.0, -1e-3))
_coefs = st.floats(-5.0, 5.0, allow_nan=False, allow_infinity=False)


def _trees(dtype=np.float64):
  return st.fixed_dictionaries(
    {name: hnp.arrays(dtype, shape, elements=_values) for name, shape in SHAPES.items()}
  )


@functools.cache
def _effective_gradient(projection, clipped=False, zero_coef=False):
  """Jitted ``(g, hg, meta_coef, meta_clip_norm) -> e`` with ``hvp_fn`` returning ``hg``."""

  @jax.jit
  def effective_gradient(g, hg, meta_coef, meta_clip_norm):
    tx = f3eo_jax.add_meta_gradient(
      0.0 if zero_coef else meta_coef,
      projection=projection,
      meta_clip_norm=meta_clip_norm if clipped else None,
    )
    e, _ = tx.update(g, tx.init(g), None, hvp_fn=lambda tangent: hg)
    return e

  return effective_gradient


def _meta_term(g, hg, meta_coef, projection, meta_clip_norm=None):
  """``m⊥ = e − g`` per leaf, as float64 numpy arrays."""
  with jax.enable_x64(True):
    fn = _effective_gradient(projection, clipped=meta_clip_norm is not None)
    e = fn(g, hg, meta_coef, 1.0 if meta_clip_norm is None else meta_clip_norm)
  return {k: np.asarray(e[k], np.float64) - np.asarray(g[k], np.float64) for k in g}


def _norm(tree):
  return np.sqrt(sum(float(np.sum(np.square(x))) for x in tree.values()))


def _dot(a, b):
  return sum(float(np.sum(a[k] * b[k])) for k in a)


@SETTINGS
@hypothesis.given(g=_trees(), hg=_trees(), meta_coef=_coefs)
def test_meta_term_is_orthogonal_to_the_gradient_globally(g, hg, meta_coef):
  m = _meta_term(g, hg, meta_coef, 'global')

  scale = (abs(meta_coef) * _norm(hg) + _norm(g)) * _norm(g)
  assert abs(_dot(m, g)) <= 1e-12 * scale


@SETTINGS
@hypothesis.given(g=_trees(), hg=_trees(), meta_coef=_coefs)
def test_meta_term_is_orthogonal_to_the_gradient_per_leaf(g, hg, meta_coef):
  m = _meta_term(g, hg, meta_coef, 'per_leaf')

  for k in g:
    g_norm = np.linalg.norm(g[k])
    scale = (abs(meta_coef) * np.linalg.norm(hg[k]) + g_norm) * g_norm
    assert abs(float(np.sum(m[k] * g[k]))) <= 1e-12 * scale, k


@pytest.mark.parametrize('projection', PROJECTIONS)
@SETTINGS
@hypothesis.given(
  g=_trees(), hg=_trees(), meta_coef=_coefs, factor=st.floats(-4.0, 4.0, allow_nan=False)
)
def test_meta_term_scales_linearly_with_meta_coef(projection, g, hg, meta_coef, factor):
  m = _meta_term(g, hg, meta_coef, projection)
  m_scaled = _meta_term(g, hg, factor * meta_coef, projection)

  error = _norm({k: m_scaled[k] - factor * m[k] for k in m})
  assert error <= 1e-12 * (1 + abs(factor)) * (abs(meta_coef) * _norm(hg) + _norm(g))


@pytest.mark.parametrize('projection', PROJECTIONS)
@SETTINGS
@hypothesis.given(g=_trees(), hg=_trees(), meta_coef=_coefs, meta_clip_norm=st.floats(1e-3, 10.0))
def test_projected_meta_term_never_exceeds_meta_clip_norm(
  projection, g, hg, meta_coef, meta_clip_norm
):
  m = _meta_term(g, hg, meta_coef, projection, meta_clip_norm)

  # Projection only shortens a vector, so clipping before it bounds the result.
  assert _norm(m) <= meta_clip_norm * (1 + 1e-9) + 1e-12 * _norm(g)


@pytest.mark.parametrize('projection', PROJECTIONS)
@SETTINGS
@hypothesis.given(g=_trees(np.float32), hg=_trees(np.float32))
def test_zero_meta_coef_returns_the_gradient_bitwise(projection, g, hg):
  e = _effective_gradient(projection, zero_coef=True)(g, hg, 0.0, None)

  for k in g:
    assert e[k].dtype == np.float32
    np.testing.assert_array_equal(np.asarray(e[k]).view(np.uint32), g[k].view(np.uint32))


# The relative cap: e stays within atan(ρ) of g, whatever the scales of g and H·g.

_TINY, _HUGE = float(np.float32(1e-20)), float(np.float32(1e20))
_wide_values = st.one_of(
  st.just(0.0), st.floats(_TINY, _HUGE, width=32), st.floats(-_HUGE, -_TINY, width=32)
)


def _wide_trees():
  return st.fixed_dictionaries(
    {name: hnp.arrays(np.float32, shape, elements=_wide_values) for name, shape in SHAPES.items()}
  )


@functools.cache
def _capped_effective_gradient(projection):
  @jax.jit
  def effective_gradient(g, hg, meta_coef, meta_max_ratio):
    tx = f3eo_jax.add_meta_gradient(
      meta_coef, projection=projection, meta_max_ratio=meta_max_ratio, check_consistency=None
    )
    e, state = tx.update(g, tx.init(g), None, hvp_fn=lambda tangent: hg)
    return e, f3eo_jax.diagnostics(state)['nonfinite_count']

  return effective_gradient


@pytest.mark.parametrize('projection', PROJECTIONS)
@SETTINGS
@hypothesis.given(g=_wide_trees(), hg=_wide_trees(), meta_coef=_coefs, rho=st.floats(0.0, 2.0))
def test_capped_step_is_within_atan_rho_of_the_gradient_in_float32(
  projection, g, hg, meta_coef, rho
):
  e, nonfinite = _capped_effective_gradient(projection)(g, hg, meta_coef, rho)
  e = {k: np.asarray(v, np.float64) for k, v in e.items()}
  g64 = {k: np.asarray(v, np.float64) for k, v in g.items()}
  m = {k: e[k] - g64[k] for k in g}

  assert nonfinite == 0 and all(np.isfinite(v).all() for v in e.values())
  segments = [list(g)] if projection == 'global' else [[k] for k in g]
  for keys in segments:
    sub = lambda t, keys=keys: {k: t[k] for k in keys}
    g_norm = _norm(sub(g64))
    # float32 rounding of e = g + m⊥ itself: a few ulps of the larger of the two.
    # (Measured worst cases over these examples: ⟨m⊥, g⟩ ≈ 1.3e-7·‖g‖², cos short by 3e-8.)
    ulps = 1e-6 * (g_norm + _norm(sub(m)))
    assert _norm(sub(m)) <= rho * g_norm * (1 + 1e-5) + ulps
    assert abs(_dot(sub(m), sub(g64))) <= 1e-6 * g_norm**2 + ulps * g_norm
  # Hence ⟨e, g⟩ > 0 and angle(e, g) <= atan(ρ) over the whole tree.
  g_norm = _norm(g64)
  if g_norm > 0:
    cos = _dot(e, g64) / (_norm(e) * g_norm)
    assert cos >= np.cos(np.arctan(rho)) - 1e-6
