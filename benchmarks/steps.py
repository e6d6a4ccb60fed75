"""The one training step, the one compile-and-measure helper and the one timer.

The peak learning rate, weight decay and cosine horizon are traced inputs of
:func:`train_step`, so runs that differ only in those share a compilation. F3EO's ``obj_fn``
comes from ``f3eo_jax.flax.linen_value_grad_and_obj_fn`` (same batch, dropout key and batch
statistics as the gradient). :func:`interleaved` times blocks in rotating order, so a load
that drifts slows every variant alike.

Example:
  >>> from benchmarks import steps
  >>> times = steps.interleaved({'a': lambda: 2.0, 'b': lambda: 1.0}, rounds=3)
  >>> times['a'], steps.paired_ratio(times['a'], times['b'])
  ([2.0, 2.0, 2.0], 2.0)
"""

from __future__ import annotations

import time
from typing import Any

import flax
import jax
import jax.numpy as jnp
import numpy as np
import optax

import f3eo_jax
import f3eo_jax.flax
from benchmarks import config, xla_utils

STEP_DIAGNOSTICS = ('grad_sq_norm', 'cos_g_hg', 'meta_norm', 'cap_scale', 'grad_mismatch')
COUNTERS = ('cap_count', 'nonfinite_count', 'mismatch_count')


@flax.struct.dataclass
class TrainState:
  step: jax.Array  # int32 scalar: steps taken
  params: Any
  model_state: Any  # the other collections ('batch_stats'), {} if none
  opt_state: Any
  rng: jax.Array  # the run's dropout key; step i uses fold_in(rng, i)


def cosine_schedule(peak, horizon) -> optax.Schedule:
  """``optax.cosine_decay_schedule(peak, horizon)`` with a traced horizon."""
  return lambda count: (
    peak * 0.5 * (1.0 + jnp.cos(jnp.pi * (jnp.minimum(count, horizon) / horizon)))
  )


def hyperparams(variant: config.Variant, learning_rate, weight_decay, horizon) -> dict:
  """The traced inputs of a step: peak learning rate, horizon and (if any) weight decay."""
  out = {'learning_rate': jnp.float32(learning_rate), 'horizon': jnp.float32(horizon)}
  if variant.has_weight_decay:
    out['weight_decay'] = jnp.float32(config.WEIGHT_DECAY if weight_decay is None else weight_decay)
  return out


def make_tx(variant: config.Variant, hparams: dict):
  schedule = cosine_schedule(hparams['learning_rate'], hparams['horizon'])
  return config.make_tx(variant, schedule, hparams.get('weight_decay'))


def init_variables(model, example_x, seed):
  init_key, _ = jax.random.split(jax.random.key(seed))
  return model.init(init_key, jnp.asarray(example_x), train=False)


def create_train_state(model, tx, example_x, seed, *, init_fn=None) -> TrainState:
  variables = dict((init_fn or (lambda s: init_variables(model, example_x, s)))(seed))
  params, dropout_key = variables.pop('params'), jax.random.split(jax.random.key(seed))[1]
  return TrainState(jnp.zeros((), jnp.int32), params, variables, tx.init(params), dropout_key)


def train_step(state, x, y, hparams, *, model, loss, variant, refresh_hvp=None, axis=None):
  """One step: the new state, the loss and diagnostics. ``loss(outputs, y)``: per example;
  ``refresh_hvp``: set by ``jit_amortized``; ``axis``: average local gradients over it."""
  tx = make_tx(variant, hparams)
  (value, model_state), grads, obj_fn = f3eo_jax.flax.linen_value_grad_and_obj_fn(
    model.apply,
    {'params': state.params, **state.model_state},
    lambda out: loss(out, y).mean(),
    x,
    train=True,
    rngs={'dropout': jax.random.fold_in(state.rng, state.step)},
  )
  if axis is not None:
    value, grads = jax.lax.pmean((value, grads), axis)
  extra = {'refresh_hvp': refresh_hvp} if refresh_hvp is not None else {}
  if variant.uses_obj_fn:
    updates, opt_state = tx.update(grads, state.opt_state, state.params, obj_fn=obj_fn, **extra)
    diag = f3eo_jax.diagnostics(opt_state)
    metrics = {k: diag[k] for k in (*STEP_DIAGNOSTICS, *COUNTERS) if k in diag}
  else:
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    metrics = {'grad_sq_norm': optax.tree.norm(grads, squared=True)}
  params = optax.apply_updates(state.params, updates)
  new_state = TrainState(state.step + 1, params, model_state, opt_state, state.rng)
  return new_state, {'loss': value, **metrics}


def eval_step(state, x, y, *, model, task) -> dict:
  """Sums of the loss and of the metric's values over a batch, the model in eval mode."""
  out = model.apply({'params': state.params, **state.model_state}, x, train=False)
  losses, values = task.loss(out, y), task.metric_values(out, y)
  return {'loss_sum': losses.sum(), 'metric_sum': values.sum(), 'count': jnp.float32(losses.size)}


def compile_step(fn, args, variant: config.Variant):
  """Compiles ``fn(*args)``, ``args[0]`` donated; for the Python schedule, twice
  (``jit_amortized``). Returns the step and ``compile_s``, ``memory`` (the larger peak),
  ``flops`` (per step on average; ``None`` in-graph, which counts both branches)."""
  start = time.perf_counter()
  if variant.schedule == 'python':
    step = f3eo_jax.jit_amortized(fn, variant.hvp_every, donate_argnums=0)
    step.refresh_step = step.refresh_step.lower(*args).compile()
    step.reuse_step = step.reuse_step.lower(*args).compile()
    compiled = [step.refresh_step, step.reuse_step]
  else:
    step = jax.jit(fn, donate_argnums=0, keep_unused=True).lower(*args).compile()
    compiled = [step]
  flops = [xla_utils.flops(c) for c in compiled]
  k = variant.hvp_every
  average = (flops[0] + (k - 1) * flops[1]) / k if len(flops) == 2 else flops[0]
  memory = max((xla_utils.memory_bytes(c) for c in compiled), key=lambda m: m['peak'])
  flops = None if k > 1 and len(flops) == 1 else average
  return step, dict(compile_s=time.perf_counter() - start, memory=memory, flops=flops)


def interleaved(blocks, rounds: int) -> dict[Any, list[float]]:
  """``rounds`` rounds of every ``blocks[name]()`` (returning seconds), in rotating order."""
  names, times = list(blocks), {name: [] for name in blocks}
  for i in range(rounds):
    for name in names[i % len(names) :] + names[: i % len(names)]:
      times[name].append(float(blocks[name]()))
  return times


def paired_ratio(numerator, denominator) -> float:
  """The median over rounds of ``numerator[i] / denominator[i]``."""
  return float(np.median(np.asarray(numerator, float) / np.asarray(denominator, float)))


def block_timer(step, state, args, steps: int):
  """A block of ``steps`` calls of ``step(state, *args)``, state in ``state[0]``; seconds/step."""

  def run() -> float:
    jax.block_until_ready(state[0])
    start = time.perf_counter()
    for _ in range(steps):
      state[0], _ = step(state[0], *args)
    jax.block_until_ready(state[0])
    return (time.perf_counter() - start) / steps

  return run
