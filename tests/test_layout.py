"""Which parameters get the meta term: masks, and integer or bool leaves.

Outside ``meta_mask`` a leaf gets ``g`` unchanged and a zero tangent in ``H·g`` (checked
against the dense rule restricted to the mask); integer and bool leaves are never
differentiated and pass through as ``optax.adamw`` passes them. A mask that does not fit
the params is an error of test_checks.py.
"""

from __future__ import annotations

import _problems as problems
import _references as dense
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import f3eo_jax


@pytest.mark.parametrize(
  'mask_kind,projection',
  [('bool_tree', 'global'), ('prefix', 'global'), ('callable', 'global'), ('callable', 'per_leaf')],
)
def test_masked_out_leaves_get_plain_gradient_and_zero_tangent(
  x64, make_mlp, mask_kind, projection
):
  params, loss_fn = make_mlp('tanh')
  reference = dense.derivatives(loss_fn, params)
  leaf_mask = problems.leaf_mask(problems.MLP_MASKS[mask_kind], params)
  coordinate_mask = dense.mask_per_coordinate(leaf_mask)
  mask = problems.MLP_MASKS[mask_kind]
  step = problems.meta_gradient_step(loss_fn, projection=projection, meta_mask=mask)

  # A loose clip (1e3) and a binding one (0.05): one compilation for both.
  for meta_coef, meta_clip_norm in ((1.0, 1e3), (-2.0, 0.05), (0.37, 1e3)):
    g, e, _, _ = problems.assert_step_matches_dense(
      step,
      params,
      reference,
      meta_coef,
      meta_clip_norm,
      projection=projection,
      mask=coordinate_mask,
    )
    for e_leaf, g_leaf, m in zip(*map(jax.tree.leaves, (e, g, leaf_mask))):
      if not m.all():
        np.testing.assert_array_equal(e_leaf, g_leaf)  # exactly g
  # The reference really restricts the tangent: H·g_masked differs from H·g there.
  full_tangent = (reference.hessian @ reference.grad)[coordinate_mask]
  masked_tangent = reference.hessian @ np.where(coordinate_mask, reference.grad, 0.0)
  assert not np.allclose(full_tangent, masked_tangent[coordinate_mask], rtol=1e-2)


def test_hvp_fn_receives_a_tangent_that_is_zero_outside_the_mask(make_mlp):
  params, loss_fn = make_mlp('tanh', dtype=jnp.float32)
  tx = f3eo_jax.add_meta_gradient(meta_mask=problems.MLP_MASKS['prefix'])

  @jax.jit
  def tangent_seen_by_hvp_fn(params):
    seen = {}

    def hvp_fn(tangent):
      seen['tangent'] = tangent
      return jax.tree.map(jnp.ones_like, tangent)

    g = jax.grad(loss_fn)(params)
    tx.update(g, tx.init(params), params, hvp_fn=hvp_fn)
    return g, seen['tangent']

  g, tangent = tangent_seen_by_hvp_fn(params)

  np.testing.assert_array_equal(tangent['layer_0']['w'], g['layer_0']['w'])
  np.testing.assert_array_equal(tangent['layer_0']['b'], g['layer_0']['b'])
  np.testing.assert_array_equal(tangent['layer_1']['w'], 0.0)
  np.testing.assert_array_equal(tangent['layer_1']['b'], 0.0)


def test_integer_and_bool_leaves_are_accepted_like_adamw_and_get_no_meta_term():
  params, batch = problems.mlp_params(), problems.mlp_batch(0)
  counters = {'flag': jnp.asarray(True), 'step': jnp.asarray(7, jnp.int32)}
  with_counters = {**params, **counters}
  loss_fn = lambda p: problems.mlp_loss({k: p[k] for k in params}, batch)  # ignores the counters
  grads = {**problems.mlp_grads(params, batch), **jax.tree.map(jnp.zeros_like, counters)}
  meta, f3eo_no_meta = (
    f3eo_jax.add_meta_gradient(),
    f3eo_jax.f3eo(problems.LEARNING_RATE, meta_coef=0.0),
  )
  adamw = optax.adamw(problems.LEARNING_RATE, weight_decay=problems.WEIGHT_DECAY)

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
  expected_e, expected_diagnostics, _ = dense.effective_gradient(
    lambda p: problems.mlp_loss(p, batch), params
  )
  np.testing.assert_allclose(
    dense.ravel({k: e[k] for k in params}), expected_e, rtol=1e-5, atol=1e-7
  )
  np.testing.assert_allclose(diagnostics['meta_norm'], expected_diagnostics['meta_norm'], rtol=1e-5)
  assert diagnostics['nonfinite_count'] == 0 and diagnostics['mismatch_count'] == 0
  # The complete optimizer treats the counters (and everything else) as optax.adamw does.
  dense.assert_trees_equal(f3eo_updates, adamw_updates)
