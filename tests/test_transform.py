"""add_meta_gradient against SPEC §1–2, computed independently from a dense Hessian.

Every numerical check here compares the transform's output with numpy arithmetic on
``jax.hessian`` of the raveled parameters (``dense`` fixture, see conftest.py).
"""

from __future__ import annotations

import _references as dense
import jax
import jax.flatten_util
import jax.numpy as jnp
import numpy as np
import pytest

import f3eo_jax

META_COEFS = (1.0, -2.0, 0.37)
PROJECTIONS = ('global', 'per_leaf')
DIAGNOSTICS = ('grad_sq_norm', 'g_dot_hg', 'hg_norm', 'meta_norm', 'cos_g_hg', 'cap_scale')


def _jitted_meta_gradient(loss_fn, **options):
  """``(params, meta_coef, meta_clip_norm, meta_max_ratio=None) -> (g, e, diagnostics)``.

  The hyperparameters are traced arguments, so one compilation serves every value
  tried; ``None`` is an empty pytree, so no clipping or cap (and another compilation).
  """

  @jax.jit
  def step(params, meta_coef, meta_clip_norm, meta_max_ratio=None):
    tx = f3eo_jax.add_meta_gradient(
      meta_coef, meta_clip_norm=meta_clip_norm, meta_max_ratio=meta_max_ratio, **options
    )
    g = jax.grad(loss_fn)(params)
    e, state = tx.update(g, tx.init(params), params, obj_fn=loss_fn)
    return g, e, f3eo_jax.diagnostics(state)

  return step


@pytest.fixture(params=['variadic', 'separate'])
def reduction_form(request, monkeypatch):
  """Both forms of the transform's reductions, whichever this machine's platform compiles:
  a variadic ``lax.reduce`` over short rows of the last axis per pass (CPU) and separate reductions
  (GPU, TPU)."""
  from f3eo_jax import reductions

  platforms = (jax.default_backend(),) if request.param == 'variadic' else ()
  monkeypatch.setattr(reductions, 'ROWS_FIRST_PLATFORMS', platforms)
  return request.param


def _assert_matches_reference(g, e, diagnostics, expected_e, expected_diagnostics, dense):
  np.testing.assert_allclose(dense.ravel(e), expected_e, rtol=1e-9, atol=1e-12)
  for name in DIAGNOSTICS:
    np.testing.assert_allclose(
      diagnostics[name], expected_diagnostics[name], rtol=1e-5, atol=1e-9, err_msg=name
    )
  # The default gradient check ran (obj_fn is the loss of g) and passed.
  assert diagnostics['grad_mismatch'] <= 1e-12
  assert diagnostics['mismatch_count'] == 0 and diagnostics['nonfinite_count'] == 0
  assert diagnostics['cap_count'] == int(expected_diagnostics['cap_bound'])
  for name, value in diagnostics.items():
    assert value.dtype == (jnp.int32 if name.endswith('_count') else jnp.float32), name
  assert jax.tree.structure(e) == jax.tree.structure(g)


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


# SPEC §2: the effective gradient, diagnostics included.


@pytest.mark.parametrize('activation', ['tanh', 'relu'])
@pytest.mark.parametrize('projection', PROJECTIONS)
def test_effective_gradient_matches_dense_reference(
  x64, make_mlp, reduction_form, projection, activation
):
  params, loss_fn = make_mlp(activation)
  reference = dense.derivatives(loss_fn, params)
  step = _jitted_meta_gradient(loss_fn, projection=projection)

  for meta_coef in META_COEFS:
    g, e, diagnostics = step(params, meta_coef, None)

    expected_e, expected_diagnostics = dense.meta_gradient(
      reference.hessian,
      reference.grad,
      dense.leaf_sizes(params),
      meta_coef=meta_coef,
      projection=projection,
    )
    _assert_matches_reference(g, e, diagnostics, expected_e, expected_diagnostics, dense)


@pytest.mark.parametrize('projection', PROJECTIONS)
def test_meta_term_is_clipped_to_meta_clip_norm_before_projection(x64, make_mlp, projection):
  params, loss_fn = make_mlp('tanh')
  reference = dense.derivatives(loss_fn, params)
  hg_norm = np.linalg.norm(reference.hessian @ reference.grad)
  step = _jitted_meta_gradient(loss_fn, projection=projection)

  for meta_coef in META_COEFS:
    binding, loose = 0.3 * abs(meta_coef) * hg_norm, 3.0 * abs(meta_coef) * hg_norm
    for meta_clip_norm in (binding, loose):
      g, e, diagnostics = step(params, meta_coef, meta_clip_norm)

      expected_e, expected_diagnostics = dense.meta_gradient(
        reference.hessian,
        reference.grad,
        dense.leaf_sizes(params),
        meta_coef=meta_coef,
        projection=projection,
        meta_clip_norm=meta_clip_norm,
      )
      _assert_matches_reference(g, e, diagnostics, expected_e, expected_diagnostics, dense)
    # The binding clip changed the result, the loose one did not.
    unclipped, _ = dense.meta_gradient(
      reference.hessian,
      reference.grad,
      dense.leaf_sizes(params),
      meta_coef=meta_coef,
      projection=projection,
    )
    _, e_binding, _ = step(params, meta_coef, binding)
    _, e_loose, _ = step(params, meta_coef, loose)
    assert not np.allclose(dense.ravel(e_binding), unclipped, rtol=1e-3)
    np.testing.assert_allclose(dense.ravel(e_loose), unclipped, rtol=1e-9, atol=1e-12)


def _ratio_of_meta_to_grad(reference, dense, params, **options):
  """``‖m⊥‖ / ‖g‖`` of the uncapped reference rule (per leaf: the largest ratio)."""
  e, _ = dense.meta_gradient(reference.hessian, reference.grad, dense.leaf_sizes(params), **options)
  meta, g = e - reference.grad, reference.grad
  if options.get('projection') == 'per_leaf':
    bounds = np.cumsum([0, *dense.leaf_sizes(params)])
    return max(
      np.linalg.norm(meta[a:b]) / np.linalg.norm(g[a:b]) for a, b in zip(bounds[:-1], bounds[1:])
    )
  return np.linalg.norm(meta) / np.linalg.norm(g)


@pytest.mark.parametrize('orthogonalize', [True, False])
@pytest.mark.parametrize('projection', PROJECTIONS)
def test_relative_cap_bounds_the_meta_term_by_a_fraction_of_the_gradient(
  x64, make_mlp, reduction_form, projection, orthogonalize
):
  params, loss_fn = make_mlp('tanh')
  reference = dense.derivatives(loss_fn, params)
  step = _jitted_meta_gradient(loss_fn, projection=projection, orthogonalize=orthogonalize)

  for meta_coef in META_COEFS:
    options = dict(meta_coef=meta_coef, projection=projection, orthogonalize=orthogonalize)
    ratio = _ratio_of_meta_to_grad(reference, dense, params, **options)
    binding, loose = 0.3 * ratio, 3.0 * ratio
    for meta_max_ratio in (binding, loose):
      g, e, diagnostics = step(params, meta_coef, None, meta_max_ratio)

      expected_e, expected_diagnostics = dense.meta_gradient(
        reference.hessian,
        reference.grad,
        dense.leaf_sizes(params),
        meta_max_ratio=meta_max_ratio,
        **options,
      )
      _assert_matches_reference(g, e, diagnostics, expected_e, expected_diagnostics, dense)
      assert expected_diagnostics['cap_bound'] == (meta_max_ratio == binding)
    # With the cap binding, ‖m⊥‖ = ρ‖g‖ exactly (global), or at most per leaf.
    _, e, diagnostics = step(params, meta_coef, None, binding)
    meta_norm = np.linalg.norm(dense.ravel(e) - reference.grad)
    bound = binding * np.linalg.norm(reference.grad)
    if projection == 'global':
      np.testing.assert_allclose(meta_norm, bound, rtol=1e-9)
    else:
      assert meta_norm <= bound * (1 + 1e-9)
    assert diagnostics['cap_scale'] < 1


@pytest.mark.parametrize('projection', PROJECTIONS)
def test_reductions_over_rows_split_or_whole_match_dense_reference(
  x64, make_mlp, reduction_form, projection
):
  # Last axes of 16 (split into rows of 8 by the CPU form) and 12 (reduced whole), with
  # the cap on, so that the maxima, the inner products and the cap's norm all run.
  params, loss_fn = make_mlp('tanh', widths=(3, 16, 12))
  assert {p.shape[-1] for p in jax.tree.leaves(params)} == {16, 12}
  reference = dense.derivatives(loss_fn, params)
  step = _jitted_meta_gradient(loss_fn, projection=projection)
  ratio = _ratio_of_meta_to_grad(reference, dense, params, meta_coef=1.0, projection=projection)

  for meta_coef, meta_max_ratio in ((1.0, 0.3 * ratio), (-2.0, None)):
    g, e, diagnostics = step(params, meta_coef, None, meta_max_ratio)

    expected_e, expected_diagnostics = dense.meta_gradient(
      reference.hessian,
      reference.grad,
      dense.leaf_sizes(params),
      meta_coef=meta_coef,
      projection=projection,
      meta_max_ratio=meta_max_ratio,
    )
    _assert_matches_reference(g, e, diagnostics, expected_e, expected_diagnostics, dense)
    assert expected_diagnostics['cap_bound'] == (meta_max_ratio is not None)


@pytest.mark.parametrize('projection', PROJECTIONS)
def test_relative_cap_applies_after_the_absolute_clip_and_outside_the_mask_leaves_g(
  x64, make_mlp, projection
):
  params, loss_fn = make_mlp('tanh')
  reference = dense.derivatives(loss_fn, params)
  mask = MASKS['bool_tree']
  coordinate_mask = dense.mask_per_coordinate(_leaf_mask(mask, params))
  step = _jitted_meta_gradient(loss_fn, projection=projection, meta_mask=mask)
  hg_norm = np.linalg.norm(reference.hessian @ np.where(coordinate_mask, reference.grad, 0))

  for meta_coef, clip, rho in (
    (1.0, 0.5 * hg_norm, 0.05),
    (-2.0, 10 * hg_norm, 0.05),
    (0.37, 0.2 * hg_norm, 10.0),
  ):
    g, e, diagnostics = step(params, meta_coef, clip, rho)

    expected_e, expected_diagnostics = dense.meta_gradient(
      reference.hessian,
      reference.grad,
      dense.leaf_sizes(params),
      meta_coef=meta_coef,
      projection=projection,
      meta_clip_norm=clip,
      meta_max_ratio=rho,
      mask=coordinate_mask,
    )
    _assert_matches_reference(g, e, diagnostics, expected_e, expected_diagnostics, dense)


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

      expected_e, _ = dense.meta_gradient(
        later.hessian,
        later.grad,
        dense.leaf_sizes(params),
        projection=projection,
        meta_max_ratio=rho,
        hg=stored_hg,
      )
      np.testing.assert_allclose(dense.ravel(e), expected_e, rtol=1e-9, atol=1e-12)
    assert f3eo_jax.diagnostics(state)['cap_count'] == 3


def test_unorthogonalized_meta_term_is_coef_times_hessian_times_gradient(x64, make_mlp):
  params, loss_fn = make_mlp('tanh')
  reference = dense.derivatives(loss_fn, params)
  step = _jitted_meta_gradient(loss_fn, orthogonalize=False)

  for meta_coef in META_COEFS:
    g, e, diagnostics = step(params, meta_coef, None)

    expected_e = reference.grad + meta_coef * reference.hessian @ reference.grad
    _, expected_diagnostics = dense.meta_gradient(
      reference.hessian,
      reference.grad,
      dense.leaf_sizes(params),
      meta_coef=meta_coef,
      orthogonalize=False,
    )
    _assert_matches_reference(g, e, diagnostics, expected_e, expected_diagnostics, dense)
    np.testing.assert_allclose(
      diagnostics['meta_norm'],
      abs(meta_coef) * np.linalg.norm(reference.hessian @ reference.grad),
      rtol=1e-6,
    )


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


# Masks: outside the mask, plain g, and a zero tangent in the Hessian-vector product.

MASKS = {
  'bool_tree': {'layer_0': {'w': True, 'b': False}, 'layer_1': {'w': False, 'b': True}},
  'prefix': {'layer_0': True, 'layer_1': False},
  'callable': lambda params: jax.tree.map(lambda p: p.ndim == 2, params),
}


def _leaf_mask(mask, params):
  """The mask as arrays shaped like the params, written independently of the library."""
  if callable(mask):
    mask = mask(params)
  return {
    layer: {
      name: np.full(
        np.shape(params[layer][name]),
        bool(mask[layer] if isinstance(mask[layer], bool) else mask[layer][name]),
      )
      for name in params[layer]
    }
    for layer in params
  }


@pytest.mark.parametrize(
  'mask_kind,projection',
  [('bool_tree', 'global'), ('prefix', 'global'), ('callable', 'global'), ('callable', 'per_leaf')],
)
def test_masked_out_leaves_get_plain_gradient_and_zero_tangent(
  x64, make_mlp, mask_kind, projection
):
  params, loss_fn = make_mlp('tanh')
  reference = dense.derivatives(loss_fn, params)
  leaf_mask = _leaf_mask(MASKS[mask_kind], params)
  coordinate_mask = dense.mask_per_coordinate(leaf_mask)
  step = _jitted_meta_gradient(loss_fn, projection=projection, meta_mask=MASKS[mask_kind])

  # A loose clip (1e3) and a binding one (0.05): one compilation for both.
  for meta_coef, meta_clip_norm in ((1.0, 1e3), (-2.0, 0.05), (0.37, 1e3)):
    g, e, diagnostics = step(params, meta_coef, meta_clip_norm)

    expected_e, expected_diagnostics = dense.meta_gradient(
      reference.hessian,
      reference.grad,
      dense.leaf_sizes(params),
      meta_coef=meta_coef,
      projection=projection,
      meta_clip_norm=meta_clip_norm,
      mask=coordinate_mask,
    )
    _assert_matches_reference(g, e, diagnostics, expected_e, expected_diagnostics, dense)
    for e_leaf, g_leaf, m in zip(*map(jax.tree.leaves, (e, g, leaf_mask))):
      if not m.all():
        np.testing.assert_array_equal(e_leaf, g_leaf)  # exactly g
  # The reference really restricts the tangent: H·g_masked differs from H·g there.
  full_tangent = (reference.hessian @ reference.grad)[coordinate_mask]
  masked_tangent = reference.hessian @ np.where(coordinate_mask, reference.grad, 0.0)
  assert not np.allclose(full_tangent, masked_tangent[coordinate_mask], rtol=1e-2)


def test_hvp_fn_receives_a_tangent_that_is_zero_outside_the_mask(make_mlp):
  params, loss_fn = make_mlp('tanh', dtype=jnp.float32)
  tx = f3eo_jax.add_meta_gradient(meta_mask=MASKS['prefix'])

  @jax.jit
  def tangent_seen_by_hvp_fn(params):
    seen = {}

    def hvp_fn(tangent):
      seen['tangent'] = tangent
      return jax.tree.map(jnp.ones_like, tangent)

    g = jax.grad(loss_fn)(params)
    tx.update(g, tx.init(params), params, hvp_fn=hvp_fn)
    return g, seen['tangent']

  g, tangent = tangent_seen_by_hvp_fn(params)

  np.testing.assert_array_equal(tangent['layer_0']['w'], g['layer_0']['w'])
  np.testing.assert_array_equal(tangent['layer_0']['b'], g['layer_0']['b'])
  np.testing.assert_array_equal(tangent['layer_1']['w'], 0.0)
  np.testing.assert_array_equal(tangent['layer_1']['b'], 0.0)


# SPEC §1: the gradient path must stay whole.


def hessian_gradient_products(product_of, loss_fn, params, dense):
  """An implementation's ``H·g`` and the dense reference, both raveled.

  ``product_of(loss_fn, params, g)`` returns the implementation's ``H·g``; the reference
  is ``jax.hessian`` of ``loss_fn`` on the raveled params times ``g``.
  """
  reference = dense.derivatives(loss_fn, params)
  _, unravel = jax.flatten_util.ravel_pytree(params)
  product = jax.jit(lambda p, g: product_of(loss_fn, p, g))(params, unravel(reference.grad))
  return dense.ravel(product), reference.hessian @ reference.grad


def assert_is_hessian_times_gradient(product, expected):
  """The checker: a cut gradient path (a zero product) or another loss's product fails."""
  np.testing.assert_allclose(
    product,
    expected,
    rtol=1e-8,
    atol=1e-10,
    err_msg='H·g differs from the dense Hessian times the gradient: cut gradient path?',
  )


def _meta_term_of(**update_kwargs_of):
  """``H·g`` as add_meta_gradient(1.0, orthogonalize=False) adds it: ``e − g``."""

  def product_of(loss_fn, params, g):
    tx = f3eo_jax.add_meta_gradient(1.0, orthogonalize=False)
    kwargs = {k: f(loss_fn, params) for k, f in update_kwargs_of.items()}
    e, _ = tx.update(g, tx.init(params), params, **kwargs)
    return jax.tree.map(jnp.subtract, e, g)

  return product_of


def _stop_gradient_hvp(loss_fn, params, g):
  """The JAX analogue of the seed's ``detach()``: the inner gradient is a constant."""
  return jax.jvp(lambda p: jax.lax.stop_gradient(jax.grad(loss_fn)(p)), (params,), (g,))[1]


LIBRARY_PRODUCTS = {
  'hvp': lambda loss_fn, p, g: f3eo_jax.hvp(loss_fn, p, g),
  'grad_and_hvp': lambda loss_fn, p, g: f3eo_jax.grad_and_hvp(loss_fn, p, g)[1],
  'value_grad_and_hvp': lambda loss_fn, p, g: f3eo_jax.value_grad_and_hvp(loss_fn, p)[2](g),
  'transform_obj_fn': _meta_term_of(obj_fn=lambda loss_fn, p: loss_fn),
  'transform_hvp_fn': _meta_term_of(
    hvp_fn=lambda loss_fn, p: f3eo_jax.value_grad_and_hvp(loss_fn, p)[2]
  ),
}

# Each takes the loss on another batch (same model, data_seed=2), as a buggy loop would.
BROKEN_PRODUCTS = {
  'stop_gradient_hvp': lambda other_batch_loss: _stop_gradient_hvp,
  'transform_with_stop_gradient_hvp_fn': lambda other_batch_loss: _meta_term_of(
    hvp_fn=lambda loss_fn, p: lambda v: _stop_gradient_hvp(loss_fn, p, v)
  ),
  'hvp_of_other_batch': lambda other_batch_loss: (
    lambda loss_fn, p, g: f3eo_jax.hvp(other_batch_loss, p, g)
  ),
  'transform_with_other_batch_obj_fn': lambda other_batch_loss: _meta_term_of(
    obj_fn=lambda loss_fn, p: other_batch_loss
  ),
}


@pytest.mark.parametrize('name', LIBRARY_PRODUCTS)
def test_library_products_pass_the_dense_hessian_check(x64, make_mlp, name):
  params, loss_fn = make_mlp('tanh')
  product, expected = hessian_gradient_products(LIBRARY_PRODUCTS[name], loss_fn, params, dense)
  assert_is_hessian_times_gradient(product, expected)


@pytest.mark.parametrize('name', BROKEN_PRODUCTS)
def test_cut_gradient_paths_fail_the_dense_hessian_check(x64, make_mlp, name):
  params, loss_fn = make_mlp('tanh')
  _, other_batch_loss = make_mlp('tanh', data_seed=2)
  broken = BROKEN_PRODUCTS[name](other_batch_loss)
  product, expected = hessian_gradient_products(broken, loss_fn, params, dense)
  with pytest.raises(AssertionError, match='cut gradient path'):
    assert_is_hessian_times_gradient(product, expected)
  if 'stop_gradient' in name:  # the detach() bug of the seed diary: silently zero
    np.testing.assert_array_equal(product, 0.0)


def _consistency_checked_step(loss_fn, obj_fn):
  tx = f3eo_jax.add_meta_gradient(check_consistency=1e-6)

  @jax.jit
  def step(params):
    g = jax.grad(loss_fn)(params)
    e, state = tx.update(g, tx.init(params), params, obj_fn=obj_fn)
    return g, e, state

  return step


def test_check_consistency_drops_the_meta_term_of_an_obj_fn_of_another_batch(x64, make_mlp):
  params, loss_fn = make_mlp('tanh')
  _, other_batch_loss = make_mlp('tanh', data_seed=2)
  step = _consistency_checked_step(loss_fn, obj_fn=other_batch_loss)

  g, e, state = step(params)  # returns normally, under jit

  np.testing.assert_array_equal(dense_ravel(e), dense_ravel(g))  # meta term dropped: e = g
  diagnostics = f3eo_jax.diagnostics(state)
  assert diagnostics['mismatch_count'] == 1 and diagnostics['grad_mismatch'] > 0.1
  with pytest.raises(f3eo_jax.GradientMismatchError, match=r'1 update\(s\)[\s\S]*MultiSteps'):
    f3eo_jax.raise_on_mismatch(state)


def test_check_consistency_accepts_the_loss_that_produced_the_gradient(x64, make_mlp):
  params, loss_fn = make_mlp('tanh')
  step = _consistency_checked_step(loss_fn, obj_fn=lambda p: loss_fn(p))

  g, e, state = step(params)

  diagnostics = f3eo_jax.diagnostics(state)
  assert diagnostics['grad_mismatch'] <= 1e-12 and diagnostics['mismatch_count'] == 0
  assert not np.allclose(dense_ravel(e), dense_ravel(g))  # the meta term is there
  f3eo_jax.raise_on_mismatch(state)  # does not raise


def dense_ravel(tree):
  return np.concatenate([np.ravel(x) for x in jax.tree.leaves(tree)])


# Errors: raised early, naming the fix or the bad value.


def _tiny():
  params = {'w': jnp.ones((2, 2)), 'b': jnp.zeros(2)}
  loss_fn = lambda p: jnp.sum(jnp.tanh(p['w']) ** 2) + jnp.sum(p['b'] ** 2)
  return params, loss_fn, jax.grad(loss_fn)(params)


@pytest.mark.parametrize('which', ['neither', 'both'])
def test_update_needs_exactly_one_of_obj_fn_and_hvp_fn(which):
  params, loss_fn, g = _tiny()
  tx = f3eo_jax.add_meta_gradient()
  kwargs = (
    {}
    if which == 'neither'
    else {'obj_fn': loss_fn, 'hvp_fn': lambda v: f3eo_jax.hvp(loss_fn, params, v)}
  )

  with pytest.raises(TypeError) as info:
    tx.update(g, tx.init(params), params, **kwargs)

  message = str(info.value)
  assert which in message
  assert 'obj_fn=' in message and 'hvp_fn=' in message
  assert 'tx.update(grads, state, params, obj_fn=lambda p: loss(p, batch))' in message


def test_update_rejects_a_non_scalar_obj_fn_at_trace_time():
  params, loss_fn, g = _tiny()
  tx = f3eo_jax.add_meta_gradient()

  with pytest.raises(TypeError, match=r'scalar[\s\S]*\(2,\)'):
    jax.eval_shape(lambda g: tx.update(g, tx.init(params), params, obj_fn=lambda p: p['b'] ** 2), g)


def test_update_with_obj_fn_needs_params():
  params, loss_fn, g = _tiny()
  tx = f3eo_jax.add_meta_gradient()

  with pytest.raises(ValueError, match='params'):
    tx.update(g, tx.init(params), None, obj_fn=loss_fn)


@pytest.mark.parametrize(
  'bad_hvp_fn,match',
  [
    (lambda v: {'w': v['w']}, 'structure'),
    (lambda v: [v['w'], v['b']], 'structure'),
    (lambda v: {'w': v['w'], 'b': jnp.zeros(3)}, r'shape \(3,\)'),
    (lambda v: {'w': v['w'].T[:1], 'b': v['b']}, r'shape \(1, 2\)'),
  ],
  ids=['missing_leaf', 'list_not_dict', 'wrong_bias_shape', 'wrong_weight_shape'],
)
def test_update_rejects_an_hvp_fn_whose_output_does_not_match_the_gradients(bad_hvp_fn, match):
  params, _, g = _tiny()
  tx = f3eo_jax.add_meta_gradient()

  with pytest.raises(ValueError, match=match):
    jax.eval_shape(lambda g: tx.update(g, tx.init(params), params, hvp_fn=bad_hvp_fn), g)


BAD_OPTIONS = {
  'projection_foo': ({'projection': 'foo'}, ValueError, "'foo'"),
  'hvp_every_0': ({'hvp_every': 0}, ValueError, 'hvp_every.*0'),
  'hvp_every_1.5': ({'hvp_every': 1.5}, TypeError, 'hvp_every.*1.5'),
  'hvp_every_bool': ({'hvp_every': True}, TypeError, 'hvp_every.*True'),
  'hvp_every_2**40': ({'hvp_every': 2**40}, ValueError, 'hvp_every.*1099511627776'),
  'meta_clip_norm_-1': ({'meta_clip_norm': -1.0}, ValueError, 'meta_clip_norm.*-1'),
  'meta_clip_norm_0': ({'meta_clip_norm': 0.0}, ValueError, 'meta_clip_norm.*0'),
  'meta_max_ratio_-0.1': ({'meta_max_ratio': -0.1}, ValueError, 'meta_max_ratio.*-0.1'),
  'meta_max_ratio_str': ({'meta_max_ratio': '0.1'}, TypeError, "meta_max_ratio.*'0.1'"),
  'meta_coef_nan': ({'meta_coef': float('nan')}, ValueError, 'meta_coef.*nan'),
  'meta_coef_str': ({'meta_coef': '1.0'}, TypeError, "meta_coef.*'1.0'"),
  'meta_coef_none': ({'meta_coef': None}, TypeError, 'meta_coef.*None'),
  'meta_coef_vector': ({'meta_coef': np.ones(2)}, TypeError, r'meta_coef.*array\(\[1., 1.\]\)'),
  'meta_coef_complex': ({'meta_coef': 1j}, TypeError, 'meta_coef.*1j'),
  'orthogonalize_str': ({'orthogonalize': 'no'}, TypeError, "orthogonalize.*'no'"),
  'check_consistency_negative': (
    {'check_consistency': -1e-3},
    ValueError,
    'check_consistency.*-0.001',
  ),
  'meta_mask_of_floats': ({'meta_mask': {'w': 1.0, 'b': 0.0}}, TypeError, 'meta_mask.*bools'),
  'meta_mask_of_arrays': (
    {'meta_mask': {'w': np.ones((3, 3), bool), 'b': True}},
    TypeError,
    r'meta_mask[\s\S]*Per-element',
  ),
  'axis_name_list': ({'axis_name': ['data']}, TypeError, 'axis_name'),
}


@pytest.mark.parametrize('name', BAD_OPTIONS)
def test_bad_hyperparameters_raise_at_construction_naming_the_value(name):
  options, error, match = BAD_OPTIONS[name]
  with pytest.raises(error, match=match):
    f3eo_jax.add_meta_gradient(**options)
  with pytest.raises(error, match=match):
    f3eo_jax.f3eo(1e-3, **options)


def test_f3eo_reference_rejects_a_non_bool_amsgrad():
  with pytest.raises(TypeError, match="amsgrad.*'yes'"):
    f3eo_jax.f3eo_reference(amsgrad='yes')


@pytest.mark.parametrize(
  'mask',
  [
    {'w': True},
    {'w': True, 'b': False, 'extra': True},
    [True, False],
    lambda params: {'w': True},
  ],
  ids=['missing_key', 'extra_key', 'list_not_dict', 'callable_with_wrong_tree'],
)
def test_a_mask_that_does_not_fit_the_params_raises_at_init(mask):
  params, _, _ = _tiny()
  tx = f3eo_jax.add_meta_gradient(meta_mask=mask)

  with pytest.raises(ValueError, match='mask') as info:
    tx.init(params)
  assert 'structure' in str(info.value)


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
