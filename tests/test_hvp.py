"""The Hessian-vector products of f3eo_jax.hvp against an explicit dense Hessian.

Their misuse errors (an objective that is not a scalar) are in test_checks.py.
"""

from __future__ import annotations

import _problems as problems
import _references as dense
import jax
import jax.flatten_util
import jax.numpy as jnp
import numpy as np
import optax
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


# Gradient accumulation: accumulated_value_grad_and_hvp over micro-batches is exact.


def _stacked(batches):
  return jax.tree.map(lambda *xs: jnp.stack(xs), *batches)


def _concatenated(batches):
  return jax.tree.map(lambda *xs: jnp.concatenate(xs), *batches)


def test_accumulated_value_grad_and_hvp_matches_one_full_batch_f3eo_step_over_three_steps():
  params = problems.mlp_params()
  micro = [problems.mlp_batch(i) for i in range(3)]
  microbatches, full_batch = _stacked(micro), _concatenated(micro)
  tx = f3eo_jax.f3eo(problems.LEARNING_RATE)

  @jax.jit
  def both_steps(acc_params, acc_state, full_params, full_state):
    loss, grads, hvp_fn = f3eo_jax.accumulated_value_grad_and_hvp(
      problems.mlp_loss, acc_params, microbatches
    )
    updates, acc_state = tx.update(grads, acc_state, acc_params, hvp_fn=hvp_fn)
    acc = (optax.apply_updates(acc_params, updates), acc_state, loss)
    obj_fn = lambda p: problems.mlp_loss(p, full_batch)
    loss, grads = jax.value_and_grad(obj_fn)(full_params)
    updates, full_state = tx.update(grads, full_state, full_params, obj_fn=obj_fn)
    return acc, (optax.apply_updates(full_params, updates), full_state, loss)

  acc_params, acc_state = params, tx.init(params)
  full_params, full_state = params, tx.init(params)
  for _ in range(3):
    (acc_params, acc_state, acc_loss), (full_params, full_state, full_loss) = both_steps(
      acc_params, acc_state, full_params, full_state
    )

    np.testing.assert_allclose(acc_loss, full_loss, rtol=1e-6)
    dense.assert_trees_close(acc_params, full_params, rtol=1e-5, atol=1e-6)
    acc_diagnostics = f3eo_jax.diagnostics(acc_state)
    full_diagnostics = f3eo_jax.diagnostics(full_state)
    for name in ('grad_sq_norm', 'g_dot_hg', 'hg_norm', 'meta_norm'):
      np.testing.assert_allclose(acc_diagnostics[name], full_diagnostics[name], rtol=1e-4)
  assert full_diagnostics['meta_norm'] > 0 and full_diagnostics['mismatch_count'] == 0
  assert acc_diagnostics['nonfinite_count'] == 0


def test_accumulated_hvp_fn_is_the_full_batch_hessian_times_v(x64):
  params = problems.mlp_params(jnp.float64)
  micro = [problems.mlp_batch(i, jnp.float64) for i in range(3)]
  reference = dense.derivatives(lambda p: problems.mlp_loss(p, _concatenated(micro)), params)
  flat, unravel = jax.flatten_util.ravel_pytree(params)
  v = np.random.default_rng(7).normal(size=flat.size)

  @jax.jit
  def accumulated(params, v):
    loss, grads, hvp_fn = f3eo_jax.accumulated_value_grad_and_hvp(
      problems.mlp_loss, params, _stacked(micro)
    )
    return loss, grads, hvp_fn(v)

  loss, grads, product = accumulated(params, unravel(v))

  np.testing.assert_allclose(float(loss), reference.loss, rtol=1e-12)
  np.testing.assert_allclose(dense.ravel(grads), reference.grad, rtol=1e-10, atol=1e-13)
  np.testing.assert_allclose(dense.ravel(product), reference.hessian @ v, rtol=1e-9, atol=1e-12)
