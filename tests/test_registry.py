"""benchmarks/registry.py: the variants are what their names say, and nothing is ignored."""

import doctest
import importlib
import inspect

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import f3eo_jax
from benchmarks import registry


def _quadratic_problem():
  """A small non-quadratic loss (so H·g matters) and its params."""
  params = {'w': jnp.array([[0.5, -1.0], [2.0, 0.3]]), 'b': jnp.array([0.1, -0.2])}
  x = jnp.array([[1.0, 2.0], [-0.5, 0.7], [0.3, -1.2]])

  def loss(p):
    return jnp.mean(jnp.tanh(x @ p['w'] + p['b']) ** 2) + 0.1 * jnp.sum(p['w'] ** 4)

  return params, loss


def _run(tx, steps=4):
  params, loss = _quadratic_problem()

  def step(_, carry):
    params, state = carry
    updates, state = tx.update(jax.grad(loss)(params), state, params, obj_fn=loss)
    return optax.apply_updates(params, updates), state

  return jax.lax.fori_loop(0, steps, step, (params, tx.init(params)))[0]


def test_grid_names_and_options():
  assert len(registry.GRID) == 2 * 6 * 2
  for sign, meta_coef in (('theory', 1.0), ('published', -2.0)):
    for projection in ('global', 'per_leaf'):
      v = registry.get(f'f3eo_{sign}_uncapped_{projection}')
      assert v.options == dict(
        meta_coef=meta_coef, projection=projection, meta_clip_norm=None, meta_max_ratio=None
      )
      assert registry.get(f'f3eo_{sign}_clip1_{projection}').options['meta_clip_norm'] == 1.0
      for rho in (0.03, 0.1, 0.3, 1.0):
        options = registry.get(f'f3eo_{sign}_rho{rho:g}_{projection}').options
        assert options['meta_max_ratio'] == rho and options['meta_clip_norm'] is None
  for name in registry.GRID:
    assert 'meta_max_ratio' in registry.get(name).options  # never the library's default cap
    assert registry.get(name).uses_obj_fn


def test_library_default_passes_no_meta_options_and_grid_passes_the_cap(monkeypatch):
  calls = []
  monkeypatch.setattr(f3eo_jax, 'f3eo', lambda lr, **kw: calls.append(kw) or optax.identity())
  registry.make('f3eo', 1e-3, weight_decay=0.5)
  registry.make('f3eo_theory_uncapped_global', 1e-3)
  assert calls[0] == {'weight_decay': 0.5}
  assert (
    calls[1]['meta_max_ratio'] is None and calls[1]['weight_decay'] == registry.DEFAULT_WEIGHT_DECAY
  )


@pytest.mark.parametrize(
  'name, option',
  [
    ('adamw', 'hvp_every'),
    ('adamw_wd', 'check_consistency'),
    ('sgd', 'meta_mask'),
    ('f3eo_reference', 'hvp_every'),
    ('f3eo_reference', 'meta_max_ratio'),
  ],
)
def test_make_rejects_options_the_variant_would_ignore(name, option):
  with pytest.raises(ValueError, match=f'{name}.*{option}'):
    registry.make(name, 1e-3, **{option: 1})


def test_make_rejects_overriding_a_defining_option_and_sgd_weight_decay():
  with pytest.raises(ValueError, match='defines variant'):
    registry.make('f3eo_theory_rho0.1_global', 1e-3, meta_max_ratio=0.5)
  with pytest.raises(ValueError, match="'sgd'.*weight_decay"):
    registry.make('sgd', 1e-2, weight_decay=1e-4)
  with pytest.raises(KeyError, match='unknown optimizer variant'):
    registry.get('f3eo_typo')


def test_f3eo_variants_accept_the_library_options():
  for name in ('f3eo', 'f3eo_theory_clip1_per_leaf'):
    accepted = set(registry.get(name).accepts)
    assert {'hvp_every', 'check_consistency', 'meta_mask'} <= accepted
  library = set(inspect.signature(f3eo_jax.f3eo_reference).parameters) - {
    'learning_rate',
    'weight_decay',
  }
  assert set(registry.get('f3eo_reference').accepts) == library
  derived = registry.get('f3eo_theory_rho0.1_global').with_overrides(hvp_every=10)
  assert derived.name == 'f3eo_theory_rho0.1_global+hvp_every=10'
  assert derived.options['hvp_every'] == 10 and 'hvp_every' not in derived.accepts


def test_published_grid_entry_is_the_reference_rule_step_for_step():
  """Independent of the names: the grid's published, clip-1, per-leaf entry is f3eo_reference."""
  a = _run(registry.make('f3eo_published_clip1_per_leaf', 1e-2, weight_decay=1e-2))
  b = _run(f3eo_jax.f3eo_reference(1e-2, weight_decay=1e-2))
  jax.tree.map(lambda x, y: np.testing.assert_allclose(x, y, rtol=1e-6), a, b)
  c = _run(registry.make('f3eo_theory_clip1_per_leaf', 1e-2, weight_decay=1e-2))
  assert not np.allclose(a['w'], c['w'])  # the sign matters on this problem


def test_traced_learning_rate_and_weight_decay_match_concrete_ones():
  @jax.jit
  def traced(lr, wd):
    return _run(registry.make('f3eo_theory_rho0.3_global', lr, weight_decay=wd), steps=2)

  expected = _run(registry.make('f3eo_theory_rho0.3_global', 3e-2, weight_decay=0.1), steps=2)
  got = traced(jnp.float32(3e-2), jnp.float32(0.1))
  jax.tree.map(lambda x, y: np.testing.assert_allclose(x, y, rtol=1e-5), got, expected)


def test_adamw_wd_sweep_carries_weight_decay_and_task_scaling():
  candidates = registry.get('adamw_wd').candidates(lr_scale=0.5)
  assert len(candidates) == len(registry.ADAM_SWEEP) * len(registry.WEIGHT_DECAY_SWEEP)
  assert {c.weight_decay for c in candidates} == set(registry.WEIGHT_DECAY_SWEEP)
  assert {c.learning_rate for c in candidates} == {0.5 * lr for lr in registry.ADAM_SWEEP}
  assert all(c.weight_decay is None for c in registry.get('adamw').candidates())
  assert (
    registry.get('sgd').sweep == registry.SGD_SWEEP and not registry.get('sgd').has_weight_decay
  )


@pytest.mark.parametrize('module', ['registry', 'reporting', 'tasks', 'training'])
def test_benchmark_docstring_examples_pass(module):
  mod = importlib.import_module(f'benchmarks.{module}')
  flags = doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE
  result = doctest.testmod(mod, optionflags=flags, verbose=False)
  assert result.failed == 0 and result.attempted > 0
