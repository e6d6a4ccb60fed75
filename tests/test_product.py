"""The transform's ``H·g``: computed exactly, checked against ``g``, stored and reused.

- Computed: every way the library forms ``H·g`` equals the dense Hessian times ``g``; a
  cut gradient path or another batch's loss fails that check (SPEC §1).
- Checked: with ``obj_fn``, the gradient check compares ``∇obj_fn`` with ``g``; on a
  mismatch it drops the meta term (the step is AdamW on ``g``) without raising in the
  step, and ``raise_on_mismatch`` raises on the host, naming the likely cause.
- Stored: with ``hvp_every=k`` the product is refreshed on updates 0, k, 2k, ... and
  reused in between (scheduled at Python level instead: test_amortize.py).

The check under sharding, ``shard_map`` and ``pmap`` is in test_sharding.py, on two
processes in test_multiprocess.py.
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

K, NUM_STEPS = 3, 7


# Computed: the dense check of H·g.


def hessian_gradient_products(product_of, loss_fn, params):
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
  product, expected = hessian_gradient_products(LIBRARY_PRODUCTS[name], loss_fn, params)
  assert_is_hessian_times_gradient(product, expected)


@pytest.mark.parametrize('name', BROKEN_PRODUCTS)
def test_cut_gradient_paths_fail_the_dense_hessian_check(x64, make_mlp, name):
  params, loss_fn = make_mlp('tanh')
  _, other_batch_loss = make_mlp('tanh', data_seed=2)
  broken = BROKEN_PRODUCTS[name](other_batch_loss)
  product, expected = hessian_gradient_products(broken, loss_fn, params)
  with pytest.raises(AssertionError, match='cut gradient path'):
    assert_is_hessian_times_gradient(product, expected)
  if 'stop_gradient' in name:  # the detach() bug of the seed diary: silently zero
    np.testing.assert_array_equal(product, 0.0)


# Checked: the gradient check.


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

  np.testing.assert_array_equal(dense.ravel(e), dense.ravel(g))  # meta term dropped: e = g
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
  assert not np.allclose(dense.ravel(e), dense.ravel(g))  # the meta term is there
  f3eo_jax.raise_on_mismatch(state)  # does not raise


def test_with_hvp_fn_the_gradient_check_reports_nan_not_zero():
  params, batch = problems.mlp_params(), problems.mlp_batch(0)
  obj_fn = lambda p: problems.mlp_loss(p, batch)
  tx = f3eo_jax.f3eo(problems.LEARNING_RATE, check_consistency=1e-6)

  @jax.jit
  def step(params, state):
    _, grads, hvp_fn = f3eo_jax.value_grad_and_hvp(obj_fn, params)
    return tx.update(grads, state, params, hvp_fn=hvp_fn)

  _, state = step(params, tx.init(params))

  diagnostics = f3eo_jax.diagnostics(state)
  assert np.isnan(diagnostics['grad_mismatch'])  # not measured: never a reassuring 0
  assert diagnostics['mismatch_count'] == 0 and diagnostics['meta_norm'] > 0
  f3eo_jax.raise_on_mismatch(state)  # nothing measured, nothing to raise


def test_infinite_check_consistency_measures_the_mismatch_without_acting_on_it():
  loss = lambda q, t: jnp.sum((q - t) ** 2 * jnp.arange(1.0, 4.0))
  params = jnp.zeros(3)
  g = jax.grad(loss)(params, 1.0)
  tx = f3eo_jax.add_meta_gradient(check_consistency=float('inf'))

  e, state = tx.update(g, tx.init(params), params, obj_fn=lambda q: loss(q, 2.0))

  diagnostics = f3eo_jax.diagnostics(state)
  assert diagnostics['grad_mismatch'] > 0.5 and diagnostics['mismatch_count'] == 0
  assert not np.allclose(e, g)  # the (wrong) meta term was applied, as asked
  f3eo_jax.raise_on_mismatch(state)


def test_clipping_before_the_meta_gradient_is_detected_and_the_message_names_chain_order():
  params, batch = problems.mlp_params(), problems.mlp_batch(0)
  clip = 0.05
  tx = optax.chain(optax.clip_by_global_norm(clip), f3eo_jax.f3eo(problems.LEARNING_RATE))

  new_params, state, grads = problems.update_step(tx)(params, tx.init(params), batch, batch)

  assert optax.tree.norm(grads) > 2 * clip  # the clip binds, so it changed g
  clipped = jax.tree.map(lambda g: g * clip / optax.tree.norm(grads), grads)
  problems.assert_adamw_on(clipped, params, new_params, state, rtol=1e-5, atol=1e-7)
  assert f3eo_jax.diagnostics(state)['mismatch_count'] == 1
  with pytest.raises(
    f3eo_jax.GradientMismatchError,
    match=r'before add_meta_gradient in an optax\.chain[\s\S]*clip_by_global_norm'
    r'[\s\S]*put the meta-gradient first',
  ):
    f3eo_jax.raise_on_mismatch(state)


def test_a_wrong_obj_fn_under_jit_with_donation_gives_a_valid_adamw_step_then_raises_on_host():
  params, batch, other_batch = problems.mlp_params(), problems.mlp_batch(0), problems.mlp_batch(1)
  initial = jax.tree.map(jnp.copy, params)
  tx, step = problems.donating_step('f3eo')

  new_params, state, grads = step(params, tx.init(params), batch, other_batch)  # returns

  assert all(p.is_deleted() for p in jax.tree.leaves(params))
  problems.assert_adamw_on(grads, initial, new_params, state, rtol=1e-6, atol=1e-7)  # e = g
  diagnostics = f3eo_jax.diagnostics(state)
  assert diagnostics['mismatch_count'] == 1 and diagnostics['grad_mismatch'] > 0.05
  with pytest.raises(f3eo_jax.GradientMismatchError, match=r'1 update\(s\)'):
    f3eo_jax.raise_on_mismatch(state)

  # The outputs are a valid state: a correct step continues from them, with the meta term.
  newer_params, state, _ = step(new_params, state, batch, batch)

  diagnostics = f3eo_jax.diagnostics(state)
  assert diagnostics['mismatch_count'] == 1 and diagnostics['grad_mismatch'] <= 1e-2
  assert diagnostics['meta_norm'] > 0 and diagnostics['nonfinite_count'] == 0
  assert dense.all_finite(newer_params)
  assert problems.mlp_loss(newer_params, batch) < problems.mlp_loss(initial, batch)


# Stored: hvp_every=k scheduled in the step (at Python level: test_amortize.py).


def _trajectory(loss_fn, params, num_steps):
  """Fixed params along a line, so different hvp_every see the same params and gradients."""
  direction = jax.tree.map(
    lambda p: 0.2 * jnp.cos(jnp.arange(p.size).reshape(p.shape) + 1.0), params
  )
  return [jax.tree.map(lambda p, d, t=t: p + t * d, params, direction) for t in range(num_steps)]


def test_hvp_every_recomputes_every_k_steps_and_projects_the_stored_product_on_the_current_gradient(
  x64, make_mlp
):
  params, loss_fn = make_mlp('tanh')
  num_steps, k, meta_coef = 7, 3, -2.0

  def run(hvp_every):
    tx = f3eo_jax.add_meta_gradient(meta_coef, hvp_every=hvp_every)

    @jax.jit
    def step(params, state):
      g = jax.grad(loss_fn)(params)
      e, state = tx.update(g, state, params, obj_fn=loss_fn)
      return e, state

    state, outputs = tx.init(params), []
    for p in _trajectory(loss_fn, params, num_steps):
      e, state = step(p, state)
      outputs.append((dense.ravel(e), f3eo_jax.diagnostics(state)))
    return outputs

  every_k, every_step = run(k), run(1)

  stored_hg = None
  for t, p in enumerate(_trajectory(loss_fn, params, num_steps)):
    reference = dense.derivatives(loss_fn, p)
    if t % k == 0:
      stored_hg = reference.hessian @ reference.grad
      np.testing.assert_allclose(every_k[t][0], every_step[t][0], rtol=1e-12, atol=1e-14)
    else:
      assert not np.allclose(every_k[t][0], every_step[t][0], rtol=1e-6)
    expected_e, expected_diagnostics = dense.meta_gradient(
      reference.hessian, reference.grad, dense.leaf_sizes(p), meta_coef=meta_coef, hg=stored_hg
    )
    np.testing.assert_allclose(
      every_k[t][0], expected_e, rtol=1e-9, atol=1e-12, err_msg=f'step {t}'
    )
    for name, value in expected_diagnostics.items():
      if name != 'cap_bound':
        np.testing.assert_allclose(every_k[t][1][name], value, rtol=1e-5, atol=1e-9, err_msg=name)
    # The stored product is projected against the current g: orthogonal to it.
    assert abs((every_k[t][0] - reference.grad) @ reference.grad) <= 1e-10 * np.linalg.norm(
      every_k[t][0] - reference.grad
    ) * np.linalg.norm(reference.grad)


@pytest.mark.parametrize('hvp_every,expected_calls', [(1, NUM_STEPS), (K, 3)])
def test_steps_between_recomputations_do_not_evaluate_hvp_fn(hvp_every, expected_calls):
  params, xs, ys = problems.sequence_problem(NUM_STEPS)
  tx = f3eo_jax.f3eo(problems.LEARNING_RATE, hvp_every=hvp_every)
  calls = []

  @jax.jit
  def step(params, opt_state, x, y):
    obj_fn = lambda p: problems.sequence_loss(p, x, y)
    loss, grads, linear_hvp_fn = f3eo_jax.value_grad_and_hvp(obj_fn, params)

    def hvp_fn(tangent):
      jax.debug.callback(lambda: calls.append(1))
      return linear_hvp_fn(tangent)

    updates, opt_state = tx.update(grads, opt_state, params, hvp_fn=hvp_fn)
    return optax.apply_updates(params, updates), opt_state

  opt_state = tx.init(params)
  for t in range(NUM_STEPS):
    params, opt_state = step(params, opt_state, xs[t], ys[t])
  jax.effects_barrier()

  assert len(calls) == expected_calls
