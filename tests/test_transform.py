"""add_meta_gradient's rule (SPEC §2) against a dense float64 reference.

Every numerical check here compares the transform's output with numpy arithmetic on
``jax.hessian`` of the raveled parameters (``_references.py``): the effective gradient
and its diagnostics, the clip, the projection (global and per leaf), the cap, and a
complex leaf as its pair of real parameters. Masks are in test_layout.py, the product
``H·g`` and its storage in test_product.py, the scaled reductions in test_reductions.py.
"""

from __future__ import annotations

import functools

import _problems as problems
import _references as dense
import jax
import jax.flatten_util
import jax.numpy as jnp
import numpy as np
import pytest

import f3eo_jax

META_COEFS = (1.0, -2.0, 0.37)
PROJECTIONS = ('global', 'per_leaf')


@pytest.mark.parametrize('activation', ['tanh', 'relu'])
@pytest.mark.parametrize('projection', PROJECTIONS)
def test_effective_gradient_matches_dense_reference(
  x64, make_mlp, reduction_form, projection, activation
):
  params, loss_fn = make_mlp(activation)
  reference = dense.derivatives(loss_fn, params)
  step = problems.meta_gradient_step(loss_fn, projection=projection)

  for meta_coef in META_COEFS:
    problems.assert_step_matches_dense(step, params, reference, meta_coef, projection=projection)


@pytest.mark.parametrize('projection', PROJECTIONS)
def test_meta_term_is_clipped_to_meta_clip_norm_before_projection(x64, make_mlp, projection):
  params, loss_fn = make_mlp('tanh')
  reference = dense.derivatives(loss_fn, params)
  hg_norm = np.linalg.norm(reference.hessian @ reference.grad)
  step = problems.meta_gradient_step(loss_fn, projection=projection)

  for meta_coef in META_COEFS:
    binding, loose = 0.3 * abs(meta_coef) * hg_norm, 3.0 * abs(meta_coef) * hg_norm
    e = {}
    for clip in (binding, loose):
      _, e[clip], _, _ = problems.assert_step_matches_dense(
        step, params, reference, meta_coef, clip, projection=projection
      )
    # The binding clip changed the result, the loose one did not.
    unclipped, _ = dense.meta_gradient_at(
      reference, params, meta_coef=meta_coef, projection=projection
    )
    assert not np.allclose(dense.ravel(e[binding]), unclipped, rtol=1e-3)
    np.testing.assert_allclose(dense.ravel(e[loose]), unclipped, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize('orthogonalize', [True, False])
@pytest.mark.parametrize('projection', PROJECTIONS)
def test_relative_cap_bounds_the_meta_term_by_a_fraction_of_the_gradient(
  x64, make_mlp, reduction_form, projection, orthogonalize
):
  params, loss_fn = make_mlp('tanh')
  reference = dense.derivatives(loss_fn, params)
  options = dict(projection=projection, orthogonalize=orthogonalize)
  step = problems.meta_gradient_step(loss_fn, **options)
  sizes = dense.leaf_sizes(params)

  for meta_coef in META_COEFS:
    ratio = dense.meta_to_grad_ratio(
      reference.hessian, reference.grad, sizes, meta_coef=meta_coef, **options
    )
    binding, loose = 0.3 * ratio, 3.0 * ratio
    for cap in (binding, loose):
      _, e, diagnostics, expected = problems.assert_step_matches_dense(
        step, params, reference, meta_coef, None, cap, **options
      )
      assert expected['cap_bound'] == (cap == binding)
      if cap == binding:  # ‖m⊥‖ = ρ‖g‖ exactly (global), or at most per leaf
        meta_norm = np.linalg.norm(dense.ravel(e) - reference.grad)
        bound = binding * np.linalg.norm(reference.grad)
        if projection == 'global':
          np.testing.assert_allclose(meta_norm, bound, rtol=1e-9)
        else:
          assert meta_norm <= bound * (1 + 1e-9)
        assert diagnostics['cap_scale'] < 1


@pytest.mark.parametrize('projection', PROJECTIONS)
def test_relative_cap_applies_after_the_absolute_clip_and_outside_the_mask_leaves_g(
  x64, make_mlp, projection
):
  params, loss_fn = make_mlp('tanh')
  reference = dense.derivatives(loss_fn, params)
  mask = problems.MLP_MASKS['bool_tree']
  coordinate_mask = dense.mask_per_coordinate(problems.leaf_mask(mask, params))
  step = problems.meta_gradient_step(loss_fn, projection=projection, meta_mask=mask)
  hg_norm = np.linalg.norm(reference.hessian @ np.where(coordinate_mask, reference.grad, 0))

  for meta_coef, clip, rho in (
    (1.0, 0.5 * hg_norm, 0.05),
    (-2.0, 10 * hg_norm, 0.05),
    (0.37, 0.2 * hg_norm, 10.0),
  ):
    problems.assert_step_matches_dense(
      step, params, reference, meta_coef, clip, rho, projection=projection, mask=coordinate_mask
    )


def test_relative_cap_applies_to_the_stored_product_on_every_update(x64, make_mlp):
  # hvp_every=3: updates 1 and 2 reuse update 0's product, projected and capped against
  # their own gradients (here: the gradient at other params).
  params, loss_fn = make_mlp('tanh')
  other_params = jax.tree.map(lambda p: 1.3 * p, params)
  reference = dense.derivatives(loss_fn, params)
  later = dense.derivatives(loss_fn, other_params)
  stored_hg = reference.hessian @ reference.grad
  _, unravel = jax.flatten_util.ravel_pytree(params)
  rho = 0.1
  for projection in PROJECTIONS:
    tx = f3eo_jax.add_meta_gradient(
      projection=projection, meta_max_ratio=rho, hvp_every=3, check_consistency=None
    )
    state = tx.init(params)
    _, state = tx.update(unravel(reference.grad), state, params, obj_fn=loss_fn)
    for _ in range(2):
      e, state = tx.update(unravel(later.grad), state, other_params, obj_fn=loss_fn)

      expected_e, _ = dense.meta_gradient_at(
        later, params, projection=projection, meta_max_ratio=rho, hg=stored_hg
      )
      np.testing.assert_allclose(dense.ravel(e), expected_e, rtol=1e-9, atol=1e-12)
    assert f3eo_jax.diagnostics(state)['cap_count'] == 3


def test_unorthogonalized_meta_term_is_coef_times_hessian_times_gradient(x64, make_mlp):
  params, loss_fn = make_mlp('tanh')
  reference = dense.derivatives(loss_fn, params)
  step = problems.meta_gradient_step(loss_fn, orthogonalize=False)
  hg = reference.hessian @ reference.grad

  for meta_coef in META_COEFS:
    _, e, diagnostics, _ = problems.assert_step_matches_dense(
      step, params, reference, meta_coef, orthogonalize=False
    )

    expected_e = reference.grad + meta_coef * hg
    np.testing.assert_allclose(dense.ravel(e), expected_e, rtol=1e-9, atol=1e-12)
    expected_norm = abs(meta_coef) * np.linalg.norm(hg)
    np.testing.assert_allclose(diagnostics['meta_norm'], expected_norm, rtol=1e-6)


def test_per_leaf_projection_leaves_a_zero_gradient_leaf_unprojected(x64, make_mlp):
  # A gradient with one leaf zeroed (a frozen bias, say) and the dense H·g as hvp_fn.
  params, loss_fn = make_mlp('tanh')
  reference = dense.derivatives(loss_fn, params)
  _, unravel = jax.flatten_util.ravel_pytree(params)
  g = unravel(reference.grad)
  g['layer_1']['b'] = jnp.zeros_like(g['layer_1']['b'])
  g_flat = dense.ravel(g)
  hessian = jnp.asarray(reference.hessian)
  tx = f3eo_jax.add_meta_gradient(-2.0, projection='per_leaf')

  e, state = jax.jit(
    lambda g: tx.update(
      g,
      tx.init(params),
      params,
      hvp_fn=lambda v: unravel(hessian @ jax.flatten_util.ravel_pytree(v)[0]),
    )
  )(g)

  expected_e, expected_diagnostics = dense.meta_gradient(
    reference.hessian, g_flat, dense.leaf_sizes(params), meta_coef=-2.0, projection='per_leaf'
  )
  np.testing.assert_allclose(dense.ravel(e), expected_e, rtol=1e-9, atol=1e-12)
  hg_bias = unravel(reference.hessian @ g_flat)['layer_1']['b']
  np.testing.assert_allclose(e['layer_1']['b'], -2.0 * hg_bias, rtol=1e-9, atol=1e-12)
  assert np.linalg.norm(hg_bias) > 1e-3  # the unprojected term is really there
  diagnostics = f3eo_jax.diagnostics(state)
  assert np.isnan(diagnostics.pop('grad_mismatch'))  # hvp_fn: nothing to check g against
  assert all(np.isfinite(v) for v in diagnostics.values())


@pytest.mark.parametrize(
  'make_tx',
  [lambda: f3eo_jax.f3eo(1e-2), f3eo_jax.f3eo_reference],
  ids=['f3eo', 'f3eo_reference'],
)
def test_a_zero_gradient_gives_a_finite_update(make_tx):
  params = {'w': jnp.zeros((2, 2)), 'b': jnp.zeros(2)}
  loss_fn = lambda p: jnp.sum(p['w'] ** 2) + jnp.sum(p['b'] ** 4)  # minimum at zero
  tx = make_tx()
  g = jax.grad(loss_fn)(params)
  assert all(np.all(np.asarray(x) == 0.0) for x in jax.tree.leaves(g))

  updates, state = jax.jit(lambda g, s: tx.update(g, s, params, obj_fn=loss_fn))(g, tx.init(params))

  for x in jax.tree.leaves(updates):
    np.testing.assert_array_equal(x, 0.0)
  assert all(np.isfinite(v) for v in f3eo_jax.diagnostics(state).values())


# Complex parameters: exactly the rule on the real pair (Re z, Im z).


@functools.cache
def _complex_coefficients():
  rng = np.random.default_rng(11)
  a = rng.normal(size=(5, 3)) + 1j * rng.normal(size=(5, 3))
  b = rng.normal(size=(5, 2))
  c = rng.normal(size=5) + 1j * rng.normal(size=5)
  return a, b, c


def _complex_loss(params):
  """A real, non-quadratic loss of a complex leaf ``z`` (3,) and a real leaf ``w`` (2,)."""
  a, b, c = (jnp.asarray(x) for x in _complex_coefficients())
  u = a @ params['z'] + (b @ params['w']) * c
  return jnp.sum(jnp.log1p(jnp.abs(u) ** 2)) + 0.3 * jnp.sum(jnp.tanh(params['w']) ** 2)


def _real_pair_loss(params):
  """The same loss of real parameters only: ``z = pair[0] + i·pair[1]``."""
  return _complex_loss({'w': params['w'], 'z': params['z'][0] + 1j * params['z'][1]})


@functools.cache
def _complex_meta_step(projection, clipped_and_capped):
  @jax.jit
  def step(params, meta_coef, meta_clip_norm, meta_max_ratio):
    tx = f3eo_jax.add_meta_gradient(
      meta_coef,
      projection=projection,
      meta_clip_norm=meta_clip_norm if clipped_and_capped else None,
      meta_max_ratio=meta_max_ratio if clipped_and_capped else None,
    )
    # Optax's convention for complex leaves: the update direction is conj(jax.grad).
    g = jax.tree.map(jnp.conj, jax.grad(_complex_loss)(params))
    e, state = tx.update(g, tx.init(params), params, obj_fn=_complex_loss)
    return g, e, f3eo_jax.diagnostics(state)

  return step


@pytest.mark.parametrize('projection', PROJECTIONS)
@pytest.mark.parametrize('clipped_and_capped', [False, True], ids=['plain', 'clipped_capped'])
def test_complex_leaf_gets_the_real_pair_rule_of_the_dense_real_hessian(
  x64, projection, clipped_and_capped
):
  rng = np.random.default_rng(12)
  params = {
    'w': jnp.asarray(rng.normal(size=2)),
    'z': jnp.asarray(rng.normal(size=3) + 1j * rng.normal(size=3)),
  }
  pair = {'w': params['w'], 'z': jnp.stack([params['z'].real, params['z'].imag])}
  reference = dense.derivatives(_real_pair_loss, pair)  # raveled: w (2), Re z (3), Im z (3)
  sizes = [2, 6]  # one segment per leaf: z's segment is the pair
  hg_norm = np.linalg.norm(reference.hessian @ reference.grad)
  step = _complex_meta_step(projection, clipped_and_capped)
  rule = functools.partial(dense.meta_gradient, reference.hessian, reference.grad, sizes)

  for meta_coef in (1.0, -2.0):
    clip, cap = None, None
    if clipped_and_capped:  # both bind: the clip at 0.3·‖c·H·g‖, the cap at a fifth of ‖m⊥‖/‖g‖
      clip = 0.3 * abs(meta_coef) * hg_norm
      clipped_e, _ = rule(meta_coef=meta_coef, projection=projection, meta_clip_norm=clip)
      cap = np.linalg.norm(clipped_e - reference.grad) / np.linalg.norm(reference.grad) / 5
    expected_e, expected_diagnostics = rule(
      meta_coef=meta_coef, projection=projection, meta_clip_norm=clip, meta_max_ratio=cap
    )

    g, e, diagnostics = step(params, meta_coef, clip or 0.0, cap or 0.0)

    # g is the real-pair gradient packed as ∂/∂Re z + i·∂/∂Im z, and so is e.
    np.testing.assert_allclose(dense.ravel(g), reference.grad, rtol=1e-12, atol=1e-14)
    assert e['z'].dtype == jnp.complex128 and e['w'].dtype == jnp.float64
    np.testing.assert_allclose(
      e['z'], expected_e[2:5] + 1j * expected_e[5:8], rtol=1e-9, atol=1e-12
    )
    np.testing.assert_allclose(e['w'], expected_e[:2], rtol=1e-9, atol=1e-12)
    for name in problems.DIAGNOSTICS:
      np.testing.assert_allclose(
        diagnostics[name], expected_diagnostics[name], rtol=1e-5, atol=1e-9, err_msg=name
      )
    assert int(diagnostics['cap_count']) == int(expected_diagnostics['cap_bound'])
    assert expected_diagnostics['cap_bound'] == clipped_and_capped
    assert float(diagnostics['grad_mismatch']) <= 1e-12
    assert not np.allclose(expected_e, reference.grad, rtol=1e-3)  # a real meta term
