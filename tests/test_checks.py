"""Misuse fails early, with a message that names the bad value or the fix.

Hyperparameters are checked when the transform is built, the ``update`` call and the
objective when the step is traced (never inside a compiled step), the mask and the
wrapping optimizer at ``init``.
"""

from __future__ import annotations

import _problems as problems
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import f3eo_jax


def _tiny():
  params = {'w': jnp.ones((2, 2)), 'b': jnp.zeros(2)}
  loss_fn = lambda p: jnp.sum(jnp.tanh(p['w']) ** 2) + jnp.sum(p['b'] ** 2)
  return params, loss_fn, jax.grad(loss_fn)(params)


@pytest.mark.parametrize('which', ['neither', 'both'])
def test_update_needs_exactly_one_of_obj_fn_and_hvp_fn(which):
  params, loss_fn, g = _tiny()
  tx = f3eo_jax.add_meta_gradient()
  kwargs = (
    {}
    if which == 'neither'
    else {'obj_fn': loss_fn, 'hvp_fn': lambda v: f3eo_jax.hvp(loss_fn, params, v)}
  )

  with pytest.raises(TypeError) as info:
    tx.update(g, tx.init(params), params, **kwargs)

  message = str(info.value)
  assert which in message
  assert 'obj_fn=' in message and 'hvp_fn=' in message
  assert 'tx.update(grads, state, params, obj_fn=lambda p: loss(p, batch))' in message


def test_update_with_obj_fn_needs_params():
  params, loss_fn, g = _tiny()
  tx = f3eo_jax.add_meta_gradient()

  with pytest.raises(ValueError, match='params'):
    tx.update(g, tx.init(params), None, obj_fn=loss_fn)


@pytest.mark.parametrize(
  'bad_hvp_fn,match',
  [
    (lambda v: {'w': v['w']}, 'structure'),
    (lambda v: [v['w'], v['b']], 'structure'),
    (lambda v: {'w': v['w'], 'b': jnp.zeros(3)}, r'shape \(3,\)'),
    (lambda v: {'w': v['w'].T[:1], 'b': v['b']}, r'shape \(1, 2\)'),
  ],
  ids=['missing_leaf', 'list_not_dict', 'wrong_bias_shape', 'wrong_weight_shape'],
)
def test_update_rejects_an_hvp_fn_whose_output_does_not_match_the_gradients(bad_hvp_fn, match):
  params, _, g = _tiny()
  tx = f3eo_jax.add_meta_gradient()

  with pytest.raises(ValueError, match=match):
    jax.eval_shape(lambda g: tx.update(g, tx.init(params), params, hvp_fn=bad_hvp_fn), g)


BAD_OPTIONS = {
  'projection_foo': ({'projection': 'foo'}, ValueError, "'foo'"),
  'hvp_every_0': ({'hvp_every': 0}, ValueError, 'hvp_every.*0'),
  'hvp_every_1.5': ({'hvp_every': 1.5}, TypeError, 'hvp_every.*1.5'),
  'hvp_every_bool': ({'hvp_every': True}, TypeError, 'hvp_every.*True'),
  'hvp_every_2**40': ({'hvp_every': 2**40}, ValueError, 'hvp_every.*1099511627776'),
  'meta_clip_norm_-1': ({'meta_clip_norm': -1.0}, ValueError, 'meta_clip_norm.*-1'),
  'meta_clip_norm_0': ({'meta_clip_norm': 0.0}, ValueError, 'meta_clip_norm.*0'),
  'meta_max_ratio_-0.1': ({'meta_max_ratio': -0.1}, ValueError, 'meta_max_ratio.*-0.1'),
  'meta_max_ratio_str': ({'meta_max_ratio': '0.1'}, TypeError, "meta_max_ratio.*'0.1'"),
  'meta_coef_nan': ({'meta_coef': float('nan')}, ValueError, 'meta_coef.*nan'),
  'meta_coef_str': ({'meta_coef': '1.0'}, TypeError, "meta_coef.*'1.0'"),
  'meta_coef_none': ({'meta_coef': None}, TypeError, 'meta_coef.*None'),
  'meta_coef_vector': ({'meta_coef': np.ones(2)}, TypeError, r'meta_coef.*array\(\[1., 1.\]\)'),
  'meta_coef_complex': ({'meta_coef': 1j}, TypeError, 'meta_coef.*1j'),
  'orthogonalize_str': ({'orthogonalize': 'no'}, TypeError, "orthogonalize.*'no'"),
  'check_consistency_negative': (
    {'check_consistency': -1e-3},
    ValueError,
    'check_consistency.*-0.001',
  ),
  'meta_mask_of_floats': ({'meta_mask': {'w': 1.0, 'b': 0.0}}, TypeError, 'meta_mask.*bools'),
  'meta_mask_of_arrays': (
    {'meta_mask': {'w': np.ones((3, 3), bool), 'b': True}},
    TypeError,
    r'meta_mask[\s\S]*Per-element',
  ),
  'axis_name_list': ({'axis_name': ['data']}, TypeError, 'axis_name'),
}


@pytest.mark.parametrize('name', BAD_OPTIONS)
def test_bad_hyperparameters_raise_at_construction_naming_the_value(name):
  options, error, match = BAD_OPTIONS[name]
  with pytest.raises(error, match=match):
    f3eo_jax.add_meta_gradient(**options)
  with pytest.raises(error, match=match):
    f3eo_jax.f3eo(1e-3, **options)


def test_f3eo_reference_rejects_a_non_bool_amsgrad():
  with pytest.raises(TypeError, match="amsgrad.*'yes'"):
    f3eo_jax.f3eo_reference(amsgrad='yes')


@pytest.mark.parametrize(
  'mask',
  [
    {'w': True},
    {'w': True, 'b': False, 'extra': True},
    [True, False],
    lambda params: {'w': True},
  ],
  ids=['missing_key', 'extra_key', 'list_not_dict', 'callable_with_wrong_tree'],
)
def test_a_mask_that_does_not_fit_the_params_raises_at_init(mask):
  params, _, _ = _tiny()
  tx = f3eo_jax.add_meta_gradient(meta_mask=mask)

  with pytest.raises(ValueError, match='mask') as info:
    tx.init(params)
  assert 'structure' in str(info.value)


def _traced_update(tx, params, grads, **kwargs):
  """Traces one update (no compilation): errors of the trace surface here."""
  return jax.eval_shape(lambda g: tx.update(g, tx.init(params), params, **kwargs), grads)


@pytest.mark.parametrize('wrapper', ['masked', 'multi_transform', 'partition'])
def test_f3eo_inside_an_optax_partitioner_fails_at_init_naming_meta_mask(wrapper):
  labels = {'hidden': 'f3eo', 'out': 'adam'}
  transforms = {
    'f3eo': f3eo_jax.f3eo(problems.LEARNING_RATE),
    'adam': optax.adam(problems.LEARNING_RATE),
  }
  tx = {
    'masked': lambda: optax.masked(
      f3eo_jax.f3eo(problems.LEARNING_RATE), {'hidden': True, 'out': False}
    ),
    'multi_transform': lambda: optax.multi_transform(transforms, labels),
    'partition': lambda: optax.partition(transforms, labels),
  }[wrapper]()

  with pytest.raises(TypeError, match=r'optax\.masked[\s\S]*meta_mask=') as info:
    tx.init(problems.mlp_params())
  assert 'MaskedNode' in str(info.value)


def test_flax_train_state_apply_gradients_with_obj_fn_names_the_f3eo_helper():
  from flax.training import train_state

  params, batch = problems.mlp_params(), problems.mlp_batch(0)
  state = train_state.TrainState.create(
    apply_fn=None, params=params, tx=f3eo_jax.f3eo(problems.LEARNING_RATE)
  )

  with pytest.raises(TypeError, match=r'f3eo_jax\.flax\.apply_gradients\(state, grads, obj_fn='):
    jax.eval_shape(
      lambda s, g: s.apply_gradients(grads=g, obj_fn=lambda p: problems.mlp_loss(p, batch)),
      state,
      problems.mlp_grads(params, batch),
    )


def _non_scalar_update():
  params, _, g = _tiny()
  tx = f3eo_jax.add_meta_gradient()
  return jax.eval_shape(
    lambda g: tx.update(g, tx.init(params), params, obj_fn=lambda p: p['b'] ** 2), g
  )


def _loss_and_aux_update():
  params, batch = problems.mlp_params(), problems.mlp_batch(0)
  return _traced_update(
    f3eo_jax.f3eo(problems.LEARNING_RATE),
    params,
    problems.mlp_grads(params, batch),
    obj_fn=lambda p: (problems.mlp_loss(p, batch), {'accuracy': 1.0}),
  )


def _w():
  return {'w': jnp.ones(3)}


# The library's own message (not JAX's "Gradient only defined for scalar-output functions"):
# the shape it got, and the fix.
NOT_SCALAR = r'must return a scalar loss[\s\S]*shape \({}\)[\s\S]*Reduce it first'
BAD_OBJECTIVES = {
  'hvp': (lambda: f3eo_jax.hvp(lambda p: p['w'] ** 2, _w(), _w()), NOT_SCALAR.format('3,')),
  'grad_and_hvp': (
    lambda: f3eo_jax.grad_and_hvp(lambda p: p['w'] ** 2, _w(), _w()),
    NOT_SCALAR.format('3,'),
  ),
  'value_grad_and_hvp': (
    lambda: f3eo_jax.value_grad_and_hvp(lambda p: p**2, jnp.ones(3)),
    NOT_SCALAR.format('3,'),
  ),
  'update_non_scalar_obj_fn': (_non_scalar_update, NOT_SCALAR.format('2,')),
  'update_obj_fn_with_aux': (_loss_and_aux_update, r'tuple of 2 items[\s\S]*loss_fn\(p\)\[0\]'),
}


@pytest.mark.parametrize('name', BAD_OBJECTIVES)
def test_an_objective_that_is_not_a_scalar_raises_when_traced(name):
  call, match = BAD_OBJECTIVES[name]
  with pytest.raises(TypeError, match=match):
    call()


def test_refresh_hvp_must_be_a_python_bool_and_needs_a_stored_product():
  params, batch = problems.mlp_params(), problems.mlp_batch(0)
  obj_fn = lambda p: problems.mlp_loss(p, batch)
  grads = problems.mlp_grads(params, batch)
  tx = f3eo_jax.add_meta_gradient(hvp_every=2)

  with pytest.raises(TypeError, match=r'refresh_hvp must be a Python bool[\s\S]*hvp_every alone'):
    jax.eval_shape(
      lambda r: tx.update(grads, tx.init(params), params, obj_fn=obj_fn, refresh_hvp=r), True
    )
  every_update = f3eo_jax.add_meta_gradient()
  for refresh in (True, False):
    with pytest.raises(ValueError, match=r'refresh_hvp needs a stored product[\s\S]*hvp_every > 1'):
      _traced_update(every_update, params, grads, obj_fn=obj_fn, refresh_hvp=refresh)
