"""jit_amortized: two compiled steps that equal hvp_every=k scheduled inside one step."""

from __future__ import annotations

import warnings

import _problems as problems
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import f3eo_jax

K, NUM_STEPS = 3, 8


def _problem():
  return problems.sequence_problem(NUM_STEPS)


def _make_step(tx, traces=None):
  def train_step(params, opt_state, x, y, *, refresh_hvp=None):
    if traces is not None:
      traces.append(refresh_hvp)
    obj_fn = lambda p: problems.sequence_loss(p, x, y)
    grads = jax.grad(obj_fn)(params)
    updates, opt_state = tx.update(grads, opt_state, params, obj_fn=obj_fn, refresh_hvp=refresh_hvp)
    return optax.apply_updates(params, updates), opt_state

  return train_step


def _bytes(tree):
  return [(np.asarray(x).dtype, np.asarray(x).tobytes()) for x in jax.tree.leaves(tree)]


def _run(step, tx, start=0):
  params, xs, ys = _problem()
  opt_state = tx.init(params)
  for t in range(start, NUM_STEPS):
    params, opt_state = step(params, opt_state, xs[t], ys[t])
  return params, opt_state


@pytest.mark.parametrize('meta_max_ratio', [None, 0.1])
def test_equals_the_in_graph_schedule_bit_for_bit(meta_max_ratio):
  tx = f3eo_jax.f3eo(1e-2, hvp_every=K, meta_max_ratio=meta_max_ratio)

  in_graph = _run(jax.jit(_make_step(tx)), tx)
  amortized = _run(f3eo_jax.jit_amortized(_make_step(tx), K, donate_argnums=(0, 1)), tx)

  assert _bytes(amortized) == _bytes(in_graph)


def test_compiles_exactly_twice_and_picks_the_refresh_step_every_k():
  tx = f3eo_jax.f3eo(1e-2, hvp_every=K)
  traces = []
  step = f3eo_jax.jit_amortized(_make_step(tx, traces), K)
  calls = []
  for name in ('refresh_step', 'reuse_step'):
    inner = getattr(step, name)
    setattr(step, name, lambda *a, _inner=inner, _name=name: calls.append(_name) or _inner(*a))

  _run(step, tx)

  assert sorted(traces) == [False, True]  # one trace, so one compilation, per version
  assert calls == ['refresh_step' if t % K == 0 else 'reuse_step' for t in range(NUM_STEPS)]
  assert step.count == NUM_STEPS


def test_donates_the_arguments_it_is_asked_to():
  tx = f3eo_jax.f3eo(1e-2, hvp_every=K)
  step = f3eo_jax.jit_amortized(_make_step(tx), K, donate_argnums=(0, 1))
  params, xs, ys = _problem()
  opt_state = tx.init(params)
  for t in range(2):  # one refresh step, one reuse step
    old_params, old_state = params, opt_state
    params, opt_state = step(params, opt_state, xs[t], ys[t])
    assert all(x.is_deleted() for x in jax.tree.leaves((old_params, old_state)))


def test_continues_the_schedule_of_a_restored_state():
  tx = f3eo_jax.f3eo(1e-2, hvp_every=K)
  params, xs, ys = _problem()
  opt_state = tx.init(params)
  in_graph = jax.jit(_make_step(tx))
  for t in range(2):
    params, opt_state = in_graph(params, opt_state, xs[t], ys[t])
  restored = jax.tree.map(np.asarray, (params, opt_state))  # as a checkpoint would give it

  step = f3eo_jax.jit_amortized(_make_step(tx), K)
  params_b, state_b = restored
  for t in range(2, NUM_STEPS):
    params, opt_state = in_graph(params, opt_state, xs[t], ys[t])
    params_b, state_b = step(params_b, state_b, xs[t], ys[t])

  assert step.count == NUM_STEPS
  assert _bytes((params_b, state_b)) == _bytes((params, opt_state))


@pytest.mark.parametrize(
  ('hvp_every', 'kwargs', 'error'),
  [
    (0, {}, ValueError),
    (2.0, {}, TypeError),
    (jnp.asarray(2), {}, TypeError),
    (2, {'keep_unused': False}, ValueError),
  ],
)
def test_rejects_bad_arguments(hvp_every, kwargs, error):
  with pytest.raises(error):
    f3eo_jax.jit_amortized(lambda *a, refresh_hvp: a, hvp_every, **kwargs)


@pytest.mark.skipif(jax.default_backend() != 'cpu', reason='the warning is for XLA:CPU only')
def test_in_graph_schedule_warns_on_cpu_naming_jit_amortized_and_jit_amortized_does_not():
  tx = f3eo_jax.f3eo(1e-2, hvp_every=K)
  params, xs, ys = _problem()
  opt_state = tx.init(params)

  with pytest.warns(UserWarning, match=r'jit_amortized\(step_fn, hvp_every=k\)'):
    jax.jit(_make_step(tx)).lower(params, opt_state, xs[0], ys[0])
  with warnings.catch_warnings():
    warnings.simplefilter('error')
    f3eo_jax.jit_amortized(_make_step(tx), K)(params, opt_state, xs[0], ys[0])
