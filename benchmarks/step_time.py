"""Step time, FLOPs and peak memory of F3EO against AdamW, in JAX and in PyTorch.

For each model, every variant's training step is compiled and warmed up first, then all
are timed in interleaved rounds (:mod:`benchmarks.timing`): each round runs a block of
``HVP_EVERY`` consecutive steps of every variant, in rotating order. A step time is the
median over rounds of (block time / steps); a ratio is the median of the per-round ratios
of two blocks run side by side, so a busy machine slows both sides alike.

JAX variants (same model, batch and loss; learning rate 1e-3, weight decay 1e-4; the
optimizers come from :mod:`benchmarks.registry`, the loss, gradient and ``obj_fn`` from
``f3eo_jax.flax.linen_value_grad_and_obj_fn``):

- ``adamw``: the gradient, then ``optax.adamw``.
- ``f3eo``: the library's default ``f3eo``, exact ``H·g`` every step, ``update(...,
  obj_fn=)`` (forward-over-reverse ``jax.jvp`` of ``jax.grad``).
- ``f3eo_linearize``: ``f3eo_jax.value_grad_and_hvp`` gives loss, gradient and ``hvp_fn``
  from one ``jax.linearize``; ``update(..., hvp_fn=)``.
- ``f3eo_every10`` / ``f3eo_every10_linearize``: ``hvp_every=10`` with the refresh
  scheduled inside the compiled step (``lax.cond``), by both paths.
- ``f3eo_every10_python``: ``hvp_every=10`` with the refresh decided in Python: two
  compiled steps, ``jax.jit(partial(step, refresh_hvp=True))`` used when ``step % 10 ==
  0`` and ``jax.jit(partial(step, refresh_hvp=False))`` otherwise (no ``obj_fn``, no
  product, no ``lax.cond``).
- ``adamw_one_pass``: a floor for the reuse step, not an F3EO. AdamW on ``g + κ·(v − r·g)``
  for a stored parameter-sized ``v`` (as the reuse step reads its stored ``H·g``), with ``r``
  and a cap ``κ`` from ``⟨g, g⟩``, ``⟨g, v⟩``, ``⟨v, v⟩`` summed in one fused pass (the
  library's own reduction form; on CPU a variadic reduce over rows of 8), unscaled, with no
  maxima, no second pass for the cap's norm and no diagnostics. A reuse step that
  projects on this step's ``g`` has this work to do at least; the targets table turns
  it into a pass floor for ``hvp_every=10``: a refresh step at the lower of its FLOP
  ratio and its measured ratio, and nine steps at this row's ratio. It is an estimate
  from timings, not a bound: noise moves it by a few hundredths.
- ``f3eo_reference``: the published rule, ``f3eo_jax.f3eo_reference``, ``obj_fn=``.
- Not run by default (``--variants``): ``f3eo_revrev`` (``hvp_fn`` by reverse-over-reverse,
  ``grad(p ↦ ⟨∇L(p), v⟩)``) and ``f3eo_uncapped`` (the exact theory rule, no cap).

PyTorch variants (``benchmarks.torch_models``, the same architectures): ``torch_adamw``,
``torch.optim.AdamW``; ``torch_f3eo``, the published rule's double-backward step from
:mod:`benchmarks.torch_f3eo` (the implementation the parity tests check) followed by
``torch.optim.AdamW`` on ``e``.

Measured besides time:

- XLA FLOPs: ``cost_analysis()`` of each compiled step, a count of the work that no noise
  can blur. It counts both branches of a ``lax.cond``, so for the in-graph
  ``hvp_every=10`` steps it is not the per-step work; the Python-level path's figure is
  the exact average ``(F_refresh + 9·F_reuse)/10`` of its two compiled steps, which is
  also the FLOP floor of every ``hvp_every=10`` variant.
- JAX memory: ``memory_analysis()`` of the compiled step with params, model state and
  optimizer state donated: arguments + outputs + temporaries − aliased (donated) buffers,
  the step's whole footprint including the batch. Steps are jitted with
  ``keep_unused=True``: the refresh step never reads the stored product, and without it
  jit drops that donated argument and pairs the other donated buffers with the wrong
  outputs (extra parameter-sized copies). The Python-level path reports the larger of
  its two steps. A memory-only row set compiles (without running) the steps of
  a ~54M-parameter MLP (784-4096×4-10, batch 256) from abstract shapes.
- PyTorch memory: the peak-RSS increase during 3 steps over the set-up's resident set,
  in a fresh subprocess per variant (excludes params and batch; includes gradients,
  optimizer state and the autograd graph). Compare within a framework, not across.

Variants the installed library cannot build yet (``refresh_hvp``, or a registry entry
needing ``meta_max_ratio``) are reported as skipped, with the reason.

Usage::

  python -m benchmarks.step_time                       # MLP and CNN, and the wide-MLP memory rows
  python -m benchmarks.step_time --models all          # also the small GPT and ResNet-18
  python -m benchmarks.step_time --quick               # smoke run: tiny batches, one round
  python -m benchmarks.step_time --update-results      # write benchmarks/results/, not out/

Writes ``step_time.md`` and ``step_time.json`` to ``benchmarks/out/`` (ignored by git), or
to ``benchmarks/results/`` with ``--update-results``; results are merged per model.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import inspect
import json
import math
import os
import resource
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

# libgomp's default spin-waiting makes PyTorch 10-20x slower on an oversubscribed machine
# (measured here: 1150 ms vs 55 ms per GPT step); passive waiting is the fair setting.
os.environ.setdefault('OMP_WAIT_POLICY', 'PASSIVE')

from benchmarks import outputs, reporting, timing  # noqa: E402

LR, WEIGHT_DECAY, HVP_EVERY = 1e-3, 1e-4, 10
SCHEMA = 2  # the layout of a model's entry in step_time.json
GPT_VOCAB, GPT_SEQ = 65, 64


@dataclasses.dataclass(frozen=True)
class JaxVariant:
  """One JAX training step.

  Attributes:
    optimizer: the :mod:`benchmarks.registry` name.
    hvp: how ``H·g`` reaches the optimizer: ``'none'`` (AdamW), ``'obj_fn'``,
      ``'linearize'`` (``value_grad_and_hvp`` + ``hvp_fn=``) or ``'revrev'``.
    python_refresh: two compiled steps (``refresh_hvp=True/False``) chosen in Python.
    reuse_only: after the warm-up, time the ``refresh_hvp=False`` step alone.
    overrides: registry overrides, e.g. ``(('hvp_every', 10),)``.
    how: one line for the report.
  """

  optimizer: str
  hvp: str
  python_refresh: bool = False
  reuse_only: bool = False
  overrides: tuple[tuple[str, Any], ...] = ()
  how: str = ''


EVERY = (('hvp_every', HVP_EVERY),)
JAX_VARIANTS = {
  'adamw': JaxVariant('adamw', 'none', how='`optax.adamw`'),
  'f3eo': JaxVariant('f3eo', 'obj_fn', how='exact, `obj_fn=`'),
  'f3eo_linearize': JaxVariant('f3eo', 'linearize', how='exact, `value_grad_and_hvp` + `hvp_fn=`'),
  'f3eo_every10': JaxVariant(
    'f3eo', 'obj_fn', overrides=EVERY, how='`hvp_every=10`, `lax.cond`, `obj_fn=`'
  ),
  'f3eo_every10_linearize': JaxVariant(
    'f3eo', 'linearize', overrides=EVERY, how='`hvp_every=10`, `lax.cond`, `hvp_fn=`'
  ),
  'f3eo_every10_python': JaxVariant(
    'f3eo',
    'obj_fn',
    python_refresh=True,
    overrides=EVERY,
    how='`hvp_every=10`, two steps, `refresh_hvp=True/False`',
  ),
  'f3eo_every10_reuse': JaxVariant(
    'f3eo',
    'obj_fn',
    python_refresh=True,
    reuse_only=True,
    overrides=EVERY,
    how='`hvp_every=10`, the `refresh_hvp=False` step alone',
  ),
  'adamw_one_pass': JaxVariant(
    'adamw_one_pass', 'none', how='floor: AdamW on `g + κ·(v − r·g)`, one fused pass (docstring)'
  ),
  'f3eo_reference': JaxVariant('f3eo_reference', 'obj_fn', how='published rule, `obj_fn=`'),
  'f3eo_revrev': JaxVariant('f3eo', 'revrev', how='exact, reverse-over-reverse `hvp_fn=`'),
  'f3eo_uncapped': JaxVariant(
    'f3eo_theory_uncapped_global', 'obj_fn', how='exact theory rule, no cap'
  ),
}
TORCH_VARIANTS = {
  'torch_adamw': '`torch.optim.AdamW`',
  'torch_f3eo': 'published rule, double backward (`benchmarks.torch_f3eo`)',
}
EVERY10 = ('f3eo_every10', 'f3eo_every10_linearize', 'f3eo_every10_python')
DEFAULT_VARIANTS = (
  'adamw',
  'f3eo',
  'f3eo_linearize',
  *EVERY10,
  'f3eo_every10_reuse',
  'adamw_one_pass',
  'f3eo_reference',
  'torch_adamw',
  'torch_f3eo',
)

# Per model: batch, rounds, the batch of --quick, and the variants if not the default.
CONFIGS = {
  'mlp': dict(batch=256, rounds=12, quick_batch=16),
  'cnn': dict(batch=128, rounds=6, quick_batch=8),
  'gpt': dict(batch=16, rounds=7, quick_batch=2),
  # the in-graph hvp_every rows are left out: XLA:CPU runs convolutions inside lax.cond slowly.
  'resnet18': dict(
    batch=8,
    rounds=3,
    quick_batch=2,
    variants=(
      'adamw',
      'f3eo',
      'f3eo_linearize',
      'f3eo_every10_python',
      'f3eo_reference',
      'torch_adamw',
      'torch_f3eo',
    ),
  ),
}
DEFAULT_MODELS = ('mlp', 'cnn')
# The memory-only rows: a wide MLP, compiled from abstract shapes, never run.
WIDE = dict(
  hidden=(4096,) * 4,
  batch=256,
  quick_hidden=(256,) * 4,
  quick_batch=16,
  variants=('adamw', 'f3eo', 'f3eo_linearize', 'f3eo_every10', 'f3eo_every10_python'),
  quick_variants=('adamw', 'f3eo'),
)

# Targets on CPU: model -> (kind, variants, bound). Each variant is checked on its own.
TARGETS = {
  'mlp': (
    ('time', ('f3eo', 'f3eo_linearize'), 2.3),
    ('time', EVERY10, 1.20),
    ('memory', ('f3eo',), 1.6),
  ),
  'cnn': (
    ('time', ('f3eo', 'f3eo_linearize'), 2.0),
    ('time', EVERY10, 1.25),
    ('memory', ('f3eo',), 1.6),
  ),
  'mlp_wide': (('memory', ('f3eo',), 1.6),),
}


class Skipped(Exception):
  """A variant that cannot run here; the message is the reason."""


def library_has_refresh_hvp() -> bool:
  """Whether the installed ``f3eo_jax`` takes ``update(..., refresh_hvp=)``."""
  import f3eo_jax

  return 'refresh_hvp' in inspect.signature(f3eo_jax.add_meta_gradient().update).parameters


# --------------------------------------------------------------------------- data and models


def make_batch(name: str, batch: int, seed: int = 0):
  """A random batch (numpy): inputs in the Flax layout and integer labels."""
  rng = np.random.default_rng(seed)
  if name == 'gpt':
    x = rng.integers(0, GPT_VOCAB, size=(batch, GPT_SEQ)).astype(np.int32)
    return x, np.roll(x, -1, axis=1)
  shape = (batch, 32, 32, 3) if name == 'resnet18' else (batch, 28, 28, 1)
  return rng.standard_normal(shape).astype(np.float32), rng.integers(0, 10, size=batch).astype(
    np.int32
  )


def jax_model(name: str, hidden=(512, 512)):
  from benchmarks import models

  return {
    'mlp': lambda: models.MLP(hidden=tuple(hidden)),
    'cnn': lambda: models.CNN(),
    'resnet18': lambda: models.ResNet18(),
    'gpt': lambda: models.GPT(GPT_VOCAB, GPT_SEQ),
  }[name]()


def torch_model(name: str):
  from benchmarks import torch_models

  return {
    'mlp': lambda: torch_models.MLP(28 * 28, (512, 512)),
    'cnn': lambda: torch_models.CNN((28, 28, 1)),
    'resnet18': lambda: torch_models.ResNet18(),
    'gpt': lambda: torch_models.GPT(GPT_VOCAB, GPT_SEQ),
  }[name]()


# --------------------------------------------------------------------------- JAX


def one_pass_reuse(max_ratio: float = 0.03):
  """The ``adamw_one_pass`` floor's first transform: ``g + κ·(v − r·g)`` from one pass.

  ``v`` is a stored vector like the params (kept, never updated: as the stored ``H·g`` of
  a reuse step), ``r = ⟨g, v⟩/‖g‖²`` and ``κ = min(1, max_ratio·‖g‖/‖v − r·g‖)``, with
  ``‖v − r·g‖² = ‖v‖² − r·⟨g, v⟩`` (no second pass: unsafe numerically, fine for a floor).
  """
  import jax
  import jax.numpy as jnp
  import optax

  # The library's reductions (private): the floor reduces the way the library does, on
  # every platform.
  from f3eo_jax.transform import _stacked

  def sums(g, v):
    return _stacked([g * g, g * v, v * v], jnp.sum)

  def init_fn(params):
    return jax.tree.map(lambda p: jnp.full_like(p, 1e-3), params)

  def update_fn(updates, state, params=None):
    del params
    gg, gv, vv = sum(sums(g, v) for g, v in zip(jax.tree.leaves(updates), jax.tree.leaves(state)))
    r = gv / gg
    kappa = jnp.minimum(1.0, max_ratio * jnp.sqrt(gg / jnp.maximum(vv - r * gv, 1e-30)))
    return jax.tree.map(lambda g, v: g + kappa * (v - r * g), updates, state), state

  return optax.GradientTransformation(init_fn, update_fn)


def make_optimizer(variant: JaxVariant):
  """The variant's optimizer from the registry; :class:`Skipped` if the library lacks it."""
  from benchmarks import registry

  if variant.optimizer == 'adamw_one_pass':
    import optax

    return optax.chain(one_pass_reuse(), optax.adamw(LR, weight_decay=WEIGHT_DECAY))

  if variant.python_refresh and not library_has_refresh_hvp():
    raise Skipped('the installed f3eo_jax has no `update(..., refresh_hvp=)` yet')
  try:
    return registry.make(
      variant.optimizer, LR, weight_decay=WEIGHT_DECAY, **dict(variant.overrides)
    )
  except TypeError as e:  # the registry's message for an option the library does not have
    raise Skipped(str(e)) from None


def make_step(model, tx, variant: JaxVariant, refresh_hvp: bool | None = None):
  """The training step ``(params, model_state, opt_state, x, y, key) → same + loss``."""
  import jax
  import optax

  import f3eo_jax
  import f3eo_jax.flax
  from benchmarks.models import cross_entropy

  needs_product = variant.hvp != 'none' and refresh_hvp is not False

  def step(params, model_state, opt_state, x, y, key):
    loss_of = lambda logits: cross_entropy(logits, y)
    rngs = {'dropout': key}
    extra = {} if refresh_hvp is None else {'refresh_hvp': refresh_hvp}
    if variant.hvp == 'linearize' and needs_product:
      # value_grad_and_hvp needs the model state as aux; f3eo_jax.flax has no helper for it.
      def objective(p):
        logits, new_state = model.apply(
          {'params': p, **model_state}, x, train=True, rngs=rngs, mutable=list(model_state)
        )
        return loss_of(logits), new_state

      (loss, new_state), grads, extra['hvp_fn'] = f3eo_jax.value_grad_and_hvp(
        objective, params, has_aux=True
      )
    else:
      (loss, new_state), grads, obj_fn = f3eo_jax.flax.linen_value_grad_and_obj_fn(
        model.apply, {'params': params, **model_state}, loss_of, x, rngs=rngs, train=True
      )
      if variant.hvp == 'obj_fn' and needs_product:
        extra['obj_fn'] = obj_fn
      elif variant.hvp == 'revrev':
        grad_fn = jax.grad(obj_fn)
        extra['hvp_fn'] = lambda v: jax.grad(lambda p: optax.tree.vdot(grad_fn(p), v))(params)
    updates, opt_state = tx.update(grads, opt_state, params, **extra)
    return optax.apply_updates(params, updates), new_state, opt_state, loss

  return step


def compile_steps(model, variant: JaxVariant, args) -> dict[str, Any]:
  """Compiles the variant's step(s) on ``args`` (arrays or ``ShapeDtypeStruct``s).

  Returns:
    ``compiled`` (refresh flag → compiled step; key ``None`` for one step), ``tx``,
    ``compile_s``, ``memory`` (:func:`benchmarks.xla_utils.memory_bytes`, the largest
    peak of the steps), ``flops_compiled`` per step and ``flops`` per step on average
    (``None`` for an in-graph ``hvp_every``, whose count includes both branches).
  """
  import jax

  from benchmarks import xla_utils

  tx = make_optimizer(variant)
  params, model_state, _, x, y, key = args
  opt_state = (
    jax.eval_shape(tx.init, params)
    if isinstance(jax.tree.leaves(params)[0], jax.ShapeDtypeStruct)
    else tx.init(params)
  )
  flags = (True, False) if variant.python_refresh else (None,)
  start = time.perf_counter()
  compiled = {
    flag: jax.jit(make_step(model, tx, variant, flag), donate_argnums=(0, 1, 2), keep_unused=True)
    .lower(params, model_state, opt_state, x, y, key)
    .compile()
    for flag in flags
  }
  compile_s = time.perf_counter() - start
  memory = max((xla_utils.memory_bytes(c) for c in compiled.values()), key=lambda m: m['peak'])
  flops = {str(flag): xla_utils.flops(c) for flag, c in compiled.items()}
  if variant.reuse_only:
    average = flops['False']
  elif variant.python_refresh:
    average = (flops['True'] + (HVP_EVERY - 1) * flops['False']) / HVP_EVERY
  elif dict(variant.overrides).get('hvp_every', 1) > 1:
    average = None
  else:
    average = flops['None']
  costs = dict(compile_s=compile_s, memory=memory, flops_compiled=flops, flops=average)
  return dict(compiled=compiled, tx=tx, opt_state=opt_state, **costs)


class JaxRunner:
  """One JAX variant: its compiled step(s), its own params and optimizer state."""

  def __init__(self, name: str, variant: JaxVariant, batch: int):
    import jax
    import jax.numpy as jnp

    model = jax_model(name)
    x, y = (jnp.asarray(a) for a in make_batch(name, batch))
    variables = jax.jit(model.init)(jax.random.key(0), x)
    params = variables['params']
    model_state = {k: v for k, v in variables.items() if k != 'params'}
    self.x, self.y, self.key = x, y, jax.random.key(1)
    self.info = compile_steps(model, variant, (params, model_state, None, x, y, self.key))
    self.compiled = self.info.pop('compiled')
    self.state = [params, model_state, self.info.pop('opt_state')]  # donated at every step
    self.info.pop('tx')
    self.count, self.reuse_only = 0, False
    for _ in self.compiled:  # warm-up: one call of each compiled step
      self.run(1)
    self.reuse_only = variant.reuse_only

  def run(self, steps: int) -> float:
    """Runs ``steps`` steps; returns seconds per step."""
    import jax

    start = time.perf_counter()
    for _ in range(steps):
      flag = None if None in self.compiled else self.count % HVP_EVERY == 0 and not self.reuse_only
      *self.state, loss = self.compiled[flag](*self.state, self.x, self.y, self.key)
      self.count += 1
    jax.block_until_ready((self.state, loss))
    return (time.perf_counter() - start) / steps


def wide_memory_rows(quick: bool, variants) -> dict[str, Any]:
  """The memory-only rows: the wide MLP's steps compiled from abstract shapes."""
  import jax
  import jax.numpy as jnp

  hidden = WIDE['quick_hidden'] if quick else WIDE['hidden']
  batch = WIDE['quick_batch'] if quick else WIDE['batch']
  model = jax_model('mlp', hidden)
  x = jax.ShapeDtypeStruct((batch, 28, 28, 1), jnp.float32)
  y = jax.ShapeDtypeStruct((batch,), jnp.int32)
  key = jax.eval_shape(lambda: jax.random.key(1))
  params = jax.eval_shape(model.init, jax.random.key(0), x)['params']
  num_params = sum(math.prod(p.shape) for p in jax.tree.leaves(params))
  print(
    f'\n== mlp_wide (memory only): 784-{"-".join(map(str, hidden))}-10,'
    f' {num_params / 1e6:.1f}M params, batch {batch}',
    flush=True,
  )
  rows = {}
  for name in variants:
    try:
      info = compile_steps(model, JAX_VARIANTS[name], (params, {}, None, x, y, key))
    except Skipped as e:
      rows[name] = {'skipped': str(e)}
      print(f'  {name}: skipped ({e})', flush=True)
      continue
    rows[name] = {k: info[k] for k in ('compile_s', 'memory', 'flops_compiled', 'flops')}
    print(f'  {name}: peak {info["memory"]["peak"] / 2**20:.1f} MiB', flush=True)
  return dict(
    schema=SCHEMA,
    kind='memory_only',
    hidden=list(hidden),
    batch=batch,
    num_params=num_params,
    quick=quick,
    variants=rows,
  )


# --------------------------------------------------------------------------- PyTorch


def torch_setup(name: str, variant: str, batch: int):
  """Model, optimizer, step function and batch of a PyTorch variant."""
  import torch

  from benchmarks import torch_f3eo

  torch.set_num_threads(os.cpu_count())
  torch.manual_seed(0)
  model = torch_model(name).train()
  x, y = make_batch(name, batch)
  x = torch.from_numpy(x).long() if name == 'gpt' else torch.from_numpy(x)
  optimizer = torch.optim.AdamW(model.parameters(), lr=LR, weight_decay=WEIGHT_DECAY, foreach=True)
  step = torch_f3eo.f3eo_step if variant == 'torch_f3eo' else torch_f3eo.plain_step
  return model, optimizer, step, x, torch.from_numpy(y).long()


class TorchRunner:
  """One PyTorch variant on the same architecture and batch."""

  def __init__(self, name: str, variant: str, batch: int):
    try:
      import torch  # noqa: F401
    except ImportError:
      raise Skipped('torch is not installed') from None
    self.model, self.optimizer, self.step, self.x, self.y = torch_setup(name, variant, batch)
    self.info = {}
    self.run(1)

  def run(self, steps: int) -> float:
    start = time.perf_counter()
    for _ in range(steps):
      self.step(self.model, self.optimizer, self.x, self.y)
    return (time.perf_counter() - start) / steps


def _rss_kib(field: str) -> int:
  for line in Path('/proc/self/status').read_text().splitlines():
    if line.startswith(field + ':'):
      return int(line.split()[1])
  raise KeyError(field)


def torch_memory_child(name: str, variant: str, batch: int) -> None:
  """Prints the peak-RSS increase (bytes) of 3 steps over the set-up's resident set."""
  import gc

  model, optimizer, step, x, y = torch_setup(name, variant, batch)
  gc.collect()
  baseline = _rss_kib('VmRSS')
  try:  # resets the high-water mark so that set-up transients do not hide the step's peak
    Path('/proc/self/clear_refs').write_text('5')
    peak_of = lambda: _rss_kib('VmHWM')
  except OSError:
    baseline = max(baseline, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)
    peak_of = lambda: resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
  for _ in range(3):
    step(model, optimizer, x, y)
  print(json.dumps({'peak_delta_bytes': (peak_of() - baseline) * 1024}))


def torch_peak_bytes(name: str, variant: str, batch: int) -> float:
  cmd = [
    sys.executable,
    '-m',
    'benchmarks.step_time',
    '--torch-memory-child',
    f'{name}:{variant}:{batch}',
  ]
  out = subprocess.run(
    cmd, capture_output=True, text=True, check=True, cwd=outputs.HERE.parent
  ).stdout
  return float(json.loads(out.strip().splitlines()[-1])['peak_delta_bytes'])


# --------------------------------------------------------------------------- one model


def bench_model(name: str, quick: bool, variants=None, rounds: int | None = None) -> dict:
  """Sets up, times and measures every variant of one model."""
  cfg = CONFIGS[name]
  variants = list(variants or cfg.get('variants', DEFAULT_VARIANTS))
  batch = cfg['quick_batch'] if quick else cfg['batch']
  rounds = rounds or (1 if quick else cfg['rounds'])
  print(f'\n== {name}: batch {batch}, {rounds} rounds of {HVP_EVERY} steps per variant', flush=True)
  runners, rows = {}, {}
  for v in variants:
    rows[v] = {'how': TORCH_VARIANTS[v] if v in TORCH_VARIANTS else JAX_VARIANTS[v].how}
    try:
      runner = (
        TorchRunner(name, v, batch)
        if v in TORCH_VARIANTS
        else JaxRunner(name, JAX_VARIANTS[v], batch)
      )
    except Skipped as e:
      rows[v]['skipped'] = str(e)
      print(f'  {v}: skipped ({e})', flush=True)
      continue
    runners[v] = runner
    rows[v].update(runner.info)
    mem = runner.info.get('memory')
    print(
      f'  set up {v}'
      + (
        f' (compiled in {runner.info["compile_s"]:.1f} s, peak {mem["peak"] / 2**20:.1f} MiB)'
        if mem
        else ''
      ),
      flush=True,
    )

  def report(i, times):
    print(
      f'  round {i + 1}/{rounds}: '
      + ', '.join(f'{v} {t[-1] * 1e3:.1f}' for v, t in times.items())
      + ' ms',
      flush=True,
    )

  blocks = {v: functools.partial(r.run, HVP_EVERY) for v, r in runners.items()}
  times = timing.interleaved(blocks, rounds, on_round=report)
  del runners, blocks
  for v, t in times.items():
    rows[v]['median_ms'] = float(np.median(t) * 1e3)
    rows[v]['times_ms'] = [s * 1e3 for s in t]
    if v in TORCH_VARIANTS:
      try:
        rows[v]['memory'] = {'peak': torch_peak_bytes(name, v, batch)}
      except (subprocess.CalledProcessError, ValueError, KeyError) as e:
        print(f'  torch memory of {v} failed: {e}', flush=True)
  pairs = [(v, 'torch_adamw' if v in TORCH_VARIANTS else 'adamw') for v in times]
  pairs += [('f3eo_reference', 'torch_f3eo'), ('adamw', 'torch_adamw')]
  ratios = {
    f'{a}/{b}': timing.paired_ratio(times[a], times[b])
    for a, b in pairs
    if a != b and a in times and b in times
  }
  settings = dict(batch=batch, rounds=rounds, steps_per_block=HVP_EVERY, quick=quick)
  return dict(schema=SCHEMA, kind='timed', **settings, variants=rows, ratios=ratios)


# --------------------------------------------------------------------------- targets


def flop_floor(result: dict, variant: str) -> tuple[float | None, str]:
  """The FLOP ratio to AdamW under a variant's time ratio, and how it was obtained."""
  rows = result['variants']
  adamw = rows.get('adamw', {}).get('flops')
  if not adamw:
    return None, 'AdamW not measured'
  if variant in EVERY10:
    python = rows.get('f3eo_every10_python', {}).get('flops')
    if python:
      return python / adamw, '(F_refresh + 9·F_reuse)/10 of the two compiled steps'
    exact = rows.get('f3eo', {}).get('flops')
    if exact:
      return (
        exact + (HVP_EVERY - 1) * adamw
      ) / HVP_EVERY / adamw, 'estimate (F_exact + 9·F_AdamW)/10'
    return None, 'not measured'
  flops = rows.get(variant, {}).get('flops')
  return (flops / adamw, 'cost_analysis') if flops else (None, 'not measured')


def pass_floor(result: dict, variant: str) -> float | None:
  """For ``hvp_every=10``: one refresh step and nine ``adamw_one_pass`` steps, × AdamW.

  ``(min(F_exact / F_AdamW, t_exact / t_AdamW) + 9 · t_one_pass / t_AdamW) / 10``, or
  ``None`` if not measured.
  """
  rows, ratios = result['variants'], result.get('ratios', {})
  adamw, exact = rows.get('adamw', {}).get('flops'), rows.get('f3eo', {}).get('flops')
  one_pass, exact_time = ratios.get('adamw_one_pass/adamw'), ratios.get('f3eo/adamw')
  if variant not in EVERY10 or not (adamw and exact and one_pass and exact_time):
    return None
  return (min(exact / adamw, exact_time) + (HVP_EVERY - 1) * one_pass) / HVP_EVERY


def memory_ratio(result: dict, variant: str) -> float | None:
  rows = result['variants']
  peak = rows.get(variant, {}).get('memory', {}).get('peak')
  base = rows.get('adamw', {}).get('memory', {}).get('peak')
  return peak / base if peak and base else None


def check_targets(model: str, result: dict) -> list[dict]:
  """Every target of ``model``, one row per variant: measured value, met or not."""
  out = []
  for kind, variants, bound in TARGETS.get(model, ()):
    for v in variants:
      row = dict(
        kind=kind, variant=v, bound=bound, value=None, floor=None, floor_how='', pass_floor=None
      )
      skipped = result['variants'].get(v, {}).get('skipped')
      if kind == 'time':
        row['value'] = result.get('ratios', {}).get(f'{v}/adamw')
        row['floor'], row['floor_how'] = flop_floor(result, v)
        row['pass_floor'] = pass_floor(result, v)
      else:
        row['value'] = memory_ratio(result, v)
      row['status'] = (
        'not measured' + (f': {skipped}' if skipped else '')
        if row['value'] is None
        else 'met'
        if row['value'] <= bound
        else 'unmet'
      )
      out.append(row)
  return out


def target_label(t: dict) -> str:
  what = 'peak memory (donated)' if t['kind'] == 'memory' else 'step time'
  return f'`{t["variant"]}` {what} ≤ {t["bound"]:g}× AdamW'


# --------------------------------------------------------------------------- report

METHOD = """\
Written by `python -m benchmarks.step_time` (merged per model); how each figure is
obtained is in the module's docstring. Step times are medians over interleaved rounds of
{every} steps; "× AdamW" is the median of per-round side-by-side ratios (PyTorch rows: to
PyTorch AdamW). GFLOP: XLA `cost_analysis()` per step; for the in-graph `hvp_every=10`
rows it counts both branches of the `lax.cond` (marked "both branches"), so the FLOP
floor column gives the per-step average of the Python-level path's two compiled steps
instead. JAX peak memory: `memory_analysis()` of the compiled step with params, model
and optimizer state donated (arguments + outputs + temporaries − aliased). PyTorch
memory: peak-RSS increase during 3 steps, in a subprocess (not comparable with XLA's).
"""


def _plural(n: int, noun: str) -> str:
  return f'{n} {noun}' + ('' if n == 1 else 's')


def _fmt(value, spec: str, suffix: str = '') -> str:
  return 'n/a' if value is None or not math.isfinite(value) else f'{value:{spec}}{suffix}'


def model_section(name: str, res: dict) -> list[str]:
  if res['kind'] == 'memory_only':
    return memory_section(res)
  rows = res['variants']
  lines = [
    f'## {name} (batch {res["batch"]}, {_plural(res["rounds"], "round")}'
    + (', QUICK)' if res['quick'] else ')'),
    '',
    reporting.machine_paragraph(res['machine'])
    + (f' This model: {res["wall_time_s"]:.0f} s.' if 'wall_time_s' in res else ''),
    '',
  ]
  table = []
  for v, e in rows.items():
    if 'skipped' in e:
      table.append([v, e['how'], f'skipped: {e["skipped"]}', '', '', '', '', '', ''])
      continue
    base = 'torch_adamw' if v in TORCH_VARIANTS else 'adamw'
    ratio = 1.0 if v == base else res['ratios'].get(f'{v}/{base}')
    flops = e.get('flops')
    compiled = e.get('flops_compiled', {})
    gflop = (
      _fmt(flops / 1e9, '.3f')
      if flops
      else f'{_fmt(compiled["None"] / 1e9, ".3f")} (both branches)'
      if 'None' in compiled
      else ''
    )
    floor = flop_floor(res, v)[0] if v in JAX_VARIANTS else None
    peak = e.get('memory', {}).get('peak')
    base_peak = rows.get(base, {}).get('memory', {}).get('peak')
    table.append(
      [
        v,
        e['how'],
        _fmt(e['median_ms'], '.2f'),
        _fmt(ratio, '.2f', '×'),
        gflop,
        _fmt(floor, '.2f', '×') if v in JAX_VARIANTS else '',
        _fmt(peak / 2**20 if peak else None, '.1f'),
        _fmt(peak / base_peak if peak and base_peak else None, '.2f', '×'),
        _fmt(e['compile_s'], '.1f') if 'compile_s' in e else '',
      ]
    )
  lines.append(
    reporting.markdown_table(
      [
        'variant',
        'how',
        'step ms',
        '× AdamW',
        'GFLOP / step',
        'FLOP floor × AdamW',
        'peak MiB',
        'memory × AdamW',
        'compile s',
      ],
      table,
      'llrrrrrrr',
    )
  )
  lines.append('')
  for key, text in (
    ('f3eo_reference/torch_f3eo', 'JAX `f3eo_reference` / PyTorch double-backward F3EO'),
    ('adamw/torch_adamw', 'JAX AdamW / PyTorch AdamW'),
  ):
    if key in res['ratios']:
      lines.append(f'- {text}: {res["ratios"][key]:.2f}× (paired median over rounds)')
  lines += [''] + targets_section(res.get('targets', []))
  return lines


def memory_section(res: dict) -> list[str]:
  rows = res['variants']
  widths = '-'.join(str(w) for w in res['hidden'])
  lines = [
    f'## mlp_wide: memory only (784-{widths}-10, {res["num_params"] / 1e6:.1f}M parameters,'
    f' batch {res["batch"]}{", QUICK" if res["quick"] else ""})',
    '',
    'Compiled from abstract shapes, never run; XLA `memory_analysis()` with params and optimizer'
    ' state donated.',
    '',
  ]
  base = rows.get('adamw', {}).get('memory', {}).get('peak')
  table = []
  for v, e in rows.items():
    if 'skipped' in e:
      table.append([v, JAX_VARIANTS[v].how, f'skipped: {e["skipped"]}', '', '', ''])
      continue
    m = e['memory']
    table.append(
      [
        v,
        JAX_VARIANTS[v].how,
        f'{m["peak"] / 2**20:.1f}',
        _fmt(m['peak'] / base if base else None, '.2f', '×'),
        f'{m["argument"] / 2**20:.1f}',
        f'{m["temp"] / 2**20:.1f}',
      ]
    )
  lines.append(
    reporting.markdown_table(
      ['variant', 'how', 'peak MiB', 'memory × AdamW', 'arguments MiB', 'temporaries MiB'],
      table,
      'llrrrr',
    )
  )
  return lines + [''] + targets_section(res.get('targets', []))


def targets_section(targets: list[dict]) -> list[str]:
  if not targets:
    return []
  table = [
    [
      target_label(t),
      _fmt(t['value'], '.2f', '×'),
      t['status'],
      _fmt(t['floor'], '.2f', '×') + (f' ({t["floor_how"]})' if t['floor'] is not None else '')
      if t['kind'] == 'time'
      else '–',
      _fmt(t.get('pass_floor'), '.2f', '×') if t.get('pass_floor') is not None else '–',
    ]
    for t in targets
  ]
  lines = [
    'Targets (CPU):',
    '',
    reporting.markdown_table(
      ['target', 'measured', 'status', 'FLOP floor', 'pass floor'], table, 'lrlll'
    ),
    '',
  ]
  if any(t.get('pass_floor') is not None for t in targets):
    lines += [
      'Pass floor (an estimate from timings, not a bound): one refresh step at the lower of'
      ' its FLOP ratio and its measured ratio, and nine `adamw_one_pass` steps (AdamW plus'
      ' one fused pass of three inner products, the cheapest reuse step measured here):'
      ' `(min(F_exact / F_AdamW, f3eo / AdamW) + 9 × adamw_one_pass / AdamW) / 10`.',
      '',
    ]
  return lines


def write_report(results: dict, out_dir: Path) -> Path:
  order = [*CONFIGS, 'mlp_wide']
  ordered = {n: results[n] for n in order if n in results}
  reporting.write_json(str(out_dir / 'step_time.json'), ordered)
  lines = ['# Step time, FLOPs and peak memory: F3EO vs AdamW', '', METHOD.format(every=HVP_EVERY)]
  for name, res in ordered.items():
    lines += model_section(name, res)
  md = out_dir / 'step_time.md'
  reporting.write_text(str(md), '\n'.join(lines))
  return md


def load_previous(path: Path) -> dict:
  """Earlier results of this schema in ``path`` (others are dropped, with a note)."""
  if not path.exists():
    return {}
  old = json.loads(path.read_text())
  stale = [k for k, v in old.items() if not isinstance(v, dict) or v.get('schema') != SCHEMA]
  if stale:
    print(f'note: dropping {stale} from {path}: written by an older version of this script')
  return {k: v for k, v in old.items() if k not in stale}


def print_targets(name: str, targets: list[dict]) -> None:
  for t in targets:
    floor = f'; FLOP floor {t["floor"]:.2f}×' if t.get('floor') is not None else ''
    if t.get('pass_floor') is not None:
      floor += f'; pass floor {t["pass_floor"]:.2f}×'
    print(f'   {name}: {target_label(t)}: {_fmt(t["value"], ".2f", "×")} {t["status"]}{floor}')


def main(argv=None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
  known = ','.join([*JAX_VARIANTS, *TORCH_VARIANTS])
  parser.add_argument('--models', default=','.join(DEFAULT_MODELS), help='comma-separated, or all')
  parser.add_argument('--variants', help=f'comma-separated (default: per model), of {known}')
  parser.add_argument('--quick', action='store_true', help='smoke run: tiny batches, one round')
  parser.add_argument('--rounds', type=int, help='timed rounds per model')
  parser.add_argument(
    '--wide',
    action=argparse.BooleanOptionalAction,
    default=True,
    help='the memory-only rows of the ~54M-parameter MLP',
  )
  outputs.add_arguments(parser)
  parser.add_argument('--torch-memory-child', help=argparse.SUPPRESS)
  args = parser.parse_args(argv)
  if args.torch_memory_child:
    name, variant, batch = args.torch_memory_child.split(':')
    torch_memory_child(name, variant, int(batch))
    return
  names = list(CONFIGS) if args.models == 'all' else [n for n in args.models.split(',') if n]
  if set(names) - set(CONFIGS):
    parser.error(
      f'unknown models {sorted(set(names) - set(CONFIGS))}; choose from {sorted(CONFIGS)}'
    )
  variants = [v for v in args.variants.split(',') if v] if args.variants else None
  if variants and set(variants) - set(JAX_VARIANTS) - set(TORCH_VARIANTS):
    parser.error(
      f'unknown variants {sorted(set(variants) - set(JAX_VARIANTS) - set(TORCH_VARIANTS))}'
    )
  out_dir = outputs.directory(args)

  results = load_previous(out_dir / 'step_time.json')
  info = reporting.machine_info(('torch',))
  info.update(torch_threads=os.cpu_count(), omp_wait_policy=os.environ.get('OMP_WAIT_POLICY'))
  for name in names:
    start = time.perf_counter()
    res = bench_model(name, args.quick, variants, args.rounds)
    res['targets'] = check_targets(name, res)
    res['machine'] = dict(info, load_average_end=reporting.load_average())
    res['wall_time_s'] = time.perf_counter() - start
    print(f'-- {name}: ' + ', '.join(f'{k} {v:.2f}' for k, v in res['ratios'].items()))
    print_targets(name, res['targets'])
    results[name] = res
    md = write_report(results, out_dir)
  if args.wide:
    wide = WIDE['quick_variants' if args.quick else 'variants']
    res = wide_memory_rows(args.quick, [v for v in wide if not variants or v in variants])
    res['targets'] = check_targets('mlp_wide', res)
    res['machine'] = info
    print_targets('mlp_wide', res['targets'])
    results['mlp_wide'] = res
    md = write_report(results, out_dir)
  if names or args.wide:
    print(f'\nwrote {md} and {md.with_suffix(".json")}')


if __name__ == '__main__':
  main()
