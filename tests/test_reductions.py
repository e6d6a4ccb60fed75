"""The scaled reductions under the meta term: accurate, in both forms, at any magnitude.

The transform reduces ``g`` and ``H·g`` to a few sums per segment, in one of two forms
(the ``reduction_form`` fixture of conftest.py runs both on this machine): a variadic
``lax.reduce`` over short rows of the last axis (XLA:CPU) or one reduction at a time
(GPU, TPU). Each vector is first scaled by a power of two, so that neither the squares
of large entries overflow nor those of small ones underflow float32.
"""

from __future__ import annotations

import functools

import _problems as problems
import _references as dense
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import f3eo_jax

PROJECTIONS = ('global', 'per_leaf')


def test_float32_inner_products_of_a_large_leaf_are_accurate(reduction_form):
  """A sum accumulated serially over 10⁶ float32 terms is off by ~1e-4; the passes are not."""
  rng = np.random.default_rng(0)
  g64 = rng.standard_normal((1000, 1000)) + 0.5
  hg64 = 0.3 * g64 + rng.standard_normal((1000, 1000))
  g, hg = jnp.asarray(g64, jnp.float32), jnp.asarray(hg64, jnp.float32)
  g64, hg64 = np.asarray(g, np.float64), np.asarray(hg, np.float64)  # the float32 inputs, exactly
  tx = f3eo_jax.add_meta_gradient(1.0, check_consistency=None)
  _, state = jax.jit(lambda g, s: tx.update(g, s, g, hvp_fn=lambda v: hg))(g, tx.init(g))
  diagnostics = f3eo_jax.diagnostics(state)
  np.testing.assert_allclose(diagnostics['grad_sq_norm'], np.sum(g64 * g64), rtol=1e-5)
  np.testing.assert_allclose(diagnostics['g_dot_hg'], np.sum(g64 * hg64), rtol=1e-5)
  np.testing.assert_allclose(diagnostics['hg_norm'], np.sqrt(np.sum(hg64 * hg64)), rtol=1e-5)


@pytest.mark.parametrize('projection', PROJECTIONS)
def test_reductions_over_rows_split_or_whole_match_dense_reference(
  x64, make_mlp, reduction_form, projection
):
  # Last axes of 16 (split into rows of 8 by the CPU form) and 12 (reduced whole), with
  # the cap on, so that the maxima, the inner products and the cap's norm all run.
  params, loss_fn = make_mlp('tanh', widths=(3, 16, 12))
  assert {p.shape[-1] for p in jax.tree.leaves(params)} == {16, 12}
  reference = dense.derivatives(loss_fn, params)
  step = problems.meta_gradient_step(loss_fn, projection=projection)
  ratio = dense.meta_to_grad_ratio(
    reference.hessian, reference.grad, dense.leaf_sizes(params), projection=projection
  )

  for meta_coef, cap in ((1.0, 0.3 * ratio), (-2.0, None)):
    _, _, _, expected = problems.assert_step_matches_dense(
      step, params, reference, meta_coef, None, cap, projection=projection
    )
    assert expected['cap_bound'] == (cap is not None)


# Magnitudes beyond the square root of float32's range: exact, not dropped.


def _diagonal_loss(p, c, h):
  """``L = Σ cᵢwᵢ + ½ Σ hᵢwᵢ²`` over two leaves: at ``w = 0``, ``g = c`` and ``H·g = h·c``."""
  w = jnp.concatenate([p['a'], p['b']])
  return jnp.sum(c * w) + 0.5 * jnp.sum(h * w * w)


MAGNITUDE_RULES = {
  'unclipped': {},
  'clipped': {'meta_clip_norm': 2.0},
  'capped': {'meta_max_ratio': 0.1},
  'per_leaf': {'projection': 'per_leaf'},
  'per_leaf_capped': {'projection': 'per_leaf', 'meta_max_ratio': 0.1},
  'published': {'meta_coef': -2.0, 'projection': 'per_leaf', 'meta_clip_norm': 1.0},
  'unprojected_clipped': {'orthogonalize': False, 'meta_clip_norm': 2.0},
}
# g ≈ 1 with H·g ≈ 1e20..1e21 (squares beyond float32's 3.4e38), and g ≈ H·g ≈ 1e-30
# (squares below its 1.2e-38). The clip's 1e-6 in ‖m‖ + 1e-6 makes a clipped term of
# 1e-30 vanish by design, so the tiny case runs the rules without a clip.
MAGNITUDES = {'huge_product': (1.0, 1e20), 'tiny_gradient': (1e-30, 1.0)}
MAGNITUDE_CASES = [
  (m, r)
  for m in MAGNITUDES
  for r in MAGNITUDE_RULES
  if m == 'huge_product' or 'meta_clip_norm' not in MAGNITUDE_RULES[r]
]


@functools.cache
def _diagonal_meta_step(rule):
  tx = f3eo_jax.add_meta_gradient(**MAGNITUDE_RULES[rule])

  @jax.jit
  def step(c, h):
    params = {'a': jnp.zeros(2, jnp.float32), 'b': jnp.zeros(2, jnp.float32)}
    obj_fn = lambda p: _diagonal_loss(p, c, h)
    g = jax.grad(obj_fn)(params)
    e, state = tx.update(g, tx.init(params), params, obj_fn=obj_fn)
    return g, e, f3eo_jax.diagnostics(state)

  return step


@pytest.mark.parametrize('magnitude,rule', MAGNITUDE_CASES)
def test_extreme_magnitudes_give_the_exact_meta_term(magnitude, rule):
  grad_scale, curvature_scale = MAGNITUDES[magnitude]
  c = jnp.asarray(np.array([1.0, -0.5, 0.8, 1.2]) * grad_scale, jnp.float32)
  h = jnp.asarray(np.array([3.0, 10.0, 0.5, 2.0]) * curvature_scale, jnp.float32)
  options = MAGNITUDE_RULES[rule]

  g, e, diagnostics = _diagonal_meta_step(rule)(c, h)

  # The float32 inputs, in float64, through the rule in numpy.
  g64, hessian = np.asarray(c, np.float64), np.diag(np.asarray(h, np.float64))
  np.testing.assert_array_equal(dense.ravel(g), g64)
  expected_e, expected = dense.meta_gradient(hessian, g64, [2, 2], **options)
  meta, expected_meta = dense.ravel(e) - g64, expected_e - g64
  assert np.isfinite(dense.ravel(e)).all()
  np.testing.assert_allclose(
    meta, expected_meta, rtol=1e-5, atol=1e-6 * np.abs(expected_meta).max()
  )
  assert np.linalg.norm(meta) > 0.05 * np.linalg.norm(g64)  # present, not dropped
  assert diagnostics['nonfinite_count'] == 0 and diagnostics['mismatch_count'] == 0
  np.testing.assert_allclose(diagnostics['meta_norm'], expected['meta_norm'], rtol=1e-5)
  np.testing.assert_allclose(diagnostics['cap_scale'], expected['cap_scale'], rtol=1e-5)
  assert int(diagnostics['cap_count']) == int(expected['cap_bound'])
  if rule == 'unprojected_clipped':  # clipped to τ and not projected: ‖m‖ = τ
    np.testing.assert_allclose(np.linalg.norm(meta), 2.0, rtol=1e-5)
  if rule == 'clipped':  # clipped to τ, then projected: ‖m⊥‖ = τ·sin∠(g, H·g)
    hg = hessian @ g64
    sine = np.sqrt(1 - (hg @ g64) ** 2 / ((hg @ hg) * (g64 @ g64)))
    np.testing.assert_allclose(np.linalg.norm(meta), 2.0 * sine, rtol=1e-5)
  if rule == 'capped':  # the cap binds: ‖m⊥‖ = ρ‖g‖
    np.testing.assert_allclose(np.linalg.norm(meta), 0.1 * np.linalg.norm(g64), rtol=1e-5)
