"""F3EO with the rest of JAX and Optax: jit, low precision, and inside Optax's wrappers.

``optax.chain``, ``inject_hyperparams``, ``MultiSteps`` and ``apply_if_finite`` give the
same numbers as plain F3EO where they should, and where they cannot (micro-batches of
different data, a NaN gradient, a product that is not finite) F3EO drops its meta term
and says so. Optax's own test patterns are in test_optax_patterns.py.
"""

from __future__ import annotations

import collections
import functools

import _problems as problems
import _references as dense
import jax
import jax.flatten_util
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import f3eo_jax

LEARNING_RATE = problems.LEARNING_RATE


def _loss(params, batch):
  """Cross-entropy of a one-hidden-layer tanh MLP; logits in float32 for any param dtype."""
  x, labels = batch
  hidden = jnp.tanh(
    x.astype(params['hidden']['w'].dtype) @ params['hidden']['w'] + params['hidden']['b']
  )
  logits = hidden @ params['out']['w'] + params['out']['b']
  return optax.softmax_cross_entropy_with_integer_labels(logits.astype(jnp.float32), labels).mean()


def _problem(dtype=jnp.float32, num_batches=3):
  rng = np.random.default_rng(0)
  params = {
    'hidden': {'w': rng.normal(size=(3, 4)) / np.sqrt(3), 'b': 0.5 * rng.normal(size=4)},
    'out': {'w': rng.normal(size=(4, 3)) / 2.0, 'b': 0.5 * rng.normal(size=3)},
  }
  params = jax.tree.map(lambda p: jnp.asarray(p, dtype), params)
  batches = [
    (jnp.asarray(rng.normal(size=(8, 3)), jnp.float32), jnp.asarray(rng.integers(0, 3, 8)))
    for _ in range(num_batches)
  ]
  return params, batches


def _train_step(tx):
  """A training step as a user writes it: obj_fn is a lambda built inside the step."""

  def step(params, opt_state, batch):
    obj_fn = lambda p: _loss(p, batch)
    grads = jax.grad(obj_fn)(params)
    updates, opt_state = tx.update(grads, opt_state, params, obj_fn=obj_fn)
    return optax.apply_updates(params, updates), opt_state

  return step


def _run(step, tx, params, batches):
  opt_state = tx.init(params)
  for batch in batches:
    params, opt_state = step(params, opt_state, batch)
  return params, opt_state


# jit: same numbers, and no retracing.


def test_jit_and_eager_updates_agree():
  # A two-leaf logistic model: eager mode compiles each primitive apart, so keep it small.
  rng = np.random.default_rng(0)
  x, signs = (
    jnp.asarray(rng.normal(size=(8, 3)), jnp.float32),
    jnp.asarray(rng.choice([-1.0, 1.0], 8)),
  )
  loss_fn = lambda p: jnp.mean(jnp.logaddexp(0.0, -signs * jnp.tanh(x @ p['w'] + p['b'])))
  params = {'w': jnp.asarray(rng.normal(size=3), jnp.float32), 'b': jnp.zeros((), jnp.float32)}
  tx = f3eo_jax.add_meta_gradient(-2.0, meta_clip_norm=0.1, hvp_every=2)

  def step(params, state):
    grads = jax.grad(loss_fn)(params)
    e, state = tx.update(grads, state, params, obj_fn=loss_fn)
    return jax.tree.map(lambda p, u: p - 0.5 * u, params, e), state

  jit_step = jax.jit(step)
  eager_params, eager_state = params, tx.init(params)
  jit_params, jit_state = params, tx.init(params)
  for _ in range(3):  # steps 0 and 2 compute H·g, step 1 reuses it
    eager_params, eager_state = step(eager_params, eager_state)
    jit_params, jit_state = jit_step(jit_params, jit_state)

  dense.assert_trees_close(jit_params, eager_params, rtol=1e-5, atol=1e-6)
  dense.assert_trees_close(jit_state, eager_state, rtol=1e-4, atol=1e-6)
  assert not np.allclose(jit_params['w'], params['w'])  # it did move


# Dtypes: updates and state keep them; bfloat16 is accurate to its own precision.


@pytest.mark.parametrize('dtype', [jnp.float32, jnp.bfloat16], ids=['float32', 'bfloat16'])
def test_updates_and_state_keep_the_param_dtype(dtype):
  params, batches = _problem(dtype)
  tx, step = _jitted_train_step('f3eo')  # hvp_every=2: the state holds a stored H·g
  opt_state = tx.init(params)
  state_dtypes = jax.tree.map(lambda x: x.dtype, opt_state)

  for batch in batches:
    params, opt_state, updates = step(params, opt_state, batch)

  assert all(u.dtype == dtype for u in jax.tree.leaves(updates))
  assert jax.tree.map(lambda x: x.dtype, opt_state) == state_dtypes
  meta_state = opt_state[0]
  assert all(h.dtype == dtype for h in jax.tree.leaves(meta_state.hvp))  # stored H·g
  assert all(m.dtype == dtype for m in jax.tree.leaves(opt_state[1].mu))  # Adam moments
  for name, value in f3eo_jax.diagnostics(opt_state).items():
    assert value.dtype == (jnp.int32 if name.endswith('_count') else jnp.float32), name
  assert all(np.isfinite(np.asarray(p, np.float32)).all() for p in jax.tree.leaves(params))


def test_bfloat16_meta_gradient_matches_float32_to_bfloat16_precision():
  params_bf16, batches = _problem(jnp.bfloat16)
  params_f32 = jax.tree.map(lambda p: p.astype(jnp.float32), params_bf16)  # the same values
  tx = f3eo_jax.add_meta_gradient(-2.0, projection='per_leaf')

  @jax.jit
  def effective_gradient(params, batch):
    obj_fn = lambda p: _loss(p, batch)
    grads = jax.grad(obj_fn)(params)
    e, state = tx.update(grads, tx.init(params), params, obj_fn=obj_fn)
    return e, f3eo_jax.diagnostics(state)

  for batch in batches[:2]:
    e_bf16, diagnostics_bf16 = effective_gradient(params_bf16, batch)
    e_f32, diagnostics_f32 = effective_gradient(params_f32, batch)

    assert all(x.dtype == jnp.bfloat16 for x in jax.tree.leaves(e_bf16))
    flat_bf16 = jax.flatten_util.ravel_pytree(
      jax.tree.map(lambda x: x.astype(jnp.float32), e_bf16)
    )[0]
    flat_f32 = jax.flatten_util.ravel_pytree(e_f32)[0]
    assert np.linalg.norm(flat_bf16 - flat_f32) <= 3e-2 * np.linalg.norm(flat_f32)
    for name in ('grad_sq_norm', 'g_dot_hg', 'hg_norm', 'meta_norm'):
      np.testing.assert_allclose(diagnostics_bf16[name], diagnostics_f32[name], rtol=5e-2)


# Inside Optax wrappers: the same numbers as plain F3EO, and diagnostics() finds the state.

_CLIP = 0.05
_PLAIN = f3eo_jax.f3eo(LEARNING_RATE, meta_coef=-2.0, hvp_every=2)
_UNCHECKED = f3eo_jax.f3eo(LEARNING_RATE, meta_coef=-2.0, hvp_every=2, check_consistency=None)
_TRANSFORMS = {
  'f3eo': lambda: _PLAIN,
  'f3eo_reference_amsgrad': lambda: f3eo_jax.f3eo_reference(LEARNING_RATE, amsgrad=True),
  # Clipping before the meta-gradient changes g, which the default gradient check
  # would flag (tests/test_product.py); here the check is off to compare the numbers.
  'chain': lambda: optax.chain(optax.clip_by_global_norm(_CLIP), _UNCHECKED),
  'inject_hyperparams': lambda: optax.inject_hyperparams(f3eo_jax.f3eo)(
    learning_rate=LEARNING_RATE,
    meta_coef=-2.0,
    hvp_every=2,  # all become arrays
  ),
  'multi_steps': lambda: optax.MultiSteps(_PLAIN, every_k_schedule=2),
  'apply_if_finite': lambda: optax.apply_if_finite(_PLAIN, 3),
}
_TRACES = collections.Counter()


@functools.cache
def _jitted_train_step(name):
  """``(tx, step)``: one jitted step per transform, shared by the tests of this file.

  ``step(params, opt_state, batch) -> (params, opt_state, updates)`` counts its traces in
  ``_TRACES[name]``.
  """
  tx = _TRANSFORMS[name]()

  @jax.jit
  def step(params, opt_state, batch):
    _TRACES[name] += 1  # runs only while tracing
    obj_fn = lambda p: _loss(p, batch)  # a new lambda every call, as users write it
    grads = jax.grad(obj_fn)(params)
    updates, opt_state = tx.update(grads, opt_state, params, obj_fn=obj_fn)
    return optax.apply_updates(params, updates), opt_state, updates

  return tx, step


@jax.jit
def _plain_step_on_clipped_grads(params, opt_state, batch):
  obj_fn = lambda p: _loss(p, batch)
  grads = jax.grad(obj_fn)(params)
  clip_binds = optax.tree.norm(grads) > _CLIP
  grads, _ = optax.clip_by_global_norm(_CLIP).update(grads, optax.EmptyState())
  updates, opt_state = _UNCHECKED.update(grads, opt_state, params, obj_fn=obj_fn)
  return optax.apply_updates(params, updates), opt_state, clip_binds


@pytest.mark.parametrize('name', list(_TRANSFORMS))
def test_second_step_does_not_retrace_with_an_obj_fn_lambda_built_inside_the_step(name):
  params, batches = _problem()
  tx, step = _jitted_train_step(name)  # other tests may have compiled it already
  params, opt_state, _ = step(params, tx.init(params), batches[0])
  traces, cache_size = _TRACES[name], step._cache_size()  # pylint: disable=protected-access

  for batch in batches[1:]:
    params, opt_state, _ = step(params, opt_state, batch)

  assert traces >= 1 and _TRACES[name] == traces
  assert step._cache_size() == cache_size  # pylint: disable=protected-access


@pytest.mark.parametrize(
  'wrapper', ['chain', 'inject_hyperparams', 'multi_steps', 'apply_if_finite']
)
def test_f3eo_inside_an_optax_wrapper_matches_plain_f3eo(wrapper):
  params, batches = _problem()
  tx, wrapped_step = _jitted_train_step(wrapper)
  _, plain_step = _jitted_train_step('f3eo')
  wrapped_params, wrapped_state = params, tx.init(params)
  plain_params, plain_state = params, _PLAIN.init(params)

  for batch in batches:
    if wrapper == 'multi_steps':  # two micro-batches of the same batch make one step
      wrapped_params, wrapped_state, _ = wrapped_step(wrapped_params, wrapped_state, batch)
      np.testing.assert_array_equal(wrapped_params['out']['w'], plain_params['out']['w'])
    wrapped_params, wrapped_state, _ = wrapped_step(wrapped_params, wrapped_state, batch)
    if wrapper == 'chain':
      plain_params, plain_state, clip_binds = _plain_step_on_clipped_grads(
        plain_params, plain_state, batch
      )
      assert clip_binds
    else:
      plain_params, plain_state, _ = plain_step(plain_params, plain_state, batch)

    # float32: hyperparameters held as arrays round a little differently
    dense.assert_trees_close(wrapped_params, plain_params, rtol=1e-5, atol=1e-6)
    dense.assert_trees_close(
      f3eo_jax.diagnostics(wrapped_state), f3eo_jax.diagnostics(plain_state), 1e-5, 1e-6
    )
  assert f3eo_jax.diagnostics(wrapped_state)['hg_norm'] > 0


def test_inject_hyperparams_meta_coef_and_learning_rate_can_be_changed_in_the_state():
  params, batches = _problem()
  tx, step = _jitted_train_step('inject_hyperparams')
  opt_state = tx.init(params)
  opt_state.hyperparams['meta_coef'] = jnp.asarray(0.5)
  opt_state.hyperparams['learning_rate'] = jnp.asarray(LEARNING_RATE / 2)

  new_params, _, _ = step(params, opt_state, batches[0])

  expected_tx = f3eo_jax.f3eo(LEARNING_RATE / 2, meta_coef=0.5, hvp_every=2)
  expected, _ = jax.jit(_train_step(expected_tx))(params, expected_tx.init(params), batches[0])
  dense.assert_trees_close(new_params, expected, rtol=1e-5, atol=1e-6)


def test_apply_if_finite_leaves_params_and_inner_state_untouched_on_nan_gradients():
  params, batches = _problem()
  tx, step = _jitted_train_step('apply_if_finite')
  params, opt_state, _ = step(params, tx.init(params), batches[0])  # a finite step first

  @jax.jit
  def nan_step(params, opt_state, batch):
    obj_fn = lambda p: _loss(p, batch)
    grads = jax.tree.map(lambda g: g * jnp.nan, jax.grad(obj_fn)(params))
    updates, opt_state = tx.update(grads, opt_state, params, obj_fn=obj_fn)
    return optax.apply_updates(params, updates), opt_state

  new_params, new_state = nan_step(params, opt_state, batches[1])

  for new, old in zip(jax.tree.leaves(new_params), jax.tree.leaves(params), strict=True):
    np.testing.assert_array_equal(new, old)
  for new, old in zip(
    jax.tree.leaves(new_state.inner_state), jax.tree.leaves(opt_state.inner_state), strict=True
  ):
    np.testing.assert_array_equal(new, old)
  assert int(new_state.notfinite_count) == 1
  assert all(np.isfinite(v) for v in f3eo_jax.diagnostics(new_state).values())


# Non-finite numbers, gradient accumulation and complex params inside Optax wrappers.


@functools.cache
def _apply_if_finite_step(problem):
  loss_fn = problems.NON_FINITE_PROBLEMS[problem]()[0]
  tx = optax.apply_if_finite(f3eo_jax.f3eo(LEARNING_RATE), 3)

  @jax.jit
  def step(params, state, grad_scale):
    grads = jax.tree.map(lambda x: x * grad_scale.astype(x.dtype), jax.grad(loss_fn)(params))
    updates, state = tx.update(grads, state, params, obj_fn=loss_fn)
    return optax.apply_updates(params, updates), state, grads

  return tx, step


@pytest.mark.parametrize('problem', list(problems.NON_FINITE_PROBLEMS))
def test_apply_if_finite_takes_the_step_with_a_dropped_meta_term_and_rejects_nan_gradients(problem):
  _, bad_params, _ = problems.NON_FINITE_PROBLEMS[problem]()
  tx, step = _apply_if_finite_step(problem)

  new_params, state, grads = step(bad_params, tx.init(bad_params), jnp.float32(1.0))

  assert int(state.notfinite_count) == 0 and bool(state.last_finite)  # the step was taken
  assert dense.all_finite(new_params)
  problems.assert_adamw_on(grads, bad_params, new_params, state, rtol=1e-3, atol=1e-4)
  assert not np.allclose(dense.ravel(new_params), dense.ravel(bad_params))
  assert f3eo_jax.diagnostics(state)['nonfinite_count'] == 1

  # A genuinely non-finite gradient is still rejected by apply_if_finite.
  rejected_params, rejected_state, _ = step(new_params, state, jnp.float32(np.nan))

  dense.assert_trees_equal(rejected_params, new_params)
  assert int(rejected_state.notfinite_count) == 1 and not bool(rejected_state.last_finite)
  dense.assert_trees_equal(rejected_state.inner_state, state.inner_state)


def test_multisteps_over_different_micro_batches_is_detected_and_steps_like_adamw_on_the_mean():
  params, batch_a, batch_b = problems.mlp_params(), problems.mlp_batch(0), problems.mlp_batch(1)
  tx = optax.MultiSteps(f3eo_jax.f3eo(LEARNING_RATE), every_k_schedule=2)
  step = problems.update_step(tx)

  params_1, state, grads_a = step(params, tx.init(params), batch_a, batch_a)
  dense.assert_trees_equal(params_1, params)  # the first micro-batch only accumulates
  params_2, state, grads_b = step(params_1, state, batch_b, batch_b)

  # MultiSteps hands F3EO the mean gradient with batch b's obj_fn: the term is dropped.
  mean_grads = jax.tree.map(lambda a, b: (a + b) / 2, grads_a, grads_b)
  problems.assert_adamw_on(mean_grads, params, params_2, state, rtol=1e-6, atol=1e-7)
  diagnostics = f3eo_jax.diagnostics(state)
  assert diagnostics['mismatch_count'] == 1 and diagnostics['grad_mismatch'] > 0.05
  with pytest.raises(f3eo_jax.GradientMismatchError, match='MultiSteps') as info:
    f3eo_jax.raise_on_mismatch(state)
  assert 'accumulated_value_grad_and_hvp' in str(info.value)


def test_inject_hyperparams_works_with_complex_params():
  # Optax casts injected float hyperparameters to the params' complex dtype.
  obj = lambda z: jnp.sum(jnp.real(z) ** 2 + 3 * jnp.imag(z) ** 2 + jnp.real(z) ** 3)
  params = jnp.array([1 + 1j, 2 - 1j], jnp.complex64)
  injected = optax.inject_hyperparams(f3eo_jax.f3eo)(learning_rate=1e-2)
  plain = f3eo_jax.f3eo(1e-2)

  outputs = []
  for tx in (injected, plain):
    p, state = params, tx.init(params)
    for _ in range(3):
      g = jnp.conj(jax.grad(obj)(p))
      updates, state = tx.update(g, state, p, obj_fn=obj)
      p = optax.apply_updates(p, updates)
    outputs.append(p)
    assert f3eo_jax.diagnostics(state)['meta_norm'] > 0
  np.testing.assert_allclose(outputs[0], outputs[1], rtol=1e-5)
