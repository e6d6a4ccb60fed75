"""Step time and peak memory of F3EO against AdamW, in JAX and in PyTorch.

For each model, every variant's training step is compiled (warmed up) first, then
timed in interleaved rounds: each round runs a block of ``hvp_every`` consecutive
steps of every variant, in rotating order, and the reported figure is the median
over rounds of (block time / steps). Ratios are taken between figures measured
side by side, so a busy machine slows both sides alike.

Variants (same model, batch, loss; lr 1e-3, weight decay 1e-4):

- ``adamw``: ``jax.value_and_grad`` then ``optax.adamw``.
- ``f3eo``: ``f3eo_jax.f3eo`` with ``obj_fn=`` (forward-over-reverse ``jax.jvp`` of
  ``jax.grad``, the library's default path).
- ``f3eo_linearize``: ``f3eo_jax.value_grad_and_hvp`` gives loss, grads and
  ``hvp_fn`` from one ``jax.linearize``; ``update(..., hvp_fn=hvp_fn)``.
- ``f3eo_revrev``: ``hvp_fn`` by reverse-over-reverse, ``grad(p ↦ ⟨∇L(p), v⟩)``.
- ``f3eo_every10`` / ``f3eo_every10_linearize``: ``hvp_every=10``, by both paths.
- ``f3eo_reference`` / ``f3eo_reference_linearize``: the published rule.
- ``torch_adamw`` / ``torch_f3eo``: ``torch.optim.AdamW``, and the published
  double-backward F3EO step (``create_graph=True``, grad of ``‖g‖²``, clip to 1,
  per-tensor projection, ``e = g − m⊥``, AdamW).

Memory: for JAX, XLA's ``memory_analysis()`` of the compiled step (arguments +
outputs + temporaries − aliased donations), which is the step's whole footprint
including params, optimizer state and batch; for PyTorch, the peak-RSS increase
over one process's resident set after set-up, during 3 steps, measured in a fresh
subprocess per variant (so it excludes the params and batch, includes gradients,
optimizer state and the autograd graph). Compare within a framework, not across.

Also reported: XLA's ``cost_analysis()`` FLOPs of each compiled JAX step, a
noise-free count of the work.

Usage::

  python benchmarks/step_time.py                      # everything (long on 2 cores)
  python benchmarks/step_time.py --models mlp,cnn     # a subset
  python benchmarks/step_time.py --quick              # smoke run: tiny batches, 1 round

Results are merged per model into benchmarks/results/step_time.json and the table
rewritten in benchmarks/results/step_time.md.
"""

from __future__ import annotations

import argparse
import datetime
import functools
import json
import os
import platform
import resource
import subprocess
import sys
import time
from importlib import metadata
from pathlib import Path

import numpy as np

# libgomp's default spin-waiting makes PyTorch 10-20x slower on an oversubscribed machine
# (measured here: 1150 ms vs 55 ms per GPT step); passive waiting is the fair setting.
os.environ.setdefault('OMP_WAIT_POLICY', 'PASSIVE')

if __package__ in (None, ''):
  sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

RESULTS = Path(__file__).resolve().parent / 'results'
LR, WEIGHT_DECAY, HVP_EVERY = 1e-3, 1e-4, 10

JAX_VARIANTS = (
    'adamw', 'f3eo', 'f3eo_linearize', 'f3eo_revrev', 'f3eo_every10', 'f3eo_every10_linearize',
    'f3eo_reference', 'f3eo_reference_linearize',
)
TORCH_VARIANTS = ('torch_adamw', 'torch_f3eo')

# Per model: batch, rounds, the batch of --quick, and the default variants if not all.
CONFIGS = {
    'mlp': dict(batch=256, rounds=12, quick_batch=16),
    'cnn': dict(batch=128, rounds=6, quick_batch=8),
    'gpt': dict(batch=16, rounds=7, quick_batch=2),
    # hvp_every is left out: XLA:CPU runs convolutions inside lax.cond ~30x slower (see README).
    'resnet18': dict(batch=8, rounds=3, quick_batch=2, variants=(
        'adamw', 'f3eo', 'f3eo_linearize', 'f3eo_reference', 'torch_adamw', 'torch_f3eo')),
}
GPT_VOCAB, GPT_SEQ = 65, 64

# Targets on CPU for the MLP and the CNN: (numerator, denominator, bound).
TARGETS = (
    ('exact F3EO / AdamW (JAX)', 'f3eo', 'adamw', 2.3),
    ('hvp_every=10 / AdamW (JAX)', 'f3eo_every10', 'adamw', 1.25),
    ('JAX f3eo_reference / PyTorch F3EO', 'f3eo_reference', 'torch_f3eo', 0.6),
)
MEMORY_TARGET = 2.0


# --------------------------------------------------------------------------- data


def make_batch(name: str, batch: int, seed: int = 0):
  """A random batch (numpy): inputs in the Flax layout and integer labels."""
  rng = np.random.default_rng(seed)
  if name == 'gpt':
    x = rng.integers(0, GPT_VOCAB, size=(batch, GPT_SEQ)).astype(np.int32)
    return x, np.roll(x, -1, axis=1)
  shape = (batch, 32, 32, 3) if name == 'resnet18' else (batch, 28, 28, 1)
  return rng.standard_normal(shape).astype(np.float32), rng.integers(0, 10, size=batch).astype(np.int32)


# --------------------------------------------------------------------------- JAX


def jax_model(name: str):
  from benchmarks import models

  return {
      'mlp': lambda: models.MLP(hidden=(512, 512)),
      'cnn': lambda: models.CNN(),
      'resnet18': lambda: models.ResNet18(),
      'gpt': lambda: models.GPT(GPT_VOCAB, GPT_SEQ),
  }[name]()


def jax_optimizer(variant: str):
  import optax

  import f3eo_jax

  if variant == 'adamw':
    return optax.adamw(LR, weight_decay=WEIGHT_DECAY)
  if variant.startswith('f3eo_reference'):
    return f3eo_jax.f3eo_reference(LR, weight_decay=WEIGHT_DECAY)
  every = HVP_EVERY if variant.startswith('f3eo_every10') else 1
  return f3eo_jax.f3eo(LR, weight_decay=WEIGHT_DECAY, hvp_every=every)


def jax_step_fn(model, variant: str):
  """The jitted training step ``(params, model_state, opt_state, x, y, key) → same + loss``."""
  import jax
  import optax

  import f3eo_jax
  from benchmarks.models import cross_entropy

  tx = jax_optimizer(variant)
  hvp_path = 'linearize' if variant.endswith('_linearize') else 'revrev' if variant.endswith('_revrev') else 'obj_fn'

  def step(params, model_state, opt_state, x, y, key):
    def loss_fn(p):
      logits, new_state = model.apply(
          {'params': p, **model_state}, x, train=True, mutable=list(model_state), rngs={'dropout': key}
      )
      return cross_entropy(logits, y), new_state

    if variant == 'adamw':
      (loss, new_state), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
      updates, opt_state = tx.update(grads, opt_state, params)
    elif hvp_path == 'linearize':
      (loss, new_state), grads, hvp_fn = f3eo_jax.value_grad_and_hvp(loss_fn, params, has_aux=True)
      updates, opt_state = tx.update(grads, opt_state, params, hvp_fn=hvp_fn)
    elif hvp_path == 'revrev':
      (loss, new_state), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
      grad_fn = jax.grad(lambda p: loss_fn(p)[0])

      def hvp_fn(v):
        return jax.grad(lambda p: optax.tree.vdot(grad_fn(p), v))(params)

      updates, opt_state = tx.update(grads, opt_state, params, hvp_fn=hvp_fn)
    else:
      (loss, new_state), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
      updates, opt_state = tx.update(grads, opt_state, params, obj_fn=lambda p: loss_fn(p)[0])
    return optax.apply_updates(params, updates), new_state, opt_state, loss

  return jax.jit(step, donate_argnums=(0, 1, 2)), tx


class JaxRunner:
  """One JAX variant: compiled step, its own params and optimizer state."""

  def __init__(self, name: str, variant: str, batch: int):
    import jax
    import jax.numpy as jnp

    model = jax_model(name)
    x, y = make_batch(name, batch)
    self.x, self.y = jnp.asarray(x), jnp.asarray(y)
    variables = jax.jit(model.init)(jax.random.key(0), self.x)
    self.params = variables['params']
    self.model_state = {k: v for k, v in variables.items() if k != 'params'}
    step, tx = jax_step_fn(model, variant)
    self.opt_state = tx.init(self.params)
    self.key = jax.random.key(1)
    start = time.perf_counter()
    lowered = step.lower(self.params, self.model_state, self.opt_state, self.x, self.y, self.key)
    self.compiled = lowered.compile()
    self.compile_s = time.perf_counter() - start
    mem = self.compiled.memory_analysis()
    self.peak_bytes = (
        mem.temp_size_in_bytes + mem.argument_size_in_bytes + mem.output_size_in_bytes
        - mem.alias_size_in_bytes
    )
    self.temp_bytes = mem.temp_size_in_bytes
    cost = self.compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    self.flops = float(cost.get('flops', float('nan'))) if cost else float('nan')
    self.run(1)  # warm-up

  def run(self, steps: int) -> float:
    import jax

    start = time.perf_counter()
    for _ in range(steps):
      self.params, self.model_state, self.opt_state, loss = self.compiled(
          self.params, self.model_state, self.opt_state, self.x, self.y, self.key
      )
    jax.block_until_ready((self.params, loss))
    return time.perf_counter() - start


# --------------------------------------------------------------------------- PyTorch


def torch_model(name: str):
  from benchmarks import torch_models

  return {
      'mlp': lambda: torch_models.MLP(28 * 28, (512, 512)),
      'cnn': lambda: torch_models.CNN((28, 28, 1)),
      'resnet18': lambda: torch_models.ResNet18(),
      'gpt': lambda: torch_models.GPT(GPT_VOCAB, GPT_SEQ),
  }[name]()


def torch_f3eo_step(model, optimizer, x, y):
  """The published F3EO step: ``m = ∇‖g‖²`` by double backward, clip, project per tensor."""
  import torch
  from torch.nn import functional as F

  params = [p for p in model.parameters() if p.requires_grad]
  logits = model(x)
  loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), y.reshape(-1))
  grads = torch.autograd.grad(loss, params, create_graph=True)
  grad_sq_norm = sum((g * g).sum() for g in grads)
  meta = torch.autograd.grad(grad_sq_norm, params)
  with torch.no_grad():
    meta_norm = torch.sqrt(sum((m * m).sum() for m in meta))
    scale = torch.clamp(1.0 / (meta_norm + 1e-6), max=1.0)
    for p, g, m in zip(params, grads, meta):
      g = g.detach()
      m = m * scale
      g_sq = (g * g).sum()
      coef = torch.where(g_sq > 0, (m * g).sum() / torch.where(g_sq > 0, g_sq, 1.0), 0.0)
      p.grad = g - (m - coef * g)
  optimizer.step()
  return loss


def torch_adamw_step(model, optimizer, x, y):
  from torch.nn import functional as F

  optimizer.zero_grad(set_to_none=True)
  logits = model(x)
  loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), y.reshape(-1))
  loss.backward()
  optimizer.step()
  return loss


class TorchRunner:
  """One PyTorch variant on the same architecture and batch."""

  def __init__(self, name: str, variant: str, batch: int):
    import torch

    torch.set_num_threads(os.cpu_count())
    torch.manual_seed(0)
    self.model = torch_model(name).train()
    x, y = make_batch(name, batch)
    self.x = torch.from_numpy(x).long() if name == 'gpt' else torch.from_numpy(x)
    self.y = torch.from_numpy(y).long()
    self.optimizer = torch.optim.AdamW(self.model.parameters(), lr=LR, weight_decay=WEIGHT_DECAY, foreach=True)
    self.step = torch_f3eo_step if variant == 'torch_f3eo' else torch_adamw_step
    self.run(1)

  def run(self, steps: int) -> float:
    start = time.perf_counter()
    for _ in range(steps):
      self.step(self.model, self.optimizer, self.x, self.y)
    return time.perf_counter() - start


def _rss_kib(field: str) -> int:
  for line in Path('/proc/self/status').read_text().splitlines():
    if line.startswith(field + ':'):
      return int(line.split()[1])
  raise KeyError(field)


def torch_memory_child(name: str, variant: str, batch: int) -> None:
  """Prints the peak-RSS increase (bytes) of 3 steps over the set-up's resident set."""
  import gc

  import torch

  torch.set_num_threads(os.cpu_count())
  model = torch_model(name).train()
  x, y = make_batch(name, batch)
  x = torch.from_numpy(x).long() if name == 'gpt' else torch.from_numpy(x)
  y = torch.from_numpy(y).long()
  optimizer = torch.optim.AdamW(model.parameters(), lr=LR, weight_decay=WEIGHT_DECAY, foreach=True)
  step = torch_f3eo_step if variant == 'torch_f3eo' else torch_adamw_step
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
  cmd = [sys.executable, __file__, '--torch-memory-child', f'{name}:{variant}:{batch}']
  out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
  return float(json.loads(out.strip().splitlines()[-1])['peak_delta_bytes'])


# --------------------------------------------------------------------------- driver


def machine_info() -> dict:
  cpu = platform.processor()
  try:
    for line in Path('/proc/cpuinfo').read_text().splitlines():
      if line.startswith('model name'):
        cpu = line.split(':', 1)[1].strip()
        break
  except OSError:
    pass
  import jax

  gpus = [str(d) for d in jax.devices() if d.platform != 'cpu']
  versions = {}
  for pkg in ('jax', 'jaxlib', 'optax', 'flax', 'torch'):
    try:
      versions[pkg] = metadata.version(pkg)
    except metadata.PackageNotFoundError:
      versions[pkg] = None
  return {
      'cpu': cpu,
      'cores': os.cpu_count(),
      'gpu': gpus or None,
      'jax_backend': jax.default_backend(),
      'python': platform.python_version(),
      'versions': versions,
      'load_average': os.getloadavg(),
      'torch_threads': os.cpu_count(),
      'omp_wait_policy': os.environ.get('OMP_WAIT_POLICY'),
      'date': datetime.datetime.now(datetime.timezone.utc).isoformat(timespec='seconds'),
  }


def bench_model(name: str, quick: bool, variants: list[str] | None = None, rounds: int | None = None) -> dict:
  cfg = CONFIGS[name]
  variants = list(variants or cfg.get('variants', JAX_VARIANTS + TORCH_VARIANTS))
  batch = cfg['quick_batch'] if quick else cfg['batch']
  rounds = rounds or (1 if quick else cfg['rounds'])
  print(f'\n== {name}: batch {batch}, {rounds} rounds of {HVP_EVERY} steps per variant', flush=True)
  runners = {}
  info = {}
  for v in variants:
    if v.startswith('torch'):
      runners[v] = TorchRunner(name, v, batch)
      print(f'  set up {v}', flush=True)
    else:
      r = runners[v] = JaxRunner(name, v, batch)
      info[v] = dict(compile_s=r.compile_s, peak_bytes=r.peak_bytes, temp_bytes=r.temp_bytes, flops=r.flops)
      print(f'  compiled {v} in {r.compile_s:.1f}s; peak {r.peak_bytes / 2**20:.1f} MiB;'
            f' {r.flops / 1e9:.2f} GFLOP', flush=True)
  times = {v: [] for v in variants}
  for i in range(rounds):
    order = variants[i % len(variants):] + variants[: i % len(variants)]
    for v in order:
      times[v].append(runners[v].run(HVP_EVERY) / HVP_EVERY)
    print(f'  round {i + 1}/{rounds}: ' + ', '.join(f'{v} {times[v][-1] * 1e3:.1f}' for v in variants) + ' ms',
          flush=True)
  del runners
  for v in variants:
    entry = info.setdefault(v, {})
    entry['median_ms'] = float(np.median(times[v]) * 1e3)
    entry['times_ms'] = [t * 1e3 for t in times[v]]
    if v.startswith('torch'):
      try:
        entry['peak_bytes'] = torch_peak_bytes(name, v, batch)
      except (subprocess.CalledProcessError, ValueError, KeyError) as e:
        print(f'  torch memory of {v} failed: {e}', flush=True)
  # Ratios from each round's side-by-side pair, then the median: robust to drifting load.
  def ratio(a, b):
    if a in times and b in times:
      return float(np.median(np.array(times[a]) / np.array(times[b])))
    return None

  ratios = {f'{a}/{b}': ratio(a, b) for a in variants for b in ('adamw', 'torch_adamw', 'torch_f3eo') if a != b}
  ratios = {k: v for k, v in ratios.items() if v is not None}
  return dict(batch=batch, rounds=rounds, steps_per_block=HVP_EVERY, quick=quick, variants=info, ratios=ratios,
              machine=machine_info())


def check_targets(name: str, result: dict) -> list[dict]:
  out = []
  ratios, variants = result['ratios'], result['variants']
  for label, a, b, bound in TARGETS:
    value = ratios.get(f'{a}/{b}')
    if value is not None:
      out.append(dict(target=label, bound=bound, value=value, met=value <= bound))
  if 'f3eo' in variants and 'adamw' in variants:
    value = variants['f3eo']['peak_bytes'] / variants['adamw']['peak_bytes']
    out.append(dict(target='F3EO peak memory / AdamW (JAX, XLA)', bound=MEMORY_TARGET, value=value,
                    met=value <= MEMORY_TARGET))
  return out


def write_markdown(results: dict, path: Path) -> None:
  lines = ['# Step time and peak memory: F3EO vs AdamW', '',
           'Written by `python benchmarks/step_time.py` (merged per model). Times are medians over',
           f'interleaved rounds of {HVP_EVERY} steps; ratios are medians of per-round side-by-side ratios.',
           'JAX memory: XLA memory_analysis of the compiled step (args + outputs + temps − donated);',
           'PyTorch memory: peak-RSS increase during 3 steps over the set-up, in a subprocess.',
           'XLA GFLOP: `cost_analysis()` of the compiled step, a noise-free count of the work; it counts',
           'both branches of `lax.cond`, so for `hvp_every=10` it is not the per-step average.', '']
  for name, res in results.items():
    m = res['machine']
    lines += [f'## {name} (batch {res["batch"]}, {res["rounds"]} rounds{", QUICK" if res["quick"] else ""})', '',
              f'Machine: {m["cpu"]}, {m["cores"]} cores, GPU: {m["gpu"] or "none"}, backend {m["jax_backend"]};'
              f' load average at the end {", ".join(f"{x:.1f}" for x in m["load_average"])}; {m["date"]};'
              f' ' + ', '.join(f'{k} {v}' for k, v in m['versions'].items()), '',
              '| variant | step ms (median) | time / AdamW | XLA GFLOP | GFLOP / AdamW | peak MiB |'
              ' memory / AdamW | compile s |',
              '|---|---:|---:|---:|---:|---:|---:|---:|']
    for v, e in res['variants'].items():
      base = 'torch_adamw' if v.startswith('torch') else 'adamw'
      ratio = res['ratios'].get(f'{v}/{base}', 1.0 if v == base else float('nan'))
      flops = e.get('flops')
      base_entry = res['variants'].get(base, {})
      flop_ratio = '' if flops is None or 'flops' not in base_entry else f'{flops / base_entry["flops"]:.2f}×'
      mem = e.get('peak_bytes', float('nan'))
      mem_ratio = mem / base_entry.get('peak_bytes', float('nan'))
      compile_s = f'{e["compile_s"]:.1f}' if 'compile_s' in e else ''
      lines.append(
          f'| {v} | {e["median_ms"]:.2f} | {ratio:.2f}× | {"" if flops is None else f"{flops / 1e9:.3f}"} |'
          f' {flop_ratio} | {mem / 2**20:.1f} | {mem_ratio:.2f}× | {compile_s} |'
      )
    lines.append('')
    for v in ('f3eo_reference', 'f3eo_reference_linearize', 'adamw'):
      ref = res['ratios'].get(f'{v}/{"torch_adamw" if v == "adamw" else "torch_f3eo"}')
      if ref is not None:
        other = 'PyTorch AdamW' if v == 'adamw' else 'PyTorch double-backward F3EO'
        lines.append(f'- JAX `{v}` / {other}: {ref:.2f}×')
    if name in ('mlp', 'cnn'):
      lines += ['', '| target | bound | measured | met |', '|---|---:|---:|---|']
      for t in res.get('targets', []):
        lines.append(f'| {t["target"]} | ≤ {t["bound"]} | {t["value"]:.2f} | {"met" if t["met"] else "UNMET"} |')
    lines.append('')
  path.write_text('\n'.join(lines))


def main(argv=None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
  parser.add_argument('--models', default='mlp,cnn,gpt,resnet18', help='comma-separated subset of ' + ','.join(CONFIGS))
  parser.add_argument('--variants', default=None,
                      help='comma-separated subset of the variants (default: all; ResNet-18: a subset)')
  parser.add_argument('--quick', action='store_true', help='smoke run: tiny batches, one round')
  parser.add_argument('--rounds', type=int, default=None, help='timed rounds per model (default: per model)')
  parser.add_argument('--no-write', action='store_true', help='print only; do not touch benchmarks/results')
  parser.add_argument('--torch-memory-child', default=None, help=argparse.SUPPRESS)
  args = parser.parse_args(argv)
  if args.torch_memory_child:
    name, variant, batch = args.torch_memory_child.split(':')
    torch_memory_child(name, variant, int(batch))
    return
  variants = None
  if args.variants:
    variants = [v for v in args.variants.split(',') if v]
    unknown = set(variants) - set(JAX_VARIANTS + TORCH_VARIANTS)
    if unknown:
      parser.error(f'unknown variants {sorted(unknown)}')
  names = [n for n in args.models.split(',') if n]
  unknown = set(names) - set(CONFIGS)
  if unknown:
    parser.error(f'unknown models {sorted(unknown)}; choose from {sorted(CONFIGS)}')

  json_path, md_path = RESULTS / 'step_time.json', RESULTS / 'step_time.md'
  results = json.loads(json_path.read_text()) if json_path.exists() and not args.no_write else {}
  for name in names:
    res = bench_model(name, args.quick, variants, args.rounds)
    res['targets'] = check_targets(name, res)
    print(f'-- {name}: ' + ', '.join(f'{k} {v:.2f}' for k, v in res['ratios'].items()))
    if name in ('mlp', 'cnn'):
      for t in res['targets']:
        print(f'   target {t["target"]} ≤ {t["bound"]}: {t["value"]:.2f} {"met" if t["met"] else "UNMET"}')
    results[name] = res
    if not args.no_write:
      RESULTS.mkdir(parents=True, exist_ok=True)
      ordered = {n: results[n] for n in CONFIGS if n in results}
      json_path.write_text(json.dumps(ordered, indent=1))
      write_markdown(ordered, md_path)
  print(f'\nwrote {md_path}' if not args.no_write else '')


if __name__ == '__main__':
  main()
