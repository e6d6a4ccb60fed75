"""benchmarks/config.py: every variant builds what its name says."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import f3eo_jax
from benchmarks import config


def _run(tx, steps=4):
  """A few steps of ``tx`` on a small non-quadratic loss (so H·g matters)."""
  params = {'w': jnp.array([[0.5, -1.0], [2.0, 0.3]]), 'b': jnp.array([0.1, -0.2])}
  x = jnp.array([[1.0, 2.0], [-0.5, 0.7], [0.3, -1.2]])
  loss = lambda p: jnp.mean(jnp.tanh(x @ p['w'] + p['b']) ** 2) + 0.1 * jnp.sum(p['w'] ** 4)

  def step(_, carry):
    params, state = carry
    updates, state = tx.update(jax.grad(loss)(params), state, params, obj_fn=loss)
    return optax.apply_updates(params, updates), state

  return jax.lax.fori_loop(0, steps, step, (params, tx.init(params)))[0]


def test_grid_names_and_options():
  assert len(config.GRID) == 2 * 6 * 2
  for sign, coef in (('theory', 1.0), ('published', -2.0)):
    for proj in ('global', 'per_leaf'):
      options = dict(config.get(f'f3eo_{sign}_uncapped_{proj}').options)
      assert options == dict(
        meta_coef=coef, projection=proj, meta_clip_norm=None, meta_max_ratio=None
      )
      assert dict(config.get(f'f3eo_{sign}_clip1_{proj}').options)['meta_clip_norm'] == 1.0
      for rho in (0.03, 0.1, 0.3, 1.0):
        options = dict(config.get(f'f3eo_{sign}_rho{rho:g}_{proj}').options)
        assert options['meta_max_ratio'] == rho and options['meta_clip_norm'] is None
  for name in config.GRID:  # never the library's default cap
    assert 'meta_max_ratio' in dict(config.get(name).options) and config.get(name).uses_obj_fn


def test_library_default_passes_no_meta_options_and_the_grid_passes_the_cap(monkeypatch):
  calls = []
  monkeypatch.setitem(
    config.BUILDERS, 'f3eo', lambda lr, **kw: calls.append(kw) or optax.identity()
  )
  config.make_tx(config.get('f3eo'), 1e-3, 0.5)
  config.make_tx(config.get('f3eo_theory_uncapped_global'), 1e-3)
  config.make_tx(config.get('f3eo_hvp10_python'), 1e-3)
  assert calls[0] == {'weight_decay': 0.5}
  assert calls[1]['meta_max_ratio'] is None and calls[1]['weight_decay'] == config.WEIGHT_DECAY
  assert calls[2] == {'hvp_every': 10, 'weight_decay': config.WEIGHT_DECAY}


def test_derived_variants_are_named_by_their_options():
  v = config.get('f3eo_theory_rho0.1_global').with_options(hvp_every=10)
  assert v.name == 'f3eo_theory_rho0.1_global+hvp_every=10' and v.hvp_every == 10
  assert dict(v.options)['meta_max_ratio'] == 0.1 and v.schedule == 'graph'
  python = config.get('f3eo_hvp10_python')
  assert python.schedule == 'python' and python.hvp_every == 10 and python.kind == 'f3eo'
  assert config.get('f3eo_hvp10').schedule == 'graph'
  with pytest.raises(KeyError, match='unknown optimizer variant'):
    config.get('f3eo_typo')


def test_make_tx_rejects_what_would_be_ignored():
  with pytest.raises(ValueError, match='not all accepted'):
    config.make_tx(config.get('adamw').with_options(hvp_every=10), 1e-3)
  with pytest.raises(ValueError, match='no weight decay'):
    config.make_tx(config.get('sgd'), 1e-2, 1e-4)
  with pytest.raises(ValueError, match='python schedule'):
    config.make_tx(config.get('f3eo').with_options(schedule='python'), 1e-3)


def test_published_grid_entry_is_the_reference_rule_step_for_step():
  a = _run(config.make_tx(config.get('f3eo_published_clip1_per_leaf'), 1e-2, 1e-2))
  b = _run(f3eo_jax.f3eo_reference(1e-2, weight_decay=1e-2))
  jax.tree.map(lambda x, y: np.testing.assert_allclose(x, y, rtol=1e-6), a, b)
  c = _run(config.make_tx(config.get('f3eo_theory_clip1_per_leaf'), 1e-2, 1e-2))
  assert not np.allclose(a['w'], c['w'])  # the sign matters on this problem


def test_sweep_candidates_scale_and_carry_weight_decay():
  wd = config.get('adamw_wd').candidates(lr_scale=0.5)
  assert len(wd) == 9 and {w for _, w in wd} == set(config.WEIGHT_DECAY_SWEEP)
  assert {lr for lr, _ in wd} == {0.5 * lr for lr in config.ADAM_SWEEP}
  assert config.get('adamw').candidates() == [(lr, None) for lr in config.ADAM_SWEEP]
  assert [lr for lr, _ in config.get('sgd').candidates()] == list(config.SGD_SWEEP)
