"""Small problems shared by several test files, built on first use and cached.

- A one-hidden-layer tanh MLP with four batches, and a jitted training step on it whose
  ``obj_fn`` may be the loss of another batch (the classic bug).
- Two losses whose ``H·g`` is not finite where ``g`` is: a float16 overflow and an
  infinite second derivative.
- One step of ``optax.adamw`` on a given gradient: F3EO with its meta term dropped.

Import it explicitly: ``import _problems as problems``.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import _references as dense
import jax
import jax.numpy as jnp
import numpy as np
import optax

import f3eo_jax

PyTree = Any

LEARNING_RATE = 0.05
WEIGHT_DECAY = 1e-4  # f3eo's default, and optax.adamw's


# A one-hidden-layer tanh MLP and four batches.


@functools.cache
def _mlp_arrays() -> tuple[dict, list]:
  rng = np.random.default_rng(0)
  params = {
    'hidden': {'b': 0.5 * rng.normal(size=4), 'w': rng.normal(size=(3, 4)) / np.sqrt(3)},
    'out': {'b': 0.5 * rng.normal(size=3), 'w': rng.normal(size=(4, 3)) / 2.0},
  }
  batches = [(rng.normal(size=(8, 3)), rng.integers(0, 3, 8)) for _ in range(4)]
  return params, batches


def mlp_params(dtype: Any = jnp.float32) -> PyTree:
  return jax.tree.map(lambda p: jnp.asarray(p, dtype), _mlp_arrays()[0])


def mlp_batch(i: int, dtype: Any = jnp.float32) -> tuple[jax.Array, jax.Array]:
  x, labels = _mlp_arrays()[1][i]
  return jnp.asarray(x, dtype), jnp.asarray(labels)


def mlp_loss(params: PyTree, batch: tuple[jax.Array, jax.Array]) -> jax.Array:
  x, labels = batch
  hidden = jnp.tanh(x @ params['hidden']['w'] + params['hidden']['b'])
  logits = hidden @ params['out']['w'] + params['out']['b']
  return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()


mlp_grads = jax.jit(jax.grad(mlp_loss))


def update_step(tx: optax.GradientTransformationExtraArgs, *, donate: bool = False) -> Callable:
  """A jitted ``(params, state, batch, obj_batch) -> (new params, state, grads)``.

  ``obj_fn`` is the loss on ``obj_batch``: the gradient's own batch for a correct step,
  another one for the classic bug.
  """

  def step(params, state, batch, obj_batch):
    grads = jax.grad(mlp_loss)(params, batch)
    updates, state = tx.update(grads, state, params, obj_fn=lambda p: mlp_loss(p, obj_batch))
    return optax.apply_updates(params, updates), state, grads

  return jax.jit(step, donate_argnums=(0, 1) if donate else ())


PUBLIC_OPTIMIZERS = {
  'f3eo': lambda: f3eo_jax.f3eo(LEARNING_RATE),
  'f3eo_hvp_every_3': lambda: f3eo_jax.f3eo(LEARNING_RATE, hvp_every=3),
  'f3eo_reference': lambda: f3eo_jax.f3eo_reference(LEARNING_RATE),
  'f3eo_reference_amsgrad': lambda: f3eo_jax.f3eo_reference(LEARNING_RATE, amsgrad=True),
  'add_meta_gradient_adam': lambda: optax.chain(
    f3eo_jax.add_meta_gradient(), optax.adam(LEARNING_RATE)
  ),
}


@functools.cache
def donating_step(name: str) -> tuple[optax.GradientTransformationExtraArgs, Callable]:
  """``(tx, step)``: a public optimizer and its :func:`update_step` that donates both inputs."""
  tx = PUBLIC_OPTIMIZERS[name]()
  return tx, update_step(tx, donate=True)


@functools.cache
def injected_step() -> tuple[optax.GradientTransformationExtraArgs, Callable]:
  """``inject_hyperparams(f3eo)`` with a clip, and its :func:`update_step`."""
  tx = optax.inject_hyperparams(f3eo_jax.f3eo)(learning_rate=LEARNING_RATE, meta_clip_norm=1.0)
  return tx, update_step(tx)


# AdamW on g: what F3EO does when its meta term is dropped.


@jax.jit
def adamw_step(params: PyTree, grads: PyTree) -> tuple[PyTree, PyTree]:
  """One ``optax.adamw`` step on ``grads`` from a fresh state: F3EO with the meta term dropped.

  Returns the new params and Adam's first moment ``(1 − b1)·grads``, which shows the
  gradient that entered Adam more sharply than a first step (about ``lr·sign``) does.
  """
  tx = optax.adamw(LEARNING_RATE, weight_decay=WEIGHT_DECAY)
  updates, state = tx.update(grads, tx.init(params), params)
  return optax.apply_updates(params, updates), optax.tree.get(state, 'mu')


def assert_adamw_on(grads, params, new_params, state, rtol=1e-5, atol=1e-6) -> None:
  """The step from ``params`` was AdamW on ``grads``: the same params and first moment.

  The default tolerances allow for hyperparameters held as float32 arrays
  (``inject_hyperparams``), which round ``1 − b2`` differently from Python floats.
  """
  expected_params, expected_mu = adamw_step(params, grads)
  dense.assert_trees_close(new_params, expected_params, rtol, atol)
  dense.assert_trees_close(optax.tree.get(state, 'mu'), expected_mu, rtol, atol * 1e-2)


# Losses with a finite gradient and a non-finite H·g: (loss_fn, bad params, good params).


def float16_overflow() -> tuple[Callable, PyTree, PyTree]:
  """float16 params whose ``g`` is finite but whose ``H·g`` exceeds float16's 65504.

  ``L = Σ cᵢwᵢ²`` with ``c = (200, 50)``: at ``w = (1, 1)``, ``g = (400, 100)`` and
  ``H·g = (160000, 10000)``, whose first element overflows to ``inf``. At
  ``w = (0.1, 1)``, ``H·g ≈ (16000, 10000)`` is finite again.
  """
  return (
    _float16_overflow_loss,
    {'w': jnp.array([1.0, 1.0], jnp.float16)},
    {'w': jnp.array([0.1, 1.0], jnp.float16)},
  )


def _float16_overflow_loss(p):
  return jnp.sum(jnp.asarray([200.0, 50.0], p['w'].dtype) * p['w'] ** 2)


def nan_second_derivative() -> tuple[Callable, PyTree, PyTree]:
  """A loss with a finite gradient everywhere but no finite Hessian at ``v = 0``.

  A tanh regression in ``w`` plus an ``L^1.5`` penalty ``Σ|vᵢ|^1.5`` on a second leaf:
  once continuously differentiable, not twice. At ``v = 0`` the penalty's gradient is 0
  and its second derivative infinite; forward-over-reverse multiplies that by the tangent
  ``g_v = 0``, and ``∞·0`` makes ``H·g`` NaN. At ``v ≠ 0`` everything is finite.
  """
  w = jnp.array([0.8, -0.5, 0.3], jnp.float32)
  at_zero = {'v': jnp.zeros(2, jnp.float32), 'w': w}
  away = {'v': jnp.array([0.5, -0.3], jnp.float32), 'w': w}
  return _nan_second_derivative_loss, at_zero, away


@functools.cache
def _regression_data() -> tuple[np.ndarray, np.ndarray]:
  return np.random.default_rng(3).normal(size=(6, 3)), np.random.default_rng(4).normal(size=6)


def _nan_second_derivative_loss(p):
  x, y = (jnp.asarray(a, p['w'].dtype) for a in _regression_data())
  return jnp.mean((jnp.tanh(x @ p['w']) - y) ** 2) + jnp.sum(jnp.abs(p['v']) ** 1.5)


NON_FINITE_PROBLEMS = {
  'float16_overflow': float16_overflow,
  'nan_second_derivative': nan_second_derivative,
}


# A two-layer tanh classifier and one batch per step: for hvp_every schedules.


def sequence_problem(num_steps: int) -> tuple[PyTree, jax.Array, jax.Array]:
  """``(params, xs, ys)``: ``xs[t], ys[t]`` is the batch of step ``t`` (:func:`sequence_loss`)."""
  k1, k2, k3 = jax.random.split(jax.random.key(0), 3)
  params = {'w1': 0.5 * jax.random.normal(k1, (6, 8)), 'w2': 0.5 * jax.random.normal(k2, (8, 3))}
  xs = jax.random.normal(k3, (num_steps, 16, 6))
  ys = jnp.arange(num_steps * 16).reshape(num_steps, 16) % 3
  return params, xs, ys


def sequence_loss(params: PyTree, x: jax.Array, y: jax.Array) -> jax.Array:
  logits = jnp.tanh(x @ params['w1']) @ params['w2']
  return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()


# One update of add_meta_gradient, checked against the dense rule of _references.py.

DIAGNOSTICS = ('grad_sq_norm', 'g_dot_hg', 'hg_norm', 'meta_norm', 'cos_g_hg', 'cap_scale')


def meta_gradient_step(loss_fn: Callable, **options: Any) -> Callable:
  """``(params, meta_coef, meta_clip_norm, meta_max_ratio) -> (g, e, diagnostics)``.

  The hyperparameters are traced arguments, so one compilation serves every value
  tried; ``None`` is an empty pytree, so no clipping or cap (and another compilation).
  """

  @jax.jit
  def step(params, meta_coef, meta_clip_norm, meta_max_ratio):
    tx = f3eo_jax.add_meta_gradient(
      meta_coef, meta_clip_norm=meta_clip_norm, meta_max_ratio=meta_max_ratio, **options
    )
    g = jax.grad(loss_fn)(params)
    e, state = tx.update(g, tx.init(params), params, obj_fn=loss_fn)
    return g, e, f3eo_jax.diagnostics(state)

  return step


def assert_step_matches_dense(
  step: Callable,
  params: PyTree,
  reference: Any,
  meta_coef: float,
  meta_clip_norm: float | None = None,
  meta_max_ratio: float | None = None,
  **options: Any,
) -> tuple[PyTree, PyTree, dict, dict]:
  """One :func:`meta_gradient_step` against ``dense.meta_gradient`` with the same options.

  ``reference`` is ``dense.derivatives(loss_fn, params)``; ``options`` go to the dense rule
  only (the step was built with them). Checks ``e``, the diagnostics, their dtypes, and
  that the default gradient check ran and passed. Returns ``(g, e, diagnostics,
  expected_diagnostics)``.
  """
  g, e, diagnostics = step(params, meta_coef, meta_clip_norm, meta_max_ratio)
  expected_e, expected = dense.meta_gradient_at(
    reference,
    params,
    meta_coef=meta_coef,
    meta_clip_norm=meta_clip_norm,
    meta_max_ratio=meta_max_ratio,
    **options,
  )
  np.testing.assert_allclose(dense.ravel(e), expected_e, rtol=1e-9, atol=1e-12)
  for name in DIAGNOSTICS:
    np.testing.assert_allclose(
      diagnostics[name], expected[name], rtol=1e-5, atol=1e-9, err_msg=name
    )
  # The default gradient check ran (obj_fn is the loss of g) and passed.
  assert diagnostics['grad_mismatch'] <= 1e-12
  assert diagnostics['mismatch_count'] == 0 and diagnostics['nonfinite_count'] == 0
  assert diagnostics['cap_count'] == int(expected['cap_bound'])
  for name, value in diagnostics.items():
    assert value.dtype == (jnp.int32 if name.endswith('_count') else jnp.float32), name
  assert jax.tree.structure(e) == jax.tree.structure(g)
  return g, e, diagnostics, expected


# Masks of the two-layer MLP of conftest.random_mlp, and the same masks per coordinate.

MLP_MASKS = {
  'bool_tree': {'layer_0': {'w': True, 'b': False}, 'layer_1': {'w': False, 'b': True}},
  'prefix': {'layer_0': True, 'layer_1': False},
  'callable': lambda params: jax.tree.map(lambda p: p.ndim == 2, params),
}


def leaf_mask(mask: Any, params: PyTree) -> PyTree:
  """The mask as arrays shaped like the params, written independently of the library."""
  if callable(mask):
    mask = mask(params)
  return {
    layer: {
      name: np.full(
        np.shape(params[layer][name]),
        bool(mask[layer] if isinstance(mask[layer], bool) else mask[layer][name]),
      )
      for name in params[layer]
    }
    for layer in params
  }
