"""The transform's state: donation, and reading its diagnostics on the host.

The diagnostics' values are checked against dense references with the rule
(test_transform.py); here, that ``diagnostics`` and ``raise_on_mismatch`` find the one
``MetaGradientState`` wherever Optax puts it, and that every optimizer's state can be
donated (two state leaves never share a buffer).
"""

from __future__ import annotations

import _problems as problems
import _references as dense
import jax
import jax.numpy as jnp
import optax
import pytest

import f3eo_jax

FIELDS = {
  'grad_sq_norm': jnp.float32,
  'g_dot_hg': jnp.float32,
  'hg_norm': jnp.float32,
  'meta_norm': jnp.float32,
  'cos_g_hg': jnp.float32,
  'cap_scale': jnp.float32,
  'grad_mismatch': jnp.float32,
  'cap_count': jnp.int32,
  'nonfinite_count': jnp.int32,
  'mismatch_count': jnp.int32,
}

WRAPPERS = {
  'f3eo': lambda: f3eo_jax.f3eo(problems.LEARNING_RATE),
  'add_meta_gradient': f3eo_jax.add_meta_gradient,
  'inject_hyperparams': lambda: optax.inject_hyperparams(f3eo_jax.f3eo)(problems.LEARNING_RATE),
  'apply_if_finite': lambda: optax.apply_if_finite(f3eo_jax.f3eo(problems.LEARNING_RATE), 3),
  'multi_steps': lambda: optax.MultiSteps(f3eo_jax.f3eo(problems.LEARNING_RATE), 2),
  'in_a_chain': lambda: optax.chain(
    optax.scale(1.0), f3eo_jax.add_meta_gradient(), optax.adam(problems.LEARNING_RATE)
  ),
}


@pytest.mark.parametrize('wrapper', WRAPPERS)
def test_diagnostics_finds_the_meta_state_inside_optax_wrappers(wrapper):
  tx = WRAPPERS[wrapper]()
  params, batch = problems.mlp_params(), problems.mlp_batch(0)
  state = tx.init(params)

  initial = f3eo_jax.diagnostics(state)
  _, state, _ = problems.update_step(tx)(params, state, batch, batch)
  diagnostics = f3eo_jax.diagnostics(state)

  for d in (initial, diagnostics):
    assert {name: value.dtype for name, value in d.items()} == FIELDS
  assert initial['meta_norm'] == 0 and initial['mismatch_count'] == 0
  if wrapper != 'multi_steps':  # MultiSteps updates its inner state on the second call
    assert diagnostics['meta_norm'] > 0 and diagnostics['hg_norm'] > 0
  f3eo_jax.raise_on_mismatch(state)  # a consistent step: nothing to raise


def test_diagnostics_needs_exactly_one_meta_state_and_raise_on_mismatch_at_least_one():
  params = problems.mlp_params()
  one = f3eo_jax.add_meta_gradient().init(params)

  with pytest.raises(ValueError, match='exactly one MetaGradientState.*found 0'):
    f3eo_jax.diagnostics(optax.adam(1e-3).init(params))
  with pytest.raises(ValueError, match='exactly one MetaGradientState.*found 2'):
    f3eo_jax.diagnostics((one, one))
  with pytest.raises(ValueError, match='found no MetaGradientState'):
    f3eo_jax.raise_on_mismatch(optax.adam(1e-3).init(params))
  f3eo_jax.diagnostics({'inner': [one]})  # anywhere in a pytree


@pytest.mark.parametrize('name', list(problems.PUBLIC_OPTIMIZERS))
def test_the_params_and_a_fresh_state_can_be_donated(name):
  tx, step = problems.donating_step(name)
  params, batch = problems.mlp_params(), problems.mlp_batch(0)

  # Fails with 'donate the same buffer twice' if two state leaves share a buffer.
  new_params, new_state, _ = step(params, tx.init(params), batch, batch)
  new_params, new_state, _ = step(
    new_params, new_state, problems.mlp_batch(1), problems.mlp_batch(1)
  )

  assert all(p.is_deleted() for p in jax.tree.leaves(params))  # donation really happened
  assert dense.all_finite(new_params) and f3eo_jax.diagnostics(new_state)['meta_norm'] > 0
