"""The complete optimizers f3eo and f3eo_reference (SPEC §3–4); AMSGrad: test_amsgrad.py."""

from __future__ import annotations

import _references as dense
import jax
import jax.flatten_util
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import f3eo_jax

NUM_STEPS = 4


def _run_side_by_side(loss_fn, params, tx_a, tx_b, num_steps=NUM_STEPS):
  """Params after each step for two optimizers driven by the same loss, in one jit."""

  @jax.jit
  def step(params_a, state_a, params_b, state_b):
    out = []
    for tx, params, state in ((tx_a, params_a, state_a), (tx_b, params_b, state_b)):
      updates, state = tx.update(jax.grad(loss_fn)(params), state, params, obj_fn=loss_fn)
      out += [optax.apply_updates(params, updates), state]
    return out

  params_a, state_a, params_b, state_b = params, tx_a.init(params), params, tx_b.init(params)
  trajectory = []
  for _ in range(num_steps):
    params_a, state_a, params_b, state_b = step(params_a, state_a, params_b, state_b)
    trajectory.append((params_a, params_b))
  return trajectory


def _assert_same_trajectory(trajectory, initial_params):
  for t, (params_a, params_b) in enumerate(trajectory):
    np.testing.assert_allclose(
      dense.ravel(params_a), dense.ravel(params_b), rtol=1e-12, atol=1e-14, err_msg=f'step {t}'
    )
  moved = np.abs(dense.ravel(trajectory[-1][0]) - dense.ravel(initial_params)).max()
  assert moved > 1e-3


def test_f3eo_equals_adamw_applied_to_the_effective_gradient(x64, make_mlp):
  params, loss_fn = make_mlp('tanh')
  schedule = optax.cosine_decay_schedule(0.05, decay_steps=NUM_STEPS, alpha=0.1)
  adam_options = dict(b1=0.8, b2=0.95, eps=1e-6)
  meta_options = dict(
    meta_coef=-0.5, projection='per_leaf', meta_clip_norm=0.05, meta_max_ratio=0.3
  )

  f3eo = f3eo_jax.f3eo(schedule, **adam_options, weight_decay=0.1, **meta_options)
  separately = optax.chain(
    f3eo_jax.add_meta_gradient(**meta_options),
    optax.adamw(schedule, **adam_options, weight_decay=0.1),
  )

  _assert_same_trajectory(_run_side_by_side(loss_fn, params, f3eo, separately), params)


def test_f3eo_reference_equals_the_published_meta_rule_then_adamw(x64, make_mlp):
  params, loss_fn = make_mlp('relu')
  reference = f3eo_jax.f3eo_reference(0.01, weight_decay=5e-4)
  published = optax.chain(
    f3eo_jax.add_meta_gradient(-2.0, projection='per_leaf', meta_clip_norm=1.0),
    optax.adamw(0.01, b1=0.9, b2=0.999, eps=1e-8, weight_decay=5e-4),
  )

  _assert_same_trajectory(_run_side_by_side(loss_fn, params, reference, published), params)


def _torch_adamw_step(p, e, state, t, *, lr, b1, b2, eps, weight_decay, amsgrad):
  """One ``torch.optim.AdamW`` step (SPEC §4) in numpy, float64; ``t`` counts from 1."""
  m, v, v_max = state
  p = p - lr * weight_decay * p
  m = b1 * m + (1 - b1) * e
  v = b2 * v + (1 - b2) * e * e
  if amsgrad:
    v_max = np.maximum(v_max, v)
  denominator = np.sqrt(v_max if amsgrad else v) / np.sqrt(1 - b2**t) + eps
  p = p - lr / (1 - b1**t) * m / denominator
  return p, (m, v, v_max)


@pytest.mark.parametrize('amsgrad', [False, True], ids=['adamw', 'amsgrad'])
def test_f3eo_reference_follows_the_pytorch_rule_computed_from_a_dense_hessian(
  x64, make_mlp, amsgrad
):
  params, loss_fn = make_mlp('tanh')
  hyper = dict(lr=0.05, b1=0.9, b2=0.999, eps=1e-8, weight_decay=5e-2)
  tx = f3eo_jax.f3eo_reference(
    hyper['lr'], hyper['b1'], hyper['b2'], hyper['eps'], hyper['weight_decay'], amsgrad=amsgrad
  )
  step = jax.jit(lambda p, s: tx.update(jax.grad(loss_fn)(p), s, p, obj_fn=loss_fn))
  _, unravel = jax.flatten_util.ravel_pytree(params)
  state = tx.init(params)
  p_ref = dense.ravel(params)
  torch_state = (np.zeros_like(p_ref),) * 3

  for t in range(1, NUM_STEPS + 1):
    derivatives = dense.derivatives(loss_fn, unravel(p_ref))
    e, _ = dense.meta_gradient(
      derivatives.hessian,
      derivatives.grad,
      dense.leaf_sizes(params),
      meta_coef=-2.0,
      projection='per_leaf',
      meta_clip_norm=1.0,
    )
    p_ref, torch_state = _torch_adamw_step(p_ref, e, torch_state, t, amsgrad=amsgrad, **hyper)
    updates, state = step(params, state)
    params = optax.apply_updates(params, updates)

    np.testing.assert_allclose(
      dense.ravel(params), p_ref, rtol=1e-9, atol=1e-12, err_msg=f'step {t}'
    )


def test_f3eo_reference_defaults_follow_the_published_optimizer():
  # SPEC §4: lr=1e-3, β=(0.9, 0.999), ε=1e-8, wd=0, amsgrad off.
  params = {'w': jnp.array([0.5, -1.0, 2.0])}
  loss_fn = lambda p: jnp.sum(jnp.sin(p['w']) ** 2)
  reference = f3eo_jax.f3eo_reference()
  published = optax.chain(
    f3eo_jax.add_meta_gradient(-2.0, projection='per_leaf', meta_clip_norm=1.0),
    optax.adamw(1e-3, b1=0.9, b2=0.999, eps=1e-8, weight_decay=0.0),
  )

  for p_a, p_b in _run_side_by_side(loss_fn, params, reference, published, num_steps=2):
    np.testing.assert_allclose(p_a['w'], p_b['w'], rtol=1e-6, atol=1e-9)
