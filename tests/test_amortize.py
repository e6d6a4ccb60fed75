"""hvp_every=k scheduled at Python level: refresh_hvp=True/False, and jit_amortized.

Both equal the schedule inside one compiled step (``lax.cond``); their steps contain no
conditional, and the reuse step no product.
"""

from __future__ import annotations

import functools
import warnings

import _problems as problems
import _references as dense
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


# refresh_hvp by hand, as jit_amortized passes it: the same updates as the in-graph
# schedule, and on refresh updates the same as an F3EO that computes the product every
# update; the steps contain no conditional at all.


@functools.partial(jax.jit, static_argnames=('tx', 'refresh'))
def _update_step(params, opt_state, x, y, tx, refresh=None):
  obj_fn = lambda p: problems.sequence_loss(p, x, y)
  grads = jax.grad(obj_fn)(params)
  if refresh is False:  # the reuse step needs no obj_fn
    updates, opt_state = tx.update(grads, opt_state, params, refresh_hvp=False)
  else:
    updates, opt_state = tx.update(grads, opt_state, params, obj_fn=obj_fn, refresh_hvp=refresh)
  return optax.apply_updates(params, updates), opt_state, updates


def _run_schedule(tx, schedule):
  """Params and updates of every step; ``schedule(t)`` is the refresh_hvp of step t."""
  params, xs, ys = _problem()
  opt_state, out = tx.init(params), []
  for t in range(NUM_STEPS):
    params, opt_state, updates = _update_step(params, opt_state, xs[t], ys[t], tx, schedule(t))
    out.append((params, updates))
  return out, opt_state


@pytest.mark.parametrize('meta_max_ratio', [None, 0.1])
def test_python_level_refresh_gives_the_same_steps_as_the_in_graph_schedule(meta_max_ratio):
  tx = f3eo_jax.f3eo(1e-2, hvp_every=K, meta_max_ratio=meta_max_ratio)

  in_graph, state_a = _run_schedule(tx, lambda t: None)
  python_level, state_b = _run_schedule(tx, lambda t: t % K == 0)

  for (p_a, u_a), (p_b, u_b) in zip(in_graph, python_level):
    np.testing.assert_allclose(dense.ravel(u_a), dense.ravel(u_b), rtol=1e-6, atol=1e-9)
    np.testing.assert_allclose(dense.ravel(p_a), dense.ravel(p_b), rtol=1e-6, atol=1e-9)
  np.testing.assert_allclose(
    dense.ravel(state_a[0].hvp), dense.ravel(state_b[0].hvp), rtol=1e-6, atol=1e-9
  )


def test_refresh_updates_equal_an_f3eo_that_computes_the_product_every_update():
  # The meta-gradient transform alone (Adam's moments would differ after the first reuse):
  # on refresh updates e equals that of hvp_every=1 at the same params; on reuse updates it
  # does not (stale product), so the check can fail.
  params, xs, ys = _problem()
  every = f3eo_jax.add_meta_gradient(hvp_every=K, meta_max_ratio=0.1)
  always = f3eo_jax.add_meta_gradient(meta_max_ratio=0.1)
  state_every, state_always = every.init(params), always.init(params)
  for t in range(NUM_STEPS):
    _, state_every, e_every = _update_step(params, state_every, xs[t], ys[t], every, t % K == 0)
    _, state_always, e_always = _update_step(params, state_always, xs[t], ys[t], always)
    if t % K == 0:
      np.testing.assert_allclose(dense.ravel(e_every), dense.ravel(e_always), rtol=1e-6, atol=1e-9)
    else:
      assert not np.allclose(dense.ravel(e_every), dense.ravel(e_always), rtol=1e-4)
    params = jax.tree.map(lambda p, e: p - 0.5 * e, params, e_every)


def test_python_level_steps_compile_without_a_conditional_or_the_product():
  params, xs, ys = _problem()
  tx = f3eo_jax.f3eo(1e-2, hvp_every=K)
  opt_state = tx.init(params)
  hlo = {
    refresh: _update_step.lower(params, opt_state, xs[0], ys[0], tx, refresh).compile().as_text()
    for refresh in (None, True, False)
  }
  flops = {
    refresh: _update_step.lower(params, opt_state, xs[0], ys[0], tx, refresh)
    .compile()
    .cost_analysis()
    for refresh in (True, False)
  }
  flops = {k: (v[0] if isinstance(v, list) else v)['flops'] for k, v in flops.items()}

  assert 'conditional(' in hlo[None]  # the in-graph schedule
  assert 'conditional(' not in hlo[True] and 'conditional(' not in hlo[False]
  assert flops[False] < 0.6 * flops[True]  # the reuse step has no jvp


def test_python_level_reuse_step_under_vmap_computes_no_product():
  # Under vmap a lax.cond on the (batched) step counter becomes a select that computes
  # the product every step; the Python-level reuse step has nothing to compute.
  params, xs, ys = _problem()
  tx = f3eo_jax.f3eo(1e-2, hvp_every=K)
  batched = lambda refresh: jax.vmap(
    lambda p, s, x, y: _update_step(p, s, x, y, tx, refresh), in_axes=(None, None, 0, 0)
  )
  opt_state = tx.init(params)
  xs2, ys2 = xs[:2], ys[:2]
  cost = {
    r: jax.jit(batched(r)).lower(params, opt_state, xs2, ys2).compile().cost_analysis()
    for r in (True, False, None)
  }
  cost = {k: (v[0] if isinstance(v, list) else v)['flops'] for k, v in cost.items()}

  assert cost[False] < 0.6 * cost[True]
  assert cost[None] >= 0.9 * cost[True]  # the select evaluates the product anyway
