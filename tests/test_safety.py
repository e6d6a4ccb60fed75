"""Faults and misuse: what F3EO does with bad numbers, bad hyperparameters and bad wiring.

Each test pins down one safety property of the library: a non-finite or invalid meta term
is dropped for that update (``e = g``) and counted, never passed on or stored; reductions
neither overflow nor underflow; complex leaves are pairs of real parameters; misuse fails
early with a message naming the fix; a wrong ``obj_fn`` never aborts a compiled step.
Numbers are compared with independent computations: ``optax.adamw`` on ``g`` where the
meta term must be dropped, the dense float64 Hessian of the raveled real parameters (or
plain numpy) where it must be present.
"""

from __future__ import annotations

import functools
import math

import _optax_targets
import _references as dense
import jax
import jax.flatten_util
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import f3eo_jax

LEARNING_RATE = 0.05
WEIGHT_DECAY = 1e-4  # f3eo's default, and optax.adamw's


def _leaves64(tree):
  """A pytree's leaves as one float64 vector; a complex leaf as its Re part, then Im part."""
  parts = []
  for x in jax.tree.leaves(tree):
    x = np.asarray(x)
    if np.iscomplexobj(x):
      parts += [x.real.astype(np.float64).ravel(), x.imag.astype(np.float64).ravel()]
    else:
      parts.append(x.astype(np.float64).ravel())
  return np.concatenate(parts)


def _all_finite(tree):
  return all(np.isfinite(np.asarray(x, np.float32)).all() for x in jax.tree.leaves(tree))


def _assert_trees_equal(actual, expected):
  for a, e in zip(jax.tree.leaves(actual), jax.tree.leaves(expected), strict=True):
    assert a.dtype == e.dtype
    np.testing.assert_array_equal(a, e)


def _assert_trees_close(actual, expected, rtol, atol):
  for a, e in zip(jax.tree.leaves(actual), jax.tree.leaves(expected), strict=True):
    np.testing.assert_allclose(np.asarray(a, np.float64), np.asarray(e, np.float64), rtol, atol)


@jax.jit
def _adamw_step(params, grads):
  """One ``optax.adamw`` step on ``grads`` from a fresh state: F3EO with the meta term dropped.

  Returns the new params and Adam's first moment ``(1 − b1)·grads``, which shows the
  gradient that entered Adam more sharply than a first step (about ``lr·sign``) does.
  """
  tx = optax.adamw(LEARNING_RATE, weight_decay=WEIGHT_DECAY)
  updates, state = tx.update(grads, tx.init(params), params)
  return optax.apply_updates(params, updates), optax.tree.get(state, 'mu')


def _assert_adamw_on(grads, params, new_params, state, rtol=1e-5, atol=1e-6):
  """The step from ``params`` was AdamW on ``grads``: the same params and first moment.

  The default tolerances allow for hyperparameters held as float32 arrays
  (``inject_hyperparams``), which round ``1 − b2`` differently from Python floats.
  """
  expected_params, expected_mu = _adamw_step(params, grads)
  _assert_trees_close(new_params, expected_params, rtol, atol)
  _assert_trees_close(optax.tree.get(state, 'mu'), expected_mu, rtol, atol * 1e-2)


def _dense_effective_gradient(loss_fn, params, **options):
  """``(e, diagnostics, derivatives)`` of the rule in numpy, from ``jax.hessian`` in float64.

  The params are cast to float64 (same values) and raveled; ``options`` are those of
  ``meta_gradient`` in _references.py.
  """
  with jax.enable_x64(True):
    params64 = jax.tree.map(lambda p: jnp.asarray(np.asarray(p, np.float64)), params)
    reference = dense.derivatives(loss_fn, params64)
  sizes = [int(np.size(p)) for p in jax.tree.leaves(params)]
  e, diagnostics = dense.meta_gradient(reference.hessian, reference.grad, sizes, **options)
  return e, diagnostics, reference


# A one-hidden-layer tanh MLP and four batches: the problem of most tests below.

_RNG = np.random.default_rng(0)
_MLP_PARAMS = {
  'hidden': {'b': 0.5 * _RNG.normal(size=4), 'w': _RNG.normal(size=(3, 4)) / np.sqrt(3)},
  'out': {'b': 0.5 * _RNG.normal(size=3), 'w': _RNG.normal(size=(4, 3)) / 2.0},
}
_MLP_BATCHES = [(_RNG.normal(size=(8, 3)), _RNG.integers(0, 3, 8)) for _ in range(4)]


def _mlp_params(dtype=jnp.float32):
  return jax.tree.map(lambda p: jnp.asarray(p, dtype), _MLP_PARAMS)


def _mlp_batch(i, dtype=jnp.float32):
  x, labels = _MLP_BATCHES[i]
  return jnp.asarray(x, dtype), jnp.asarray(labels)


def _mlp_loss(params, batch):
  x, labels = batch
  hidden = jnp.tanh(x @ params['hidden']['w'] + params['hidden']['b'])
  logits = hidden @ params['out']['w'] + params['out']['b']
  return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()


_mlp_grads = jax.jit(jax.grad(_mlp_loss))


def _update_step(tx, *, donate=False):
  """A jitted ``(params, state, batch, obj_batch) -> (new params, state, grads)``.

  ``obj_fn`` is the loss on ``obj_batch``: the gradient's own batch for a correct step,
  another one for the classic bug.
  """

  def step(params, state, batch, obj_batch):
    grads = jax.grad(_mlp_loss)(params, batch)
    updates, state = tx.update(grads, state, params, obj_fn=lambda p: _mlp_loss(p, obj_batch))
    return optax.apply_updates(params, updates), state, grads

  return jax.jit(step, donate_argnums=(0, 1) if donate else ())


# --------------------------------------------------------------------------------------
# 1. A non-finite meta term is dropped for that update, never stored, and counted.


def _float16_overflow_problem():
  """float16 params whose ``g`` is finite but whose ``H·g`` exceeds float16's 65504.

  ``L = Σ cᵢwᵢ²`` with ``c = (200, 50)``: at ``w = (1, 1)``, ``g = (400, 100)`` and
  ``H·g = (160000, 10000)``, whose first element overflows to ``inf``. At
  ``w = (0.1, 1)``, ``H·g ≈ (16000, 10000)`` is finite again.
  """
  curvature = np.array([200.0, 50.0])

  def loss_fn(p):
    return jnp.sum(jnp.asarray(curvature, p['w'].dtype) * p['w'] ** 2)

  overflowing = {'w': jnp.array([1.0, 1.0], jnp.float16)}
  finite = {'w': jnp.array([0.1, 1.0], jnp.float16)}
  return loss_fn, overflowing, finite


_NAN_X = np.random.default_rng(3).normal(size=(6, 3))
_NAN_Y = np.random.default_rng(4).normal(size=6)


def _nan_second_derivative_problem():
  """A loss with a finite gradient everywhere but no finite Hessian at ``v = 0``.

  A tanh regression in ``w`` plus an ``L^1.5`` penalty ``Σ|vᵢ|^1.5`` on a second leaf:
  once continuously differentiable, not twice. At ``v = 0`` the penalty's gradient is 0
  and its second derivative infinite; forward-over-reverse multiplies that by the tangent
  ``g_v = 0``, and ``∞·0`` makes ``H·g`` NaN. At ``v ≠ 0`` everything is finite.
  """

  def loss_fn(p):
    x, y = jnp.asarray(_NAN_X, p['w'].dtype), jnp.asarray(_NAN_Y, p['w'].dtype)
    return jnp.mean((jnp.tanh(x @ p['w']) - y) ** 2) + jnp.sum(jnp.abs(p['v']) ** 1.5)

  w = jnp.array([0.8, -0.5, 0.3], jnp.float32)
  at_zero = {'v': jnp.zeros(2, jnp.float32), 'w': w}
  away = {'v': jnp.array([0.5, -0.3], jnp.float32), 'w': w}
  return loss_fn, at_zero, away


NON_FINITE_PROBLEMS = {
  'float16_overflow': _float16_overflow_problem(),
  'nan_second_derivative': _nan_second_derivative_problem(),
}


@functools.cache
def _meta_step(problem):
  """add_meta_gradient(hvp_every=2) and its step ``(params, state) -> (g, e, state, H·g)``."""
  loss_fn = NON_FINITE_PROBLEMS[problem][0]
  tx = f3eo_jax.add_meta_gradient(hvp_every=2)

  @jax.jit
  def step(params, state):
    g = jax.grad(loss_fn)(params)
    e, state = tx.update(g, state, params, obj_fn=loss_fn)
    return g, e, state, f3eo_jax.hvp(loss_fn, params, g)

  return tx, step


@pytest.mark.parametrize('problem', list(NON_FINITE_PROBLEMS))
def test_non_finite_product_gives_e_equal_g_stores_zeros_and_the_next_refresh_works(problem):
  loss_fn, bad_params, good_params = NON_FINITE_PROBLEMS[problem]
  tx, step = _meta_step(problem)
  state = tx.init(bad_params)

  # Update 0 refreshes H·g, which is not finite (g is): e = g exactly, the buffer holds zeros.
  g, e, state, hg = step(bad_params, state)
  assert _all_finite(g) and not _all_finite(hg)
  _assert_trees_equal(e, g)
  for h in jax.tree.leaves(state.hvp):
    np.testing.assert_array_equal(h, 0.0)
  diagnostics = f3eo_jax.diagnostics(state)
  assert diagnostics['nonfinite_count'] == 1 and diagnostics['meta_norm'] == 0
  assert diagnostics['mismatch_count'] == 0

  # Update 1 reuses the stored zeros: still e = g, nothing new to count.
  g, e, state, _ = step(bad_params, state)
  _assert_trees_equal(e, g)
  assert f3eo_jax.diagnostics(state)['nonfinite_count'] == 1

  # Update 2 refreshes at params with a finite product: the meta term is back, exact.
  g, e, state, _ = step(good_params, state)
  expected_e, expected_diagnostics, reference = _dense_effective_gradient(loss_fn, good_params)
  rtol = 5e-3 if problem == 'float16_overflow' else 1e-5
  scale = np.abs(expected_e).max()
  np.testing.assert_allclose(_leaves64(e), expected_e, rtol=rtol, atol=rtol * 1e-2 * scale)
  np.testing.assert_allclose(_leaves64(state.hvp), reference.hessian @ reference.grad, rtol=rtol)
  diagnostics = f3eo_jax.diagnostics(state)
  assert diagnostics['nonfinite_count'] == 1
  np.testing.assert_allclose(diagnostics['meta_norm'], expected_diagnostics['meta_norm'], rtol=rtol)
  assert expected_diagnostics['meta_norm'] > 1e-2 * np.linalg.norm(reference.grad)


@functools.cache
def _apply_if_finite_step(problem):
  loss_fn = NON_FINITE_PROBLEMS[problem][0]
  tx = optax.apply_if_finite(f3eo_jax.f3eo(LEARNING_RATE), 3)

  @jax.jit
  def step(params, state, grad_scale):
    grads = jax.tree.map(lambda x: x * grad_scale.astype(x.dtype), jax.grad(loss_fn)(params))
    updates, state = tx.update(grads, state, params, obj_fn=loss_fn)
    return optax.apply_updates(params, updates), state, grads

  return tx, step


@pytest.mark.parametrize('problem', list(NON_FINITE_PROBLEMS))
def test_apply_if_finite_takes_the_step_with_a_dropped_meta_term_and_rejects_nan_gradients(problem):
  _, bad_params, _ = NON_FINITE_PROBLEMS[problem]
  tx, step = _apply_if_finite_step(problem)

  new_params, state, grads = step(bad_params, tx.init(bad_params), jnp.float32(1.0))

  assert int(state.notfinite_count) == 0 and bool(state.last_finite)  # the step was taken
  assert _all_finite(new_params)
  _assert_adamw_on(grads, bad_params, new_params, state, rtol=1e-3, atol=1e-4)
  assert not np.allclose(_leaves64(new_params), _leaves64(bad_params))
  assert f3eo_jax.diagnostics(state)['nonfinite_count'] == 1

  # A genuinely non-finite gradient is still rejected by apply_if_finite.
  rejected_params, rejected_state, _ = step(new_params, state, jnp.float32(np.nan))

  _assert_trees_equal(rejected_params, new_params)
  assert int(rejected_state.notfinite_count) == 1 and not bool(rejected_state.last_finite)
  _assert_trees_equal(rejected_state.inner_state, state.inner_state)


# --------------------------------------------------------------------------------------
# 2. Invalid hyperparameters injected at run time: the meta term is dropped and counted.


_INJECTED = optax.inject_hyperparams(f3eo_jax.f3eo)(learning_rate=LEARNING_RATE, meta_clip_norm=1.0)
_INJECTED_STEP = _update_step(_INJECTED)

INVALID_INJECTIONS = [
  ('meta_clip_norm', -1.0),
  ('meta_clip_norm', 0.0),
  ('meta_clip_norm', math.nan),
  ('meta_coef', math.nan),
  ('meta_coef', math.inf),
  ('meta_max_ratio', -0.5),
  ('meta_max_ratio', math.nan),
]


@pytest.mark.parametrize('name,value', INVALID_INJECTIONS, ids=str)
def test_invalid_injected_hyperparameter_drops_the_meta_term_like_adamw_on_g(name, value):
  params, batch = _mlp_params(), _mlp_batch(0)
  state = _INJECTED.init(params)
  state.hyperparams[name] = jnp.asarray(value, state.hyperparams[name].dtype)

  new_params, state, grads = _INJECTED_STEP(params, state, batch, batch)

  assert _all_finite(new_params)
  _assert_adamw_on(grads, params, new_params, state)
  diagnostics = f3eo_jax.diagnostics(state)
  assert diagnostics['nonfinite_count'] == 1 and diagnostics['meta_norm'] == 0
  assert diagnostics['mismatch_count'] == 0


def test_a_valid_injected_hyperparameter_is_live():
  params, batch = _mlp_params(), _mlp_batch(0)
  state = _INJECTED.init(params)
  state.hyperparams['meta_coef'] = jnp.asarray(0.5, jnp.float32)  # not weak: no retrace

  new_params, state, grads = _INJECTED_STEP(params, state, batch, batch)

  # The dense rule with the injected values, then AdamW on that e.
  expected_e, _, _ = _dense_effective_gradient(
    lambda p: _mlp_loss(p, batch),
    params,
    meta_coef=0.5,
    meta_clip_norm=1.0,
    meta_max_ratio=f3eo_jax.DEFAULT_META_MAX_RATIO,
  )
  _, unravel = jax.flatten_util.ravel_pytree(params)
  _assert_adamw_on(unravel(jnp.asarray(expected_e, jnp.float32)), params, new_params, state)
  _, mu_on_g = _adamw_step(params, grads)
  assert not np.allclose(_leaves64(optax.tree.get(state, 'mu')), _leaves64(mu_on_g), rtol=1e-2)
  assert f3eo_jax.diagnostics(state)['nonfinite_count'] == 0


# --------------------------------------------------------------------------------------
# 3. Gradient accumulation: MultiSteps is detected; accumulated_value_grad_and_hvp is exact.


def test_multisteps_over_different_micro_batches_is_detected_and_steps_like_adamw_on_the_mean():
  params, batch_a, batch_b = _mlp_params(), _mlp_batch(0), _mlp_batch(1)
  tx = optax.MultiSteps(f3eo_jax.f3eo(LEARNING_RATE), every_k_schedule=2)
  step = _update_step(tx)

  params_1, state, grads_a = step(params, tx.init(params), batch_a, batch_a)
  _assert_trees_equal(params_1, params)  # the first micro-batch only accumulates
  params_2, state, grads_b = step(params_1, state, batch_b, batch_b)

  # MultiSteps hands F3EO the mean gradient with batch b's obj_fn: the term is dropped.
  mean_grads = jax.tree.map(lambda a, b: (a + b) / 2, grads_a, grads_b)
  _assert_adamw_on(mean_grads, params, params_2, state, rtol=1e-6, atol=1e-7)
  diagnostics = f3eo_jax.diagnostics(state)
  assert diagnostics['mismatch_count'] == 1 and diagnostics['grad_mismatch'] > 0.05
  with pytest.raises(f3eo_jax.GradientMismatchError, match='MultiSteps') as info:
    f3eo_jax.raise_on_mismatch(state)
  assert 'accumulated_value_grad_and_hvp' in str(info.value)


def _stacked(batches):
  return jax.tree.map(lambda *xs: jnp.stack(xs), *batches)


def _concatenated(batches):
  return jax.tree.map(lambda *xs: jnp.concatenate(xs), *batches)


def test_accumulated_value_grad_and_hvp_matches_one_full_batch_f3eo_step_over_three_steps():
  params = _mlp_params()
  micro = [_mlp_batch(i) for i in range(3)]
  microbatches, full_batch = _stacked(micro), _concatenated(micro)
  tx = f3eo_jax.f3eo(LEARNING_RATE)

  @jax.jit
  def both_steps(acc_params, acc_state, full_params, full_state):
    loss, grads, hvp_fn = f3eo_jax.accumulated_value_grad_and_hvp(
      _mlp_loss, acc_params, microbatches
    )
    updates, acc_state = tx.update(grads, acc_state, acc_params, hvp_fn=hvp_fn)
    acc = (optax.apply_updates(acc_params, updates), acc_state, loss)
    obj_fn = lambda p: _mlp_loss(p, full_batch)
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
    _assert_trees_close(acc_params, full_params, rtol=1e-5, atol=1e-6)
    acc_diagnostics = f3eo_jax.diagnostics(acc_state)
    full_diagnostics = f3eo_jax.diagnostics(full_state)
    for name in ('grad_sq_norm', 'g_dot_hg', 'hg_norm', 'meta_norm'):
      np.testing.assert_allclose(acc_diagnostics[name], full_diagnostics[name], rtol=1e-4)
  assert full_diagnostics['meta_norm'] > 0 and full_diagnostics['mismatch_count'] == 0
  assert acc_diagnostics['nonfinite_count'] == 0


def test_accumulated_hvp_fn_is_the_full_batch_hessian_times_v(x64):
  params = _mlp_params(jnp.float64)
  micro = [_mlp_batch(i, jnp.float64) for i in range(3)]
  reference = dense.derivatives(lambda p: _mlp_loss(p, _concatenated(micro)), params)
  flat, unravel = jax.flatten_util.ravel_pytree(params)
  v = np.random.default_rng(7).normal(size=flat.size)

  @jax.jit
  def accumulated(params, v):
    loss, grads, hvp_fn = f3eo_jax.accumulated_value_grad_and_hvp(
      _mlp_loss, params, _stacked(micro)
    )
    return loss, grads, hvp_fn(v)

  loss, grads, product = accumulated(params, unravel(v))

  np.testing.assert_allclose(float(loss), reference.loss, rtol=1e-12)
  np.testing.assert_allclose(_leaves64(grads), reference.grad, rtol=1e-10, atol=1e-13)
  np.testing.assert_allclose(_leaves64(product), reference.hessian @ v, rtol=1e-9, atol=1e-12)


# --------------------------------------------------------------------------------------
# 4. Complex parameters: exactly the rule on the real pair (Re z, Im z).

_COMPLEX_RNG = np.random.default_rng(11)
_A = _COMPLEX_RNG.normal(size=(5, 3)) + 1j * _COMPLEX_RNG.normal(size=(5, 3))
_B = _COMPLEX_RNG.normal(size=(5, 2))
_C = _COMPLEX_RNG.normal(size=5) + 1j * _COMPLEX_RNG.normal(size=5)


def _complex_loss(params):
  """A real, non-quadratic loss of a complex leaf ``z`` (3,) and a real leaf ``w`` (2,)."""
  u = jnp.asarray(_A) @ params['z'] + (jnp.asarray(_B) @ params['w']) * jnp.asarray(_C)
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


@pytest.mark.parametrize('projection', ['global', 'per_leaf'])
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

  for meta_coef in (1.0, -2.0):
    clip, cap = None, None
    if clipped_and_capped:  # both bind: the clip at 0.3·‖c·H·g‖, the cap at a fifth of ‖m⊥‖/‖g‖
      clip = 0.3 * abs(meta_coef) * hg_norm
      clipped_e, _ = dense.meta_gradient(
        reference.hessian,
        reference.grad,
        sizes,
        meta_coef=meta_coef,
        projection=projection,
        meta_clip_norm=clip,
      )
      cap = np.linalg.norm(clipped_e - reference.grad) / np.linalg.norm(reference.grad) / 5
    expected_e, expected_diagnostics = dense.meta_gradient(
      reference.hessian,
      reference.grad,
      sizes,
      meta_coef=meta_coef,
      projection=projection,
      meta_clip_norm=clip,
      meta_max_ratio=cap,
    )

    g, e, diagnostics = step(params, meta_coef, clip or 0.0, cap or 0.0)

    # g is the real-pair gradient packed as ∂/∂Re z + i·∂/∂Im z, and so is e.
    np.testing.assert_allclose(_leaves64(g), reference.grad, rtol=1e-12, atol=1e-14)
    assert e['z'].dtype == jnp.complex128 and e['w'].dtype == jnp.float64
    np.testing.assert_allclose(
      e['z'], expected_e[2:5] + 1j * expected_e[5:8], rtol=1e-9, atol=1e-12
    )
    np.testing.assert_allclose(e['w'], expected_e[:2], rtol=1e-9, atol=1e-12)
    for name in ('grad_sq_norm', 'g_dot_hg', 'hg_norm', 'meta_norm', 'cos_g_hg', 'cap_scale'):
      np.testing.assert_allclose(
        diagnostics[name], expected_diagnostics[name], rtol=1e-5, atol=1e-9, err_msg=name
      )
    assert int(diagnostics['cap_count']) == int(expected_diagnostics['cap_bound'])
    assert expected_diagnostics['cap_bound'] == clipped_and_capped
    assert float(diagnostics['grad_mismatch']) <= 1e-12
    assert not np.allclose(expected_e, reference.grad, rtol=1e-3)  # a real meta term


@pytest.mark.parametrize('optimizer', ['f3eo', 'f3eo_reference'])
def test_complex64_alias_targets_reach_the_optimum(optimizer):
  """optax's alias_test targets in complex64 (optimum at ``a = 1+1j``), 10000 steps.

  At learning rate 2e-3, not 1e-3: the parabola starts 11 units from its optimum in one
  coordinate and an Adam step moves a coordinate by about the learning rate at most, so
  at 1e-3 no Adam-based optimizer reaches it in 10000 steps (``optax.adam`` included:
  measured error 2.3). The runs are shared with ``test_optax_patterns.py``.
  """
  for target in ('parabola', 'rosenbrock'):
    run = _optax_targets.run(optimizer, target, 'complex64')

    assert run.params.dtype == np.complex64
    np.testing.assert_allclose(run.params, run.final_params, rtol=3e-2, atol=3e-2, err_msg=target)


# --------------------------------------------------------------------------------------
# 5. Magnitudes beyond the square root of float32's range: exact, not dropped.


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
  np.testing.assert_array_equal(_leaves64(g), g64)
  expected_e, expected = dense.meta_gradient(hessian, g64, [2, 2], **options)
  meta, expected_meta = _leaves64(e) - g64, expected_e - g64
  assert np.isfinite(_leaves64(e)).all()
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


# --------------------------------------------------------------------------------------
# 6. Donation: every optimizer's fresh state can be donated.

PUBLIC_OPTIMIZERS = {
  'f3eo': lambda: f3eo_jax.f3eo(LEARNING_RATE),
  'f3eo_hvp_every_3': lambda: f3eo_jax.f3eo(LEARNING_RATE, hvp_every=3),
  'f3eo_reference': lambda: f3eo_jax.f3eo_reference(LEARNING_RATE),
  'f3eo_reference_amsgrad': lambda: f3eo_jax.f3eo_reference(LEARNING_RATE, amsgrad=True),
  'add_meta_gradient_adam': lambda: optax.chain(
    f3eo_jax.add_meta_gradient(), optax.adam(LEARNING_RATE)
  ),
}


@functools.cache
def _donating_step(name):
  tx = PUBLIC_OPTIMIZERS[name]()
  return tx, _update_step(tx, donate=True)


@pytest.mark.parametrize('name', list(PUBLIC_OPTIMIZERS))
def test_the_params_and_a_fresh_state_can_be_donated(name):
  tx, step = _donating_step(name)
  params, batch = _mlp_params(), _mlp_batch(0)

  # Fails with 'donate the same buffer twice' if two state leaves share a buffer.
  new_params, new_state, _ = step(params, tx.init(params), batch, batch)
  new_params, new_state, _ = step(new_params, new_state, _mlp_batch(1), _mlp_batch(1))

  assert all(p.is_deleted() for p in jax.tree.leaves(params))  # donation really happened
  assert _all_finite(new_params) and f3eo_jax.diagnostics(new_state)['meta_norm'] > 0


# --------------------------------------------------------------------------------------
# 7. Misuse fails early, with a message that names the fix.


def _traced_update(tx, params, grads, **kwargs):
  """Traces one update (no compilation): errors of the trace surface here."""
  return jax.eval_shape(lambda g: tx.update(g, tx.init(params), params, **kwargs), grads)


def test_obj_fn_returning_loss_and_aux_raises_naming_the_fix():
  params, batch = _mlp_params(), _mlp_batch(0)
  tx = f3eo_jax.f3eo(LEARNING_RATE)

  with pytest.raises(TypeError, match=r'tuple of 2 items[\s\S]*loss_fn\(p\)\[0\]'):
    _traced_update(
      tx,
      params,
      _mlp_grads(params, batch),
      obj_fn=lambda p: (_mlp_loss(p, batch), {'accuracy': 1.0}),
    )


@pytest.mark.parametrize('wrapper', ['masked', 'multi_transform', 'partition'])
def test_f3eo_inside_an_optax_partitioner_fails_at_init_naming_meta_mask(wrapper):
  labels = {'hidden': 'f3eo', 'out': 'adam'}
  transforms = {'f3eo': f3eo_jax.f3eo(LEARNING_RATE), 'adam': optax.adam(LEARNING_RATE)}
  tx = {
    'masked': lambda: optax.masked(f3eo_jax.f3eo(LEARNING_RATE), {'hidden': True, 'out': False}),
    'multi_transform': lambda: optax.multi_transform(transforms, labels),
    'partition': lambda: optax.partition(transforms, labels),
  }[wrapper]()

  with pytest.raises(TypeError, match=r'optax\.masked[\s\S]*meta_mask=') as info:
    tx.init(_mlp_params())
  assert 'MaskedNode' in str(info.value)


def test_flax_train_state_apply_gradients_with_obj_fn_names_the_f3eo_helper():
  from flax.training import train_state

  params, batch = _mlp_params(), _mlp_batch(0)
  state = train_state.TrainState.create(
    apply_fn=None, params=params, tx=f3eo_jax.f3eo(LEARNING_RATE)
  )

  with pytest.raises(TypeError, match=r'f3eo_jax\.flax\.apply_gradients\(state, grads, obj_fn='):
    jax.eval_shape(
      lambda s, g: s.apply_gradients(grads=g, obj_fn=lambda p: _mlp_loss(p, batch)),
      state,
      _mlp_grads(params, batch),
    )


def test_integer_and_bool_leaves_are_accepted_like_adamw_and_get_no_meta_term():
  params, batch = _mlp_params(), _mlp_batch(0)
  counters = {'flag': jnp.asarray(True), 'step': jnp.asarray(7, jnp.int32)}
  with_counters = {**params, **counters}
  loss_fn = lambda p: _mlp_loss({k: p[k] for k in params}, batch)  # ignores the counters
  grads = {**_mlp_grads(params, batch), **jax.tree.map(jnp.zeros_like, counters)}
  meta, f3eo_no_meta = f3eo_jax.add_meta_gradient(), f3eo_jax.f3eo(LEARNING_RATE, meta_coef=0.0)
  adamw = optax.adamw(LEARNING_RATE, weight_decay=WEIGHT_DECAY)

  @jax.jit
  def updates_of(grads, params):
    e, meta_state = meta.update(grads, meta.init(params), params, obj_fn=loss_fn)
    f3eo_updates, _ = f3eo_no_meta.update(grads, f3eo_no_meta.init(params), params, obj_fn=loss_fn)
    adamw_updates, _ = adamw.update(grads, adamw.init(params), params)
    return e, f3eo_jax.diagnostics(meta_state), f3eo_updates, adamw_updates

  e, diagnostics, f3eo_updates, adamw_updates = updates_of(grads, with_counters)

  assert e['step'].dtype == jnp.int32 and int(e['step']) == 0
  assert e['flag'].dtype == jnp.bool_ and not bool(e['flag'])
  # The float leaves' meta term is that of the params without counters (dense reference).
  expected_e, expected_diagnostics, _ = _dense_effective_gradient(
    lambda p: _mlp_loss(p, batch), params
  )
  np.testing.assert_allclose(_leaves64({k: e[k] for k in params}), expected_e, rtol=1e-5, atol=1e-7)
  np.testing.assert_allclose(diagnostics['meta_norm'], expected_diagnostics['meta_norm'], rtol=1e-5)
  assert diagnostics['nonfinite_count'] == 0 and diagnostics['mismatch_count'] == 0
  # The complete optimizer treats the counters (and everything else) as optax.adamw does.
  _assert_trees_equal(f3eo_updates, adamw_updates)


def test_clipping_before_the_meta_gradient_is_detected_and_the_message_names_chain_order():
  params, batch = _mlp_params(), _mlp_batch(0)
  clip = 0.05
  tx = optax.chain(optax.clip_by_global_norm(clip), f3eo_jax.f3eo(LEARNING_RATE))

  new_params, state, grads = _update_step(tx)(params, tx.init(params), batch, batch)

  assert optax.tree.norm(grads) > 2 * clip  # the clip binds, so it changed g
  clipped = jax.tree.map(lambda g: g * clip / optax.tree.norm(grads), grads)
  _assert_adamw_on(clipped, params, new_params, state, rtol=1e-5, atol=1e-7)
  assert f3eo_jax.diagnostics(state)['mismatch_count'] == 1
  with pytest.raises(
    f3eo_jax.GradientMismatchError,
    match=r'before add_meta_gradient in an optax\.chain[\s\S]*clip_by_global_norm'
    r'[\s\S]*put the meta-gradient first',
  ):
    f3eo_jax.raise_on_mismatch(state)


def test_refresh_hvp_must_be_a_python_bool_and_needs_a_stored_product():
  params, batch = _mlp_params(), _mlp_batch(0)
  obj_fn = lambda p: _mlp_loss(p, batch)
  grads = _mlp_grads(params, batch)
  tx = f3eo_jax.add_meta_gradient(hvp_every=2)

  with pytest.raises(TypeError, match=r'refresh_hvp must be a Python bool[\s\S]*hvp_every alone'):
    jax.eval_shape(
      lambda r: tx.update(grads, tx.init(params), params, obj_fn=obj_fn, refresh_hvp=r), True
    )
  every_update = f3eo_jax.add_meta_gradient()
  for refresh in (True, False):
    with pytest.raises(ValueError, match=r'refresh_hvp needs a stored product[\s\S]*hvp_every > 1'):
      _traced_update(every_update, params, grads, obj_fn=obj_fn, refresh_hvp=refresh)


def test_with_hvp_fn_the_gradient_check_reports_nan_not_zero():
  params, batch = _mlp_params(), _mlp_batch(0)
  obj_fn = lambda p: _mlp_loss(p, batch)
  tx = f3eo_jax.f3eo(LEARNING_RATE, check_consistency=1e-6)

  @jax.jit
  def step(params, state):
    _, grads, hvp_fn = f3eo_jax.value_grad_and_hvp(obj_fn, params)
    return tx.update(grads, state, params, hvp_fn=hvp_fn)

  _, state = step(params, tx.init(params))

  diagnostics = f3eo_jax.diagnostics(state)
  assert np.isnan(diagnostics['grad_mismatch'])  # not measured: never a reassuring 0
  assert diagnostics['mismatch_count'] == 0 and diagnostics['meta_norm'] > 0
  f3eo_jax.raise_on_mismatch(state)  # nothing measured, nothing to raise


# --------------------------------------------------------------------------------------
# 8. A wrong obj_fn under jit with donation: the step completes, with e = g.


def test_a_wrong_obj_fn_under_jit_with_donation_gives_a_valid_adamw_step_then_raises_on_host():
  params, batch, other_batch = _mlp_params(), _mlp_batch(0), _mlp_batch(1)
  initial = jax.tree.map(jnp.copy, params)
  tx, step = _donating_step('f3eo')

  new_params, state, grads = step(params, tx.init(params), batch, other_batch)  # returns

  assert all(p.is_deleted() for p in jax.tree.leaves(params))
  _assert_adamw_on(grads, initial, new_params, state, rtol=1e-6, atol=1e-7)  # e = g
  diagnostics = f3eo_jax.diagnostics(state)
  assert diagnostics['mismatch_count'] == 1 and diagnostics['grad_mismatch'] > 0.05
  with pytest.raises(f3eo_jax.GradientMismatchError, match=r'1 update\(s\)'):
    f3eo_jax.raise_on_mismatch(state)

  # The outputs are a valid state: a correct step continues from them, with the meta term.
  newer_params, state, _ = step(new_params, state, batch, batch)

  diagnostics = f3eo_jax.diagnostics(state)
  assert diagnostics['mismatch_count'] == 1 and diagnostics['grad_mismatch'] <= 1e-2
  assert diagnostics['meta_norm'] > 0 and diagnostics['nonfinite_count'] == 0
  assert _all_finite(newer_params)
  assert _mlp_loss(newer_params, batch) < _mlp_loss(initial, batch)


def test_a_meta_term_that_would_overflow_the_parameter_dtype_is_dropped_and_counted():
  # g and H·g are finite float16, but 100·H·g is beyond float16's largest value (65504).
  g = jnp.array([1.0, 2.0], jnp.float16)
  tx = f3eo_jax.add_meta_gradient(100.0, orthogonalize=False, check_consistency=None)

  e, state = tx.update(g, tx.init(g), g, hvp_fn=lambda v: jnp.full(2, 6e4, jnp.float16))

  np.testing.assert_array_equal(np.asarray(e), np.asarray(g))
  assert f3eo_jax.diagnostics(state)['nonfinite_count'] == 1
  # Just inside the range, the same term is applied.
  e, state = tx.update(g, tx.init(g), g, hvp_fn=lambda v: jnp.full(2, 6e2, jnp.float16))
  np.testing.assert_allclose(np.asarray(e, np.float32), [60001.0, 60002.0], rtol=1e-3)
  assert f3eo_jax.diagnostics(state)['nonfinite_count'] == 0


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
