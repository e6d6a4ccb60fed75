"""scale_by_amsgrad_torch: PyTorch's AMSGrad order, its state type, and the state's old name."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import f3eo_jax


def test_state_is_torch_amsgrad_state_not_optax_s():
  state = f3eo_jax.scale_by_amsgrad_torch().init({'w': jnp.zeros(2)})

  assert isinstance(state, f3eo_jax.TorchAmsgradState)
  assert f3eo_jax.TorchAmsgradState is not optax.ScaleByAmsgradState


def test_old_state_name_still_works_and_warns():
  with pytest.warns(DeprecationWarning, match='TorchAmsgradState'):
    old = f3eo_jax.ScaleByAmsgradState

  assert old is f3eo_jax.TorchAmsgradState


def test_unknown_attribute_raises_attribute_error():
  with pytest.raises(AttributeError, match='no attribute'):
    f3eo_jax.NoSuchName  # noqa: B018


def _varying_gradients():
  """Gradients that grow then shrink, so that max(v) and v part ways."""
  rng = np.random.default_rng(0)
  scales = [1.0, 3.0, 0.2, 0.1, 2.0, 0.05]
  return [{'w': s * rng.normal(size=(2, 3)), 'b': s * rng.normal(size=3)} for s in scales]


def test_scale_by_amsgrad_torch_matches_the_pytorch_formula(x64):
  b1, b2, eps = 0.9, 0.99, 1e-8
  grads = _varying_gradients()
  tx = f3eo_jax.scale_by_amsgrad_torch(b1, b2, eps)
  state = tx.init(jax.tree.map(jnp.asarray, grads[0]))
  update = jax.jit(tx.update)
  m = {k: np.zeros_like(x) for k, x in grads[0].items()}
  v, v_max = dict(m), dict(m)
  max_differs_from_v = False

  for t, g in enumerate(grads, start=1):
    updates, state = update(jax.tree.map(jnp.asarray, g), state)

    for k in g:
      m[k] = b1 * m[k] + (1 - b1) * g[k]
      v[k] = b2 * v[k] + (1 - b2) * g[k] ** 2
      v_max[k] = np.maximum(v_max[k], v[k])  # PyTorch: the max of the raw v...
      expected = (
        m[k] / (1 - b1**t) / (np.sqrt(v_max[k]) / np.sqrt(1 - b2**t) + eps)
      )  # ...then bias correction
      np.testing.assert_allclose(updates[k], expected, rtol=1e-12, err_msg=f'{k} at step {t}')
      assert updates[k].dtype == jnp.float64
      max_differs_from_v |= bool(np.any(v_max[k] > v[k] * (1 + 1e-6)))
  assert max_differs_from_v  # the gradients exercise the max


def test_scale_by_amsgrad_torch_differs_from_optax_amsgrad_order(x64):
  # optax.scale_by_amsgrad takes the max of the bias-corrected v̂; PyTorch of the raw v.
  grads = [jax.tree.map(jnp.asarray, g) for g in _varying_gradients()]
  ours, theirs = f3eo_jax.scale_by_amsgrad_torch(0.9, 0.99), optax.scale_by_amsgrad(0.9, 0.99)

  @jax.jit
  def run(grads):
    state_ours, state_theirs = ours.init(grads[0]), theirs.init(grads[0])
    for g in grads:
      u_ours, state_ours = ours.update(g, state_ours)
      u_theirs, state_theirs = theirs.update(g, state_theirs)
    return u_ours, u_theirs

  u_ours, u_theirs = run(grads)
  assert not np.allclose(u_ours['w'], u_theirs['w'], rtol=1e-3)
