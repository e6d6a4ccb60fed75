"""A Linen TrainState carrying F3EO's state survives an Orbax checkpoint bit for bit.

Saved midway (step 5 of 10, with ``hvp_every=3`` so the state holds a stored ``H·g``),
restored into a train state built from scratch, and trained on: the parameters must
equal those of an uninterrupted run exactly (CPU, same compiled step).
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
from flax.training import train_state

import f3eo_jax
from f3eo_jax import flax as f3eo_flax

NUM_STEPS, SAVE_AT, HVP_EVERY = 10, 5, 3
DATA_KEY, DROPOUT_KEY = jax.random.key(10), jax.random.key(11)


class Net(nn.Module):
  """Dense → BatchNorm → ReLU → Dropout → Dense."""

  @nn.compact
  def __call__(self, x, train: bool):
    x = nn.BatchNorm(use_running_average=not train, momentum=0.9)(nn.Dense(16)(x))
    x = nn.Dropout(0.2, deterministic=not train)(nn.relu(x))
    return nn.Dense(3)(x)


class TrainState(train_state.TrainState):
  batch_stats: Any


def batch(step):
  """A different batch at every step, a function of the step alone."""
  x = jax.random.normal(jax.random.fold_in(DATA_KEY, step), (32, 6))
  return x, jnp.argmax(x[:, :3], axis=-1)


TX = f3eo_jax.f3eo(1e-2, weight_decay=1e-4, hvp_every=HVP_EVERY)


@jax.jit
def _make_state(key: jax.Array) -> TrainState:
  variables = Net().init(key, jnp.zeros((1, 6)), train=False)
  return TrainState.create(
    apply_fn=Net().apply,
    params=variables['params'],
    batch_stats=variables['batch_stats'],
    tx=TX,
  )


def make_state(seed: int) -> TrainState:
  return _make_state(jax.random.key(seed))


@jax.jit
def train_step(state: TrainState) -> TrainState:
  x, y = batch(state.step)
  xent = lambda logits: optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()
  (_, model_state), grads, obj_fn = f3eo_flax.linen_value_grad_and_obj_fn(
    state.apply_fn,
    {'params': state.params, 'batch_stats': state.batch_stats},
    xent,
    x,
    train=True,
    rngs={'dropout': jax.random.fold_in(DROPOUT_KEY, state.step)},
  )
  new_stats = model_state['batch_stats']
  return f3eo_flax.apply_gradients(state, grads, obj_fn=obj_fn, batch_stats=new_stats)


def _meta_state(state: TrainState) -> f3eo_jax.MetaGradientState:
  is_meta = lambda s: isinstance(s, f3eo_jax.MetaGradientState)
  (found,) = [s for s in jax.tree.leaves(state.opt_state, is_leaf=is_meta) if is_meta(s)]
  return found


def _assert_trees_identical(a, b):
  assert jax.tree.structure(a) == jax.tree.structure(b)
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    assert np.asarray(x).dtype == np.asarray(y).dtype
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def test_checkpoint_midway_and_resume_gives_bit_identical_params(tmp_path):
  uninterrupted = make_state(seed=0)
  for _ in range(NUM_STEPS):
    uninterrupted = train_step(uninterrupted)

  state = make_state(seed=0)
  for _ in range(SAVE_AT):
    state = train_step(state)
  saved_hvp = _meta_state(state).hvp
  assert int(_meta_state(state).step) == SAVE_AT
  assert any(np.any(np.asarray(h) != 0) for h in jax.tree.leaves(saved_hvp))  # H·g of step 3
  path = tmp_path / 'checkpoint'
  with ocp.StandardCheckpointer() as checkpointer:
    checkpointer.save(path, state)
    checkpointer.wait_until_finished()
  del state

  template = make_state(seed=1)  # fresh objects with other values, only the structure matters
  with ocp.StandardCheckpointer() as checkpointer:
    restored = checkpointer.restore(path, template)
  assert type(restored) is TrainState and restored.tx is template.tx
  assert int(restored.step) == SAVE_AT
  _assert_trees_identical(_meta_state(restored).hvp, saved_hvp)

  for _ in range(NUM_STEPS - SAVE_AT):
    restored = train_step(restored)
  assert int(restored.step) == NUM_STEPS
  _assert_trees_identical(restored.params, uninterrupted.params)
  _assert_trees_identical(restored.batch_stats, uninterrupted.batch_stats)
  _assert_trees_identical(restored.opt_state, uninterrupted.opt_state)
