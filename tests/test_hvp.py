"""The Hessian-vector products of f3eo_jax.hvp against an explicit dense Hessian."""

from __future__ import annotations

import _references as dense
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import f3eo_jax

ACTIVATIONS = ['tanh', 'relu']


def _random_tangent(params, seed):
  rng = np.random.default_rng(seed)
  return jax.tree.map(lambda p: jnp.asarray(rng.normal(size=p.shape), p.dtype), params)


@pytest.mark.parametrize('activation', ACTIVATIONS)
def test_hvp_equals_dense_hessian_times_tangent(x64, make_mlp, activation):
  params, loss_fn = make_mlp(activation)
  tangent = _random_tangent(params, seed=3)
  expected = dense.hessian(loss_fn, params) @ dense.ravel(tangent)

  product = jax.jit(f3eo_jax.hvp, static_argnums=0)(loss_fn, params, tangent)

  assert jax.tree.structure(product) == jax.tree.structure(params)
  assert all(x.dtype == jnp.float64 for x in jax.tree.leaves(product))
  np.testing.assert_allclose(dense.ravel(product), expected, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize('activation', ACTIVATIONS)
def test_grad_and_hvp_returns_gradient_and_hessian_times_gradient(x64, make_mlp, activation):
  params, loss_fn = make_mlp(activation)
  reference = dense.derivatives(loss_fn, params)

  grads, hg = jax.jit(lambda p: f3eo_jax.grad_and_hvp(loss_fn, p, jax.grad(loss_fn)(p)))(params)

  np.testing.assert_allclose(dense.ravel(grads), reference.grad, rtol=1e-12, atol=1e-14)
  expected = reference.hessian @ reference.grad
  np.testing.assert_allclose(dense.ravel(hg), expected, rtol=1e-10, atol=1e-12)
  assert np.linalg.norm(expected) > 1e-3  # a nontrivial product, not all zeros


@pytest.mark.parametrize('activation', ACTIVATIONS)
def test_value_grad_and_hvp_gives_loss_gradient_and_hessian_map(x64, make_mlp, activation):
  params, loss_fn = make_mlp(activation)
  hessian = dense.hessian(loss_fn, params)
  tangents = [_random_tangent(params, seed) for seed in (5, 6)]

  @jax.jit
  def loss_grads_and_products(p, tangents):
    loss, grads, hvp_fn = f3eo_jax.value_grad_and_hvp(loss_fn, p)
    return loss, grads, [hvp_fn(v) for v in tangents]  # one map, several tangents

  loss, grads, products = loss_grads_and_products(params, tangents)

  np.testing.assert_allclose(loss, dense.derivatives(loss_fn, params).loss, rtol=1e-14)
  np.testing.assert_allclose(
    dense.ravel(grads), dense.derivatives(loss_fn, params).grad, rtol=1e-12, atol=1e-14
  )
  for v, product in zip(tangents, products):
    np.testing.assert_allclose(
      dense.ravel(product), hessian @ dense.ravel(v), rtol=1e-10, atol=1e-12
    )


def test_value_grad_and_hvp_with_aux_returns_loss_and_aux(x64, make_mlp):
  params, loss_fn = make_mlp('tanh')
  hessian = dense.hessian(loss_fn, params)
  v = _random_tangent(params, seed=7)

  def loss_with_aux(p):
    loss = loss_fn(p)
    return loss, {'twice_loss': 2.0 * loss}

  @jax.jit
  def value_grads_and_product(p, tangent):
    value, grads, hvp_fn = f3eo_jax.value_grad_and_hvp(loss_with_aux, p, has_aux=True)
    return value, grads, hvp_fn(tangent)

  (loss, aux), grads, product = value_grads_and_product(params, v)

  np.testing.assert_allclose(loss, dense.derivatives(loss_fn, params).loss, rtol=1e-14)
  np.testing.assert_allclose(
    aux['twice_loss'], 2.0 * dense.derivatives(loss_fn, params).loss, rtol=1e-14
  )
  np.testing.assert_allclose(
    dense.ravel(grads), dense.derivatives(loss_fn, params).grad, rtol=1e-12, atol=1e-14
  )
  np.testing.assert_allclose(dense.ravel(product), hessian @ dense.ravel(v), rtol=1e-10, atol=1e-12)


def test_hvp_casts_tangent_to_param_dtype(make_mlp):
  params, loss_fn = make_mlp('tanh', dtype=jnp.float32)
  tangent = jax.tree.map(lambda p: np.ones(p.shape, np.float64), params)

  product = jax.jit(f3eo_jax.hvp, static_argnums=0)(loss_fn, params, tangent)

  assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(product))


@pytest.mark.parametrize('fn', [f3eo_jax.hvp, f3eo_jax.grad_and_hvp], ids=['hvp', 'grad_and_hvp'])
def test_hvp_rejects_non_scalar_objective(fn):
  params = {'w': jnp.ones(3)}
  with pytest.raises(TypeError, match='scalar'):
    fn(lambda p: p['w'] ** 2, params, params)


def test_value_grad_and_hvp_rejects_non_scalar_objective():
  with pytest.raises(TypeError, match='scalar'):
    f3eo_jax.value_grad_and_hvp(lambda p: p**2, jnp.ones(3))
