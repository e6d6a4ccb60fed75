"""f3eo_jax.flax: the obj_fn that F3EO needs, built right for Linen and NNX models.

The helpers must give an ``obj_fn`` whose gradient is exactly the gradient being
updated (same batch, dropout masks and batch-norm mode); the core's
``check_consistency`` is the judge. For each Flax trap, a naive ``obj_fn`` is shown to
fail (raise, or give another gradient) and the helper's to pass.
"""

from __future__ import annotations

import functools
import subprocess
import sys
from typing import Any

import flax.errors
import flax.linen as nn
import jax
import jax.flatten_util
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx
from flax.training import train_state

import f3eo_jax
from f3eo_jax import flax as f3eo_flax

NUM_FEATURES, NUM_CLASSES, BATCH = 6, 3, 32
TIGHT = 1e-5  # check_consistency tolerance: the helpers' obj_fn passes it
WRONG = 0.05  # a wrong obj_fn differs by more than this (relative)


def _batch(seed: int = 0) -> tuple[jax.Array, jax.Array]:
  """A learnable batch: labels are the argmax of a fixed random linear map."""
  rng = np.random.default_rng(seed)
  x = rng.normal(size=(BATCH, NUM_FEATURES)).astype(np.float32)
  y = np.argmax(x @ rng.normal(size=(NUM_FEATURES, NUM_CLASSES)), axis=-1)
  return jnp.asarray(x), jnp.asarray(y)


X, Y = _batch()


def xent(labels):
  return lambda logits: optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()


def _assert_mismatch_detected(opt_state):
  """The step ran; its state records the mismatch and raise_on_mismatch raises on the host."""
  assert f3eo_jax.diagnostics(opt_state)['mismatch_count'] >= 1
  with pytest.raises(f3eo_jax.GradientMismatchError, match='differed from the gradients'):
    f3eo_jax.raise_on_mismatch(opt_state)


def _rel_err(a, b) -> float:
  flat = lambda t: np.concatenate([np.ravel(np.asarray(x, np.float64)) for x in jax.tree.leaves(t)])
  a, b = flat(a), flat(b)
  return float(np.linalg.norm(a - b) / np.linalg.norm(b))


def _some_grads(params):
  return jax.tree.map(lambda p: jnp.cos(jnp.arange(p.size, dtype=p.dtype)).reshape(p.shape), params)


def test_importing_f3eo_jax_does_not_import_flax():
  code = 'import sys, f3eo_jax; assert not [m for m in sys.modules if m.split(".")[-1] == "flax"]'
  result = subprocess.run([sys.executable, '-c', code], capture_output=True, text=True, timeout=120)
  assert result.returncode == 0, result.stderr[-2000:]


# ---------------------------------------------------------------------------------------
# Linen


class LinenNet(nn.Module):
  """Dense → BatchNorm → ReLU → Dropout → Dense."""

  @nn.compact
  def __call__(self, x, train: bool):
    x = nn.Dense(16)(x)
    x = nn.BatchNorm(use_running_average=not train, momentum=0.9)(x)
    x = nn.Dropout(0.3, deterministic=not train)(nn.relu(x))
    return nn.Dense(NUM_CLASSES)(x)


class TrainState(train_state.TrainState):
  """The Flax ImageNet example's train state: params plus batch statistics."""

  batch_stats: Any


@functools.cache
def _linen_variables(seed: int) -> dict[str, Any]:
  return jax.jit(lambda key: LinenNet().init(key, X, train=False))(jax.random.key(seed))


def make_linen_state(tx, seed: int = 0) -> TrainState:
  variables = _linen_variables(seed)
  return TrainState.create(
    apply_fn=LinenNet().apply,
    params=variables['params'],
    batch_stats=variables['batch_stats'],
    tx=tx,
  )


def linen_value_grad_and_obj_fn(state, x, y, dropout_key, train=True):
  return f3eo_flax.linen_value_grad_and_obj_fn(
    state.apply_fn,
    {'params': state.params, 'batch_stats': state.batch_stats},
    xent(y),
    x,
    train=train,
    rngs={'dropout': dropout_key},
  )


def linen_train_step(state, x, y, dropout_key):
  key = jax.random.fold_in(dropout_key, state.step)
  (loss, model_state), grads, obj_fn = linen_value_grad_and_obj_fn(state, x, y, key)
  state = f3eo_flax.apply_gradients(
    state, grads, obj_fn=obj_fn, batch_stats=model_state['batch_stats']
  )
  return state, loss


def linen_eval_loss(state, x, y):
  logits = state.apply_fn(
    {'params': state.params, 'batch_stats': state.batch_stats}, x, train=False
  )
  return xent(y)(logits)


def linen_direct_loss(state, params, x, y, dropout_key):
  """The train-mode loss and new batch stats, written out with ``apply``, no helper."""
  logits, updated = state.apply_fn(
    {'params': params, 'batch_stats': state.batch_stats},
    x,
    train=True,
    rngs={'dropout': dropout_key},
    mutable=['batch_stats'],
  )
  return xent(y)(logits), updated['batch_stats']


def _tree_equal(a, b) -> bool:
  return jax.tree.all(jax.tree.map(lambda u, v: bool(jnp.array_equal(u, v)), a, b))


def _dense_hvp(loss_fn, params, tangent) -> np.ndarray:
  """An explicit Hessian of ``loss_fn`` on the raveled params, times ``tangent``."""
  flat, unravel = jax.flatten_util.ravel_pytree(params)
  hessian = jax.jit(jax.hessian(lambda f: loss_fn(unravel(f))))(flat)
  flat_tangent = jax.flatten_util.ravel_pytree(tangent)[0]
  return np.asarray(hessian, np.float64) @ np.asarray(flat_tangent, np.float64)


def test_linen_own_apply_gradients_cannot_pass_obj_fn():
  state = make_linen_state(f3eo_jax.f3eo(1e-2))
  grads = jax.tree.map(jnp.ones_like, state.params)
  with pytest.raises(TypeError, match='exactly one of obj_fn= and hvp_fn='):
    jax.jit(lambda s, g: s.apply_gradients(grads=g))(state, grads)


def _half_sq_norm(params) -> jax.Array:
  """½‖θ‖², whose Hessian is the identity: H·g = g."""
  return 0.5 * sum(jnp.sum(x**2) for x in jax.tree.leaves(params))


def _meta_then_sgd():
  """e = g + H·g (no projection), then θ ← θ − e: the update shows which H·g was used.

  The gradients these tests pass are made up, not the gradient of obj_fn: no check.
  """
  return optax.chain(
    f3eo_jax.add_meta_gradient(orthogonalize=False, check_consistency=None), optax.sgd(1.0)
  )


@pytest.mark.parametrize('curvature', ['obj_fn', 'hvp_fn'])
def test_apply_gradients_forwards_obj_fn_or_hvp_fn_and_replaces_fields(curvature):
  state = make_linen_state(_meta_then_sgd())
  grads = _some_grads(state.params)
  new_stats = jax.tree.map(lambda s: s + 1.0, state.batch_stats)
  if curvature == 'obj_fn':  # H = I, so θ ← θ − 2g
    step = lambda s, g: f3eo_flax.apply_gradients(s, g, obj_fn=_half_sq_norm, batch_stats=new_stats)
    new = jax.jit(step)(state, grads)
    want = jax.tree.map(lambda p, g: p - 2.0 * g, state.params, grads)
  else:  # H = 3·I, so θ ← θ − 4g
    hvp_fn = lambda v: jax.tree.map(lambda x: 3.0 * x, v)
    step = lambda s, g: f3eo_flax.apply_gradients(s, g, hvp_fn=hvp_fn, batch_stats=new_stats)
    new = jax.jit(step)(state, grads)
    want = jax.tree.map(lambda p, g: p - 4.0 * g, state.params, grads)
  assert type(new) is TrainState
  assert int(new.step) == 1
  assert _rel_err(new.params, want) < 1e-6
  assert _tree_equal(new.batch_stats, new_stats)
  assert new.apply_fn is state.apply_fn and new.tx is state.tx


def test_apply_gradients_without_obj_fn_equals_linen_apply_gradients():
  state = make_linen_state(optax.adamw(1e-2, weight_decay=1e-3))
  grads = _some_grads(state.params)
  ours = jax.jit(f3eo_flax.apply_gradients)(state, grads)
  theirs = jax.jit(lambda s, g: s.apply_gradients(grads=g))(state, grads)
  assert _tree_equal(ours.params, theirs.params) and _tree_equal(ours.opt_state, theirs.opt_state)
  assert int(ours.step) == int(theirs.step) == 1


def test_linen_helper_matches_a_hand_written_train_step():
  state = make_linen_state(f3eo_jax.f3eo(1e-2))

  @jax.jit
  def run(state, key):
    (loss, model_state), grads, obj_fn = linen_value_grad_and_obj_fn(state, X, Y, key)
    direct = lambda p: linen_direct_loss(state, p, X, Y, key)
    want = jax.value_and_grad(direct, has_aux=True)(state.params)
    return (loss, model_state['batch_stats'], grads, obj_fn(state.params)), want

  (loss, stats, grads, obj_value), ((want_loss, want_stats), want_grads) = run(
    state, jax.random.key(3)
  )
  np.testing.assert_allclose(loss, want_loss, rtol=1e-6)
  np.testing.assert_allclose(obj_value, want_loss, rtol=1e-6)
  assert _rel_err(grads, want_grads) < 1e-6
  assert _rel_err(stats, want_stats) < 1e-6


def test_linen_helper_has_aux_returns_loss_fn_aux():
  state = make_linen_state(f3eo_jax.f3eo(1e-2))

  @jax.jit
  def run(state):
    loss_and_logits = lambda logits: (xent(Y)(logits), logits)
    ((loss, logits), model_state), _, obj_fn = f3eo_flax.linen_value_grad_and_obj_fn(
      state.apply_fn,
      {'params': state.params, 'batch_stats': state.batch_stats},
      loss_and_logits,
      X,
      train=True,
      rngs={'dropout': jax.random.key(3)},
      has_aux=True,
    )
    return loss, logits, model_state, obj_fn(state.params)

  loss, logits, model_state, obj_value = run(state)
  assert logits.shape == (BATCH, NUM_CLASSES) and set(model_state) == {'batch_stats'}
  np.testing.assert_allclose(obj_value, loss, rtol=1e-6)


def test_linen_obj_fn_hessian_vector_product_matches_dense_hessian():
  state = make_linen_state(f3eo_jax.f3eo(1e-2))
  key = jax.random.key(4)

  @jax.jit
  def run(state):
    _, grads, obj_fn = linen_value_grad_and_obj_fn(state, X, Y, key)
    return grads, f3eo_jax.hvp(obj_fn, state.params, grads)

  grads, hg = run(state)
  want = _dense_hvp(lambda p: linen_direct_loss(state, p, X, Y, key)[0], state.params, grads)
  hg = jax.flatten_util.ravel_pytree(hg)[0]
  assert np.linalg.norm(hg - want) <= 1e-4 * np.linalg.norm(want)


def _linen_grads_and_wrong_obj_fn(state, wrong):
  key = jax.random.key(5)
  _, grads, _ = linen_value_grad_and_obj_fn(state, X, Y, key)
  if wrong == 'dropout_key':
    _, _, wrong_obj_fn = linen_value_grad_and_obj_fn(state, X, Y, jax.random.key(6))
  else:  # batch norm (and dropout) in eval mode
    _, _, wrong_obj_fn = linen_value_grad_and_obj_fn(state, X, Y, key, train=False)
  return grads, wrong_obj_fn


@pytest.mark.parametrize('wrong', ['dropout_key', 'batch_norm_eval_mode'])
def test_linen_consistency_check_catches_a_wrong_obj_fn(wrong):
  state = make_linen_state(f3eo_jax.f3eo(1e-2, check_consistency=TIGHT))

  @jax.jit
  def step(state):
    grads, wrong_obj_fn = _linen_grads_and_wrong_obj_fn(state, wrong)
    return f3eo_flax.apply_gradients(state, grads, obj_fn=wrong_obj_fn)

  @jax.jit
  def gradients(state):
    grads, wrong_obj_fn = _linen_grads_and_wrong_obj_fn(state, wrong)
    return grads, jax.grad(wrong_obj_fn)(state.params)

  _assert_mismatch_detected(step(state).opt_state)
  grads, wrong_grads = gradients(state)
  assert _rel_err(wrong_grads, grads) > WRONG


def test_linen_f3eo_decreases_the_loss_over_50_jitted_steps_with_consistent_obj_fn():
  state = make_linen_state(f3eo_jax.f3eo(1e-2, check_consistency=TIGHT))
  step = jax.jit(linen_train_step)
  eval_loss = jax.jit(linen_eval_loss)
  before = float(eval_loss(state, X, Y))
  for _ in range(50):
    state, _ = step(state, X, Y, jax.random.key(7))
  after = float(eval_loss(state, X, Y))
  assert int(state.step) == 50
  assert after < 0.5 * before, (before, after)
  assert float(f3eo_jax.diagnostics(state.opt_state)['grad_mismatch']) < TIGHT


# ---------------------------------------------------------------------------------------
# NNX


class NnxNet(nnx.Module):
  """The same network in NNX: Linear → BatchNorm → ReLU → Dropout → Linear."""

  def __init__(self, rngs: nnx.Rngs):
    self.dense1 = nnx.Linear(NUM_FEATURES, 16, rngs=rngs)
    self.norm = nnx.BatchNorm(16, momentum=0.9, rngs=rngs)
    self.dropout = nnx.Dropout(0.3, rngs=rngs)
    self.dense2 = nnx.Linear(16, NUM_CLASSES, rngs=rngs)

  def __call__(self, x):
    return self.dense2(self.dropout(nnx.relu(self.norm(self.dense1(x)))))


def make_nnx_model() -> NnxNet:
  return NnxNet(nnx.Rngs(params=0, dropout=1))


def nnx_loss(model, x, y):
  return xent(y)(model(x))


def nnx_eval_loss(model, x, y):
  return nnx_loss(nnx.view(model, deterministic=True, use_running_average=True), x, y)


@functools.cache  # the recipes below are module-level: each compiles once per process
def _nnx_mismatch(make_grads_and_obj_fn) -> float:
  """grad_mismatch of one jitted F3EO update with ``check_consistency=TIGHT``.

  ``make_grads_and_obj_fn(model) -> (grads, obj_fn)`` runs inside ``nnx.jit`` on a
  fresh model.
  """

  @nnx.jit
  def run(model):
    optimizer = nnx.Optimizer(model, f3eo_jax.f3eo(1e-2, check_consistency=TIGHT), wrt=nnx.Param)
    grads, obj_fn = make_grads_and_obj_fn(model)
    optimizer.update(model, grads, obj_fn=obj_fn)
    return f3eo_jax.diagnostics(optimizer.opt_state)

  diagnostics = run(make_nnx_model())
  # The library acts on what it measures: the meta term is dropped exactly when it exceeds TIGHT.
  assert int(diagnostics['mismatch_count']) == int(diagnostics['grad_mismatch'] > TIGHT)
  return float(diagnostics['grad_mismatch'])


def _nnx_gradient_error(make_grads_and_obj_fn) -> float:
  """‖∇obj_fn − g‖ / ‖g‖ at the model's params, computed directly (no F3EO)."""

  @nnx.jit
  def run(model):
    grads, obj_fn = make_grads_and_obj_fn(model)
    params = nnx.as_pure(nnx.state(model, nnx.Param))
    return nnx.as_pure(grads), jax.grad(obj_fn)(params)

  grads, obj_grads = run(make_nnx_model())
  return _rel_err(obj_grads, grads)


def _assert_nnx_obj_fn_is_wrong(make_grads_and_obj_fn):
  assert _nnx_mismatch(make_grads_and_obj_fn) > TIGHT
  assert _nnx_gradient_error(make_grads_and_obj_fn) > WRONG


def helper_then_more_calls(model):
  """The helper's gradient and obj_fn, then another training-mode call of the model."""
  _, grads, obj_fn = f3eo_flax.nnx_value_grad_and_obj_fn(model, nnx_loss, X, Y)
  model(X)  # batch stats and the RNG stream move on; obj_fn must not follow them
  return grads, obj_fn


def test_nnx_optimizer_update_forwards_obj_fn_with_params_as_plain_arrays():
  model = make_nnx_model()
  params = nnx.as_pure(nnx.state(model, nnx.Param))
  optimizer = nnx.Optimizer(model, _meta_then_sgd(), wrt=nnx.Param)
  grads = jax.tree.map(jnp.ones_like, nnx.state(model, nnx.Param))
  seen = []

  def obj_fn(p):
    seen.append(p)
    return _half_sq_norm(p)

  with pytest.raises(TypeError, match='exactly one of obj_fn= and hvp_fn='):
    nnx.jit(lambda o, m, g: o.update(m, g))(optimizer, model, grads)  # F3EO needs obj_fn
  nnx.jit(lambda o, m, g: o.update(m, g, obj_fn=obj_fn))(optimizer, model, grads)

  assert isinstance(seen[0], nnx.State)
  is_variable = lambda x: isinstance(x, nnx.Variable)
  assert not any(is_variable(x) for x in jax.tree.leaves(seen[0], is_leaf=is_variable))
  want = jax.tree.map(lambda p: p - 2.0, params)  # H = I, g = 1: θ ← θ − 2
  assert _rel_err(nnx.as_pure(nnx.state(model, nnx.Param)), want) < 1e-6
  diag = f3eo_jax.diagnostics(optimizer.opt_state)  # looks inside nnx's OptState variables
  assert all(isinstance(v, jax.Array) and v.shape == () for v in diag.values())
  num_params = sum(x.size for x in jax.tree.leaves(params))
  np.testing.assert_allclose(diag['grad_sq_norm'], num_params, rtol=1e-6)
  np.testing.assert_allclose(diag['hg_norm'], np.sqrt(num_params), rtol=1e-6)


def test_nnx_helper_matches_nnx_value_and_grad_and_updates_the_model_state():
  model, twin = make_nnx_model(), make_nnx_model()

  @nnx.jit
  def run(model, twin):
    params = nnx.as_pure(nnx.state(model, nnx.Param))
    loss, grads, obj_fn = f3eo_flax.nnx_value_grad_and_obj_fn(model, nnx_loss, X, Y)
    # obj_fn takes the params as nnx.Optimizer hands them over: a State of plain arrays
    return (loss, grads, obj_fn(params)), nnx.value_and_grad(nnx_loss)(twin, X, Y)

  (loss, grads, obj_value), (want_loss, want_grads) = run(model, twin)
  np.testing.assert_allclose(loss, want_loss, rtol=1e-6)
  np.testing.assert_allclose(obj_value, want_loss, rtol=1e-6)
  assert type(grads) is type(want_grads)
  assert jax.tree.structure(grads) == jax.tree.structure(want_grads)
  assert _rel_err(grads, want_grads) < 1e-6
  # batch statistics and RNG counts advanced exactly as nnx.value_and_grad advances them
  assert int(model.dropout.rngs.count[...]) == 1
  assert not np.allclose(model.norm.mean[...], 0.0)
  rest, want_rest = (nnx.as_pure(nnx.state(m, nnx.Not(nnx.Param))) for m in (model, twin))
  for a, b in zip(jax.tree.leaves(rest), jax.tree.leaves(want_rest)):
    if jnp.issubdtype(a.dtype, jax.dtypes.prng_key):
      a, b = jax.random.key_data(a), jax.random.key_data(b)
    np.testing.assert_allclose(a, b, rtol=1e-6)


def test_nnx_helper_has_aux_returns_loss_fn_aux():
  @nnx.jit
  def run(model):
    with_logits = lambda m, x, y: (nnx_loss(m, x, y), m(x))
    params = nnx.state(model, nnx.Param)
    (loss, logits), _, obj_fn = f3eo_flax.nnx_value_grad_and_obj_fn(
      model, with_logits, X, Y, has_aux=True
    )
    return loss, logits, obj_fn(params)

  loss, logits, obj_value = run(make_nnx_model())
  assert logits.shape == (BATCH, NUM_CLASSES)
  np.testing.assert_allclose(obj_value, loss, rtol=1e-6)


def test_nnx_obj_fn_hessian_vector_product_matches_dense_hessian():
  model = make_nnx_model()
  graphdef, params, rest = nnx.split(model, nnx.Param, ...)
  params, rest = nnx.as_pure(params), nnx.as_pure(rest)  # the pre-step values

  @nnx.jit
  def run(model):
    _, grads, obj_fn = f3eo_flax.nnx_value_grad_and_obj_fn(model, nnx_loss, X, Y)
    grads = nnx.as_pure(grads)
    return grads, f3eo_jax.hvp(obj_fn, params, grads)

  grads, hg = run(model)
  direct_loss = lambda p: nnx_loss(nnx.merge(graphdef, p, rest, copy=True), X, Y)
  want = _dense_hvp(direct_loss, params, grads)
  hg = jax.flatten_util.ravel_pytree(hg)[0]
  assert np.linalg.norm(hg - want) <= 1e-4 * np.linalg.norm(want)


def test_nnx_trap_merging_model_variables_inside_jvp_raises_trace_context_error():
  model = make_nnx_model()
  graphdef, _, rest = nnx.split(model, nnx.Param, ...)
  params = nnx.as_pure(nnx.state(model, nnx.Param))
  naive_obj_fn = lambda p: nnx_loss(nnx.merge(graphdef, p, rest), X, Y)
  with pytest.raises(flax.errors.TraceContextError, match='BatchStat'):
    jax.jit(lambda p: f3eo_jax.hvp(naive_obj_fn, p, p))(params)  # BatchNorm writes to rest

  assert _nnx_mismatch(helper_then_more_calls) < TIGHT  # its obj_fn is jvp'd, no error


def test_nnx_trap_rngs_stream_advances_so_a_later_obj_fn_draws_another_mask():
  def naive_grads_and_obj_fn(model):
    graphdef = nnx.graphdef(model)
    grads = nnx.grad(nnx_loss)(model, X, Y)
    rest_now = nnx.as_pure(nnx.state(model, nnx.Not(nnx.Param)))  # after the gradient: count + 1
    return grads, lambda p: nnx_loss(nnx.merge(graphdef, p, rest_now, copy=True), X, Y)

  _assert_nnx_obj_fn_is_wrong(naive_grads_and_obj_fn)
  assert _nnx_mismatch(helper_then_more_calls) < TIGHT


def test_nnx_trap_split_state_shares_variables_that_later_mutations_leak_into():
  model = make_nnx_model()
  _, _, rest = nnx.split(model, nnx.Param, ...)
  model(X)
  assert int(rest['dropout']['rngs']['count'][...]) == 1  # the call reached the split state

  def naive_grads_and_obj_fn(model):
    graphdef, _, rest = nnx.split(model, nnx.Param, ...)  # before the gradient, by reference
    grads = nnx.grad(nnx_loss)(model, X, Y)
    return grads, lambda p: nnx_loss(nnx.merge(graphdef, p, rest, copy=True), X, Y)

  _assert_nnx_obj_fn_is_wrong(naive_grads_and_obj_fn)
  assert _nnx_mismatch(helper_then_more_calls) < TIGHT


def test_nnx_consistency_check_catches_batch_norm_in_eval_mode():
  def bn_eval_loss(model, x, y):
    return nnx_loss(nnx.view(model, only=nnx.BatchNorm, use_running_average=True), x, y)

  def wrong_grads_and_obj_fn(model):
    _, _, wrong_obj_fn = f3eo_flax.nnx_value_grad_and_obj_fn(nnx.clone(model), bn_eval_loss, X, Y)
    _, grads, _ = f3eo_flax.nnx_value_grad_and_obj_fn(model, nnx_loss, X, Y)
    return grads, wrong_obj_fn

  _assert_nnx_obj_fn_is_wrong(wrong_grads_and_obj_fn)


def test_nnx_f3eo_decreases_the_loss_over_50_jitted_steps_with_consistent_obj_fn():
  model = make_nnx_model()
  optimizer = nnx.Optimizer(model, f3eo_jax.f3eo(1e-2, check_consistency=TIGHT), wrt=nnx.Param)

  @nnx.jit
  def train_step(model, optimizer, x, y):
    loss, grads, obj_fn = f3eo_flax.nnx_value_grad_and_obj_fn(model, nnx_loss, x, y)
    optimizer.update(model, grads, obj_fn=obj_fn)
    return loss

  eval_loss = nnx.jit(nnx_eval_loss)
  before = float(eval_loss(model, X, Y))
  for _ in range(50):
    train_step(model, optimizer, X, Y)
  after = float(eval_loss(model, X, Y))
  assert int(optimizer.step[...]) == 50 and int(model.dropout.rngs.count[...]) == 50
  assert after < 0.5 * before, (before, after)
  diag = f3eo_jax.diagnostics(optimizer.opt_state)
  assert float(diag['grad_mismatch']) < TIGHT and float(diag['hg_norm']) > 0
