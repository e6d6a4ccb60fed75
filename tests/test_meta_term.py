"""The meta term's algebra: its numerical refinements, and the guard that drops it.

The clip, projection and cap against a dense reference are in test_transform.py; the
scaled reductions under them in test_reductions.py. Here: the second Gram-Schmidt step
of the projection, and the guard: a meta term that is not finite, that would overflow
the parameter dtype, or that comes from invalid injected hyperparameters is dropped for
that update (``e = g``), never stored, and counted. Where it must be dropped, the step is
compared with ``optax.adamw`` on ``g``; where it must be present, with the dense float64
rule (``_references.py``).
"""

from __future__ import annotations

import functools
import math

import _problems as problems
import _references as dense
import jax
import jax.flatten_util
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import f3eo_jax


def _nearly_parallel(delta, seed, shape=(64, 64)):
  """float32 ``g`` and ``H·g = g + delta·u`` with ``u ⊥ g``, ``‖u‖ = ‖g‖`` (exact in float64)."""
  rng = np.random.default_rng(seed)
  g = {'b': rng.standard_normal(shape[1]), 'w': rng.standard_normal(shape)}
  g = jax.tree.map(lambda x: x.astype(np.float32), g)
  flat = np.concatenate([np.ravel(x).astype(np.float64) for x in jax.tree.leaves(g)])
  u = rng.standard_normal(flat.size)
  u -= (u @ flat) / (flat @ flat) * flat
  u *= np.linalg.norm(flat) / np.linalg.norm(u)
  h_flat = (flat + delta * u).astype(np.float32)
  h = {'b': h_flat[: shape[1]], 'w': h_flat[shape[1] :].reshape(shape)}
  return g, h


@pytest.mark.parametrize('delta', [1e-3, 1e-4])
@pytest.mark.parametrize('seed', range(3))
def test_capped_meta_term_stays_orthogonal_to_g_when_hg_is_nearly_parallel(delta, seed):
  # (H·g)⊥ is a small difference of two large float32 vectors: the rounding of r = ⟨g, H·g⟩/‖g‖²
  # leaves a part along g about |δr|·‖g‖, large next to ‖(H·g)⊥‖ = δ‖g‖, and the cap scales it
  # up with m⊥ to ρ‖g‖. The second Gram-Schmidt step of the projection removes it. Measured
  # (64×64 + 64 float32 entries, these seeds): |cos∠(m⊥, g)| at most 7e-6 with it; without it,
  # up to 1e-4 (δ = 1e-3) and 2e-3 (δ = 1e-4), depending on how r happens to round.
  g, h = _nearly_parallel(delta, seed)
  tx = f3eo_jax.add_meta_gradient(1e3, meta_max_ratio=0.03)  # ‖c·(H·g)⊥‖ > 0.03‖g‖: capped

  e, _ = jax.jit(lambda g: tx.update(g, tx.init(g), g, hvp_fn=lambda _: h))(g)

  m, g64 = dense.ravel(e) - dense.ravel(g), dense.ravel(g)
  assert np.linalg.norm(m) == pytest.approx(0.03 * np.linalg.norm(g64), rel=1e-3)  # the cap bound
  assert abs(m @ g64) / (np.linalg.norm(m) * np.linalg.norm(g64)) < 2e-5


# The guard: a non-finite meta term is dropped for that update, never stored, and counted.


@functools.cache
def _meta_step(problem):
  """add_meta_gradient(hvp_every=2) and its step ``(params, state) -> (g, e, state, H·g)``."""
  loss_fn = problems.NON_FINITE_PROBLEMS[problem]()[0]
  tx = f3eo_jax.add_meta_gradient(hvp_every=2)

  @jax.jit
  def step(params, state):
    g = jax.grad(loss_fn)(params)
    e, state = tx.update(g, state, params, obj_fn=loss_fn)
    return g, e, state, f3eo_jax.hvp(loss_fn, params, g)

  return tx, step


@pytest.mark.parametrize('problem', list(problems.NON_FINITE_PROBLEMS))
def test_non_finite_product_gives_e_equal_g_stores_zeros_and_the_next_refresh_works(problem):
  loss_fn, bad_params, good_params = problems.NON_FINITE_PROBLEMS[problem]()
  tx, step = _meta_step(problem)
  state = tx.init(bad_params)

  # Update 0 refreshes H·g, which is not finite (g is): e = g exactly, the buffer holds zeros.
  g, e, state, hg = step(bad_params, state)
  assert dense.all_finite(g) and not dense.all_finite(hg)
  dense.assert_trees_equal(e, g)
  for h in jax.tree.leaves(state.hvp):
    np.testing.assert_array_equal(h, 0.0)
  diagnostics = f3eo_jax.diagnostics(state)
  assert diagnostics['nonfinite_count'] == 1 and diagnostics['meta_norm'] == 0
  assert diagnostics['mismatch_count'] == 0

  # Update 1 reuses the stored zeros: still e = g, nothing new to count.
  g, e, state, _ = step(bad_params, state)
  dense.assert_trees_equal(e, g)
  assert f3eo_jax.diagnostics(state)['nonfinite_count'] == 1

  # Update 2 refreshes at params with a finite product: the meta term is back, exact.
  g, e, state, _ = step(good_params, state)
  expected_e, expected_diagnostics, reference = dense.effective_gradient(loss_fn, good_params)
  rtol = 5e-3 if problem == 'float16_overflow' else 1e-5
  scale = np.abs(expected_e).max()
  np.testing.assert_allclose(dense.ravel(e), expected_e, rtol=rtol, atol=rtol * 1e-2 * scale)
  np.testing.assert_allclose(dense.ravel(state.hvp), reference.hessian @ reference.grad, rtol=rtol)
  diagnostics = f3eo_jax.diagnostics(state)
  assert diagnostics['nonfinite_count'] == 1
  np.testing.assert_allclose(diagnostics['meta_norm'], expected_diagnostics['meta_norm'], rtol=rtol)
  assert expected_diagnostics['meta_norm'] > 1e-2 * np.linalg.norm(reference.grad)


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


# Invalid hyperparameters injected at run time: the meta term is dropped and counted.

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
  params, batch = problems.mlp_params(), problems.mlp_batch(0)
  tx, step = problems.injected_step()
  state = tx.init(params)
  state.hyperparams[name] = jnp.asarray(value, state.hyperparams[name].dtype)

  new_params, state, grads = step(params, state, batch, batch)

  assert dense.all_finite(new_params)
  problems.assert_adamw_on(grads, params, new_params, state)
  diagnostics = f3eo_jax.diagnostics(state)
  assert diagnostics['nonfinite_count'] == 1 and diagnostics['meta_norm'] == 0
  assert diagnostics['mismatch_count'] == 0


def test_a_valid_injected_hyperparameter_is_live():
  params, batch = problems.mlp_params(), problems.mlp_batch(0)
  tx, step = problems.injected_step()
  state = tx.init(params)
  state.hyperparams['meta_coef'] = jnp.asarray(0.5, jnp.float32)  # not weak: no retrace

  new_params, state, grads = step(params, state, batch, batch)

  # The dense rule with the injected values, then AdamW on that e.
  expected_e, _, _ = dense.effective_gradient(
    lambda p: problems.mlp_loss(p, batch),
    params,
    meta_coef=0.5,
    meta_clip_norm=1.0,
    meta_max_ratio=f3eo_jax.DEFAULT_META_MAX_RATIO,
  )
  _, unravel = jax.flatten_util.ravel_pytree(params)
  problems.assert_adamw_on(unravel(jnp.asarray(expected_e, jnp.float32)), params, new_params, state)
  _, mu_on_g = problems.adamw_step(params, grads)
  mu = optax.tree.get(state, 'mu')
  assert not np.allclose(dense.ravel(mu), dense.ravel(mu_on_g), rtol=1e-2)
  assert f3eo_jax.diagnostics(state)['nonfinite_count'] == 0
