"""Every public optimizer, and optax's optimization targets run once per optimizer.

For ``test_optax_patterns.py``. The parabola and Rosenbrock
targets are those of optax's ``_src/alias_test.py`` (for complex dtypes the optimum moves
to ``a = 1+1j``); the step conjugates ``jax.grad``, as optax does for complex parameters.
The four runs of an optimizer (two targets, float32 and complex64) are one jitted
``jax.lax.scan`` of 10000 steps, computed once per process.
"""

from __future__ import annotations

import functools
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from optax._src import numerics

import f3eo_jax

NUM_STEPS = 10_000


def meta_adam(learning_rate, meta_coef=1.0, b1=0.9, b2=0.999, eps=1e-8, mu_dtype=None):
  """``add_meta_gradient`` (the uncapped theory rule) chained with ``optax.adam``."""
  return optax.chain(
    f3eo_jax.add_meta_gradient(meta_coef),
    optax.adam(learning_rate, b1=b1, b2=b2, eps=eps, mu_dtype=mu_dtype),
  )


# (factory, keyword arguments), as optax's tests list optimizers: one learning rate each.
# An Adam step moves a coordinate by about the learning rate at most, and the parabola
# starts 11 units from its optimum: at 1.5e-3 10000 steps fall short (measured error
# 0.21), at 2e-3 they reach it. PyTorch's AMSGrad keeps the largest second moment and
# moves slower: it falls short at 3e-3 (error 0.24) and reaches it at 1e-2.
OPTIMIZERS = {
  'f3eo': (f3eo_jax.f3eo, {'learning_rate': 2e-3}),
  # Optax's own alias test runs its optimizers at 0.1 (its adamw reaches Rosenbrock's optimum);
  # F3EO's default must too. With a cap of 0.01 or more it stalls on the valley floor there.
  'f3eo_lr0.1': (f3eo_jax.f3eo, {'learning_rate': 0.1}),
  'f3eo_uncapped': (f3eo_jax.f3eo, {'learning_rate': 2e-3, 'meta_max_ratio': None}),
  'f3eo_reference': (f3eo_jax.f3eo_reference, {'learning_rate': 2e-3}),
  'f3eo_reference_amsgrad': (f3eo_jax.f3eo_reference, {'learning_rate': 1e-2, 'amsgrad': True}),
  'add_meta_gradient_adam': (meta_adam, {'learning_rate': 2e-3}),
}
UNCAPPED = ('f3eo_uncapped', 'add_meta_gradient_adam')  # the exact theory rule, no cap


def make(name: str, **overrides: Any) -> optax.GradientTransformationExtraArgs:
  factory, kwargs = OPTIMIZERS[name]
  return factory(**{**kwargs, **overrides})


def parabola(dtype):
  initial = jnp.array([-1.0, 10.0, 1.0], dtype=dtype)
  final = jnp.array([1.0, -1.0, 1.0], dtype=dtype)
  if jnp.iscomplexobj(initial):
    final = final * (1 + 1j)
  return initial, final, lambda p: jnp.sum(numerics.abs_sq(p - final))


def rosenbrock(dtype):
  a, b = 1.0, 100.0
  if jnp.issubdtype(dtype, jnp.complexfloating):
    a *= 1 + 1j
  initial = jnp.array([0.0, 0.0], dtype=dtype)
  final = jnp.array([a, a**2], dtype=dtype)
  return initial, final, lambda p: numerics.abs_sq(a - p[0]) + b * numerics.abs_sq(p[1] - p[0] ** 2)


TARGETS = {'parabola': parabola, 'rosenbrock': rosenbrock}
DTYPES = ('float32', 'complex64')
CASES = tuple((target, dtype) for target in TARGETS for dtype in DTYPES)


class Run(NamedTuple):
  params: np.ndarray  # after NUM_STEPS steps
  final_params: np.ndarray  # the optimum
  losses: np.ndarray  # the objective before each step
  meta_ratio: np.ndarray  # ‖m⊥‖ / ‖g‖ of each step (NaN where g = 0)


@functools.cache
def runs(optimizer: str) -> dict[tuple[str, str], Run]:
  """``NUM_STEPS`` steps of the optimizer on every ``(target, dtype)`` of ``CASES``."""
  tx = make(optimizer)
  problems = [TARGETS[target](jnp.dtype(dtype)) for target, dtype in CASES]

  def step(carry, _):
    carry_out, records = [], []
    for (params, state), (_, _, objective) in zip(carry, problems):
      loss, grads = jax.value_and_grad(objective)(params)
      grads = jax.tree.map(jnp.conj, grads)  # optax's convention for complex parameters
      updates, state = tx.update(grads, state, params, obj_fn=objective)
      diagnostics = f3eo_jax.diagnostics(state)
      ratio = diagnostics['meta_norm'] / jnp.sqrt(diagnostics['grad_sq_norm'])
      carry_out.append((optax.apply_updates(params, updates), state))
      records.append((loss, ratio))
    return tuple(carry_out), tuple(records)

  @jax.jit
  def optimize(initial):
    return jax.lax.scan(step, tuple((p, tx.init(p)) for p in initial), length=NUM_STEPS)

  final_carry, records = optimize(tuple(initial for initial, _, _ in problems))
  return {
    case: Run(np.asarray(params), np.asarray(final), np.asarray(losses), np.asarray(ratios))
    for case, (params, _), (_, final, _), (losses, ratios) in zip(
      CASES, final_carry, problems, records
    )
  }


def run(optimizer: str, target: str, dtype: str) -> Run:
  return runs(optimizer)[(target, dtype)]
