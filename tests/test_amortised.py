"""hvp_every two ways: inside one compiled step (lax.cond) and at Python level (refresh_hvp).

Both must give the same updates as each other, and on refresh updates the same as an
F3EO that computes the product every update; the Python-level steps contain no
conditional at all.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import f3eo_jax

K, NUM_STEPS = 3, 7


def _problem():
  k1, k2, k3 = jax.random.split(jax.random.key(0), 3)
  params = {'w1': 0.5 * jax.random.normal(k1, (6, 8)), 'w2': 0.5 * jax.random.normal(k2, (8, 3))}
  xs = jax.random.normal(k3, (NUM_STEPS, 16, 6))
  ys = jnp.arange(NUM_STEPS * 16).reshape(NUM_STEPS, 16) % 3
  return params, xs, ys


def _loss(params, x, y):
  logits = jnp.tanh(x @ params['w1']) @ params['w2']
  return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()


@functools.partial(jax.jit, static_argnames=('tx', 'refresh'))
def _step(params, opt_state, x, y, tx, refresh=None):
  obj_fn = lambda p: _loss(p, x, y)
  grads = jax.grad(obj_fn)(params)
  if refresh is False:  # the reuse step needs no obj_fn
    updates, opt_state = tx.update(grads, opt_state, params, refresh_hvp=False)
  else:
    updates, opt_state = tx.update(grads, opt_state, params, obj_fn=obj_fn, refresh_hvp=refresh)
  return optax.apply_updates(params, updates), opt_state, updates


def _run(tx, schedule):
  """Params and updates of every step; ``schedule(t)`` is the refresh_hvp of step t."""
  params, xs, ys = _problem()
  opt_state, out = tx.init(params), []
  for t in range(NUM_STEPS):
    params, opt_state, updates = _step(params, opt_state, xs[t], ys[t], tx, schedule(t))
    out.append((params, updates))
  return out, opt_state


def _flat(tree):
  return np.concatenate([np.ravel(np.asarray(x)) for x in jax.tree.leaves(tree)])


@pytest.mark.parametrize('meta_max_ratio', [None, 0.1])
def test_python_level_refresh_gives_the_same_steps_as_the_in_graph_schedule(meta_max_ratio):
  tx = f3eo_jax.f3eo(1e-2, hvp_every=K, meta_max_ratio=meta_max_ratio)

  in_graph, state_a = _run(tx, lambda t: None)
  python_level, state_b = _run(tx, lambda t: t % K == 0)

  for (p_a, u_a), (p_b, u_b) in zip(in_graph, python_level):
    np.testing.assert_allclose(_flat(u_a), _flat(u_b), rtol=1e-6, atol=1e-9)
    np.testing.assert_allclose(_flat(p_a), _flat(p_b), rtol=1e-6, atol=1e-9)
  np.testing.assert_allclose(_flat(state_a[0].hvp), _flat(state_b[0].hvp), rtol=1e-6, atol=1e-9)


def test_refresh_updates_equal_an_f3eo_that_computes_the_product_every_update():
  # The meta-gradient transform alone (Adam's moments would differ after the first reuse):
  # on refresh updates e equals that of hvp_every=1 at the same params; on reuse updates it
  # does not (stale product), so the check can fail.
  params, xs, ys = _problem()
  every = f3eo_jax.add_meta_gradient(hvp_every=K, meta_max_ratio=0.1)
  always = f3eo_jax.add_meta_gradient(meta_max_ratio=0.1)
  state_every, state_always = every.init(params), always.init(params)
  for t in range(NUM_STEPS):
    _, state_every, e_every = _step(params, state_every, xs[t], ys[t], every, t % K == 0)
    _, state_always, e_always = _step(params, state_always, xs[t], ys[t], always)
    if t % K == 0:
      np.testing.assert_allclose(_flat(e_every), _flat(e_always), rtol=1e-6, atol=1e-9)
    else:
      assert not np.allclose(_flat(e_every), _flat(e_always), rtol=1e-4)
    params = jax.tree.map(lambda p, e: p - 0.5 * e, params, e_every)


def test_python_level_steps_compile_without_a_conditional_or_the_product():
  params, xs, ys = _problem()
  tx = f3eo_jax.f3eo(1e-2, hvp_every=K)
  opt_state = tx.init(params)
  hlo = {
    refresh: _step.lower(params, opt_state, xs[0], ys[0], tx, refresh).compile().as_text()
    for refresh in (None, True, False)
  }
  flops = {
    refresh: _step.lower(params, opt_state, xs[0], ys[0], tx, refresh).compile().cost_analysis()
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
    lambda p, s, x, y: _step(p, s, x, y, tx, refresh), in_axes=(None, None, 0, 0)
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
