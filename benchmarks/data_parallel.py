"""Data-parallel F3EO on 8 simulated CPU devices: same numbers, step time, traffic.

Three ways to spread one global batch over a ``'data'`` mesh axis, all with JAX's own
SPMD machinery (no communication code of our own):

- ``jit``: ``jax.jit`` with the batch placed by ``NamedSharding(mesh, P('data'))`` and
  the params replicated; XLA's partitioner (GSPMD) inserts every collective.
- ``shard_map (vma)``: ``jax.shard_map`` with ``check_vma=True`` (the default): the
  local loss is divided by the device count, the gradient of the replicated params
  comes back summed over devices, and so does ``H·g``; no ``axis_name``.
- ``shard_map (local)``: ``check_vma=False`` (what ``jax.pmap`` does): local gradients,
  ``lax.pmean`` of ``g`` by hand and ``f3eo(..., axis_name='data')`` for ``H·g``.

The script (1) trains an MLP on MNIST-1D with F3EO on one device and with each layout
on 8 devices, from the same initialisation and batches, and reports how far the
parameters end up from the single-device run; (2) times the step of each layout,
AdamW and F3EO, against one device on the same global batch; (3) counts the
collectives in each compiled step (XLA's SPMD-partitioned HLO) and their sizes.

The 8 devices are simulated (``--xla_force_host_platform_device_count=8``) and share
the host's CPU cores, so the step times measure the cost of partitioning and
collectives on one host, not a speed-up. It sets ``XLA_FLAGS`` itself, before JAX
starts.

Usage::

  python benchmarks/data_parallel.py           # a few minutes on 2 cores
  python benchmarks/data_parallel.py --quick   # smoke run

Writes benchmarks/results/data_parallel.md (and .json).
"""

from __future__ import annotations

import importlib.metadata
import os
import sys

NUM_DEVICES = 8


def _xla_flags() -> str:
  flags = [f'--xla_force_host_platform_device_count={NUM_DEVICES}']
  jaxlib = tuple(int(v) for v in importlib.metadata.version('jaxlib').split('.')[:2])
  if jaxlib >= (0, 9):  # a busy host can starve a device thread past the 40 s rendezvous default
    flags += ['--xla_cpu_collective_call_terminate_timeout_seconds=600',
              '--xla_cpu_collective_timeout_seconds=600']
  return ' '.join([os.environ.get('XLA_FLAGS', ''), *flags]).strip()


os.environ['XLA_FLAGS'] = _xla_flags()
os.environ.setdefault('JAX_PLATFORMS', 'cpu')

if __package__ in (None, ''):  # run as a script: make the `benchmarks` package importable
  sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import argparse  # noqa: E402
import datetime  # noqa: E402
import functools  # noqa: E402
import json  # noqa: E402
import platform  # noqa: E402
import re  # noqa: E402
import time  # noqa: E402
from collections.abc import Callable  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402
from jax.sharding import AxisType, NamedSharding  # noqa: E402
from jax.sharding import PartitionSpec as P  # noqa: E402

import f3eo_jax  # noqa: E402
from benchmarks import data as data_lib  # noqa: E402
from benchmarks import models  # noqa: E402

AXIS = 'data'
RESULTS_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), 'results')


# ---------------------------------------------------------------- steps


def make_step(
    model, tx, *, num_devices: int = 1, average_grads: bool = False, meta: bool = True
) -> Callable:
  """A training step ``(params, opt_state, x, y) -> (params, opt_state, loss)``.

  Args:
    model: a Flax module.
    tx: the optimizer.
    num_devices: the local loss is divided by it (shard_map with check_vma=True).
    average_grads: ``lax.pmean`` the gradients and the loss (check_vma=False).
    meta: whether ``tx`` is F3EO and needs ``obj_fn``.
  """

  def step(params, opt_state, x, y):
    obj_fn = lambda p: models.cross_entropy(model.apply({'params': p}, x), y) / num_devices
    loss, grads = jax.value_and_grad(obj_fn)(params)
    if average_grads:
      loss, grads = jax.lax.pmean((loss, grads), AXIS)
    elif num_devices > 1:
      loss = jax.lax.psum(loss, AXIS)  # the local share of the mean loss, summed
    extra = {'obj_fn': obj_fn} if meta else {}
    updates, opt_state = tx.update(grads, opt_state, params, **extra)
    return optax.apply_updates(params, updates), opt_state, loss

  return step


def layouts(model, mesh, lr: float) -> dict[str, dict]:
  """Every (layout, optimizer) variant: its jitted step and how to place its inputs."""
  replicated, split = NamedSharding(mesh, P()), NamedSharding(mesh, P(AXIS))
  on_mesh = lambda step, check_vma: jax.jit(
      jax.shard_map(
          step, mesh=mesh, in_specs=(P(), P(), P(AXIS), P(AXIS)), out_specs=(P(), P(), P()),
          check_vma=check_vma,
      )
  )
  single = lambda tree: jax.device_put(tree, jax.devices()[0])
  on_mesh_as = lambda sharding, tree: jax.device_put(tree, sharding)
  f3eo = f3eo_jax.f3eo(lr)
  f3eo_local = f3eo_jax.f3eo(lr, axis_name=AXIS)
  f3eo_every = f3eo_jax.f3eo(lr, hvp_every=10)
  reference = f3eo_jax.f3eo_reference(lr)
  reference_local = f3eo_jax.f3eo_reference(lr, axis_name=AXIS)
  adamw = optax.adamw(lr)
  n = mesh.size
  variants = {
      ('1 device', 'f3eo_reference'): (jax.jit(make_step(model, reference)), reference, True),
      ('jit', 'f3eo_reference'): (jax.jit(make_step(model, reference)), reference, False),
      ('shard_map (vma)', 'f3eo_reference'): (
          on_mesh(make_step(model, reference, num_devices=n), True), reference, False),
      ('shard_map (local)', 'f3eo_reference'): (
          on_mesh(make_step(model, reference_local, average_grads=True), False),
          reference_local, False),
      ('1 device', 'adamw'): (jax.jit(make_step(model, adamw, meta=False)), adamw, True),
      ('1 device', 'f3eo'): (jax.jit(make_step(model, f3eo)), f3eo, True),
      ('jit', 'adamw'): (jax.jit(make_step(model, adamw, meta=False)), adamw, False),
      ('jit', 'f3eo'): (jax.jit(make_step(model, f3eo)), f3eo, False),
      ('jit', 'f3eo hvp_every=10'): (jax.jit(make_step(model, f3eo_every)), f3eo_every, False),
      ('shard_map (vma)', 'adamw'): (
          on_mesh(make_step(model, adamw, num_devices=n, meta=False), True), adamw, False),
      ('shard_map (vma)', 'f3eo'): (
          on_mesh(make_step(model, f3eo, num_devices=n), True), f3eo, False),
      ('shard_map (local)', 'adamw'): (
          on_mesh(make_step(model, adamw, average_grads=True, meta=False), False), adamw, False),
      ('shard_map (local)', 'f3eo'): (
          on_mesh(make_step(model, f3eo_local, average_grads=True), False), f3eo_local, False),
  }
  out = {}
  for key, (step, tx, on_one_device) in variants.items():
    out[key] = {
        'step': step,
        'tx': tx,
        # shard_map splits its inputs by in_specs; jit follows the inputs' shardings
        'place_params': single if on_one_device else functools.partial(on_mesh_as, replicated),
        'place_batch': single if on_one_device else functools.partial(on_mesh_as, split),
    }
  return out


# ---------------------------------------------------------------- collectives in the HLO

_COLLECTIVE = re.compile(
    r'=\s*(?P<shape>\([^=]*?\)|[a-z0-9]+\[[0-9,]*\](?:\{[^}]*\})?)\s+'
    r'(?P<op>all-reduce|all-gather|reduce-scatter|all-to-all|collective-permute)(?:-start)?\('
)
_ARRAY = re.compile(r'[a-z]+[0-9]*\[([0-9,]*)\]')
_BRANCHES = re.compile(r'(?:branch_computations=\{(?P<list>[^}]*)\}|'
                       r'(?:true|false)_computation=%?(?P<one>[\w.\-]+))')


def count_collectives(hlo_text: str) -> dict[str, dict[str, int]]:
  """Collectives of a compiled module: ops and result elements, split by where they run.

  ``'always'`` counts ops outside any ``conditional`` branch; ``'in_cond'`` those in a
  branch (with ``hvp_every=k`` they run on one step in ``k``).
  """
  branch_names = set()
  for m in _BRANCHES.finditer(hlo_text):
    names = m.group('list').split(',') if m.group('list') else [m.group('one')]
    branch_names.update(name.strip().lstrip('%') for name in names)
  counts: dict[str, dict[str, int]] = {}
  current = ''
  hlo_text = re.sub(r'/\*.*?\*/', '', hlo_text)  # tuple shapes carry /*index=5*/ comments
  for line in hlo_text.splitlines():
    if line[:1] not in ('', ' ') and line.rstrip().endswith('{'):  # a computation's header
      current = line.removeprefix('ENTRY ').split(' ', 1)[0].lstrip('%')
      continue
    for m in _COLLECTIVE.finditer(line):
      where = 'in_cond' if current in branch_names else 'always'
      elements = sum(
          int(np.prod([int(d) for d in dims.split(',') if d], dtype=np.int64))
          for dims in _ARRAY.findall(m.group('shape'))
      )
      entry = counts.setdefault(f'{m.group("op")} ({where})', {'ops': 0, 'elements': 0})
      entry['ops'] += 1
      entry['elements'] += int(elements)
  return counts


# ---------------------------------------------------------------- the three measurements


def max_abs_diff(a, b) -> float:
  return max(
      float(np.max(np.abs(np.asarray(u) - np.asarray(v))))
      for u, v in zip(jax.tree.leaves(a), jax.tree.leaves(b))
  )


def accuracy(model, params, x, y) -> float:
  logits = jax.jit(lambda p, x: model.apply({'params': p}, x))(params, x)
  return float(jnp.mean(jnp.argmax(logits, -1) == y))


EARLY_STEPS = 4
LAYOUTS = ('1 device', 'jit', 'shard_map (vma)', 'shard_map (local)')


def equivalence_run(model, variants, params, dataset, args) -> list[dict]:
  """Each optimizer from the same init and batches on one device and on 8.

  Reports how far the 8-device params are from the 1-device ones after
  ``EARLY_STEPS`` steps and at the end. AdamW on ``jit`` is the yardstick for float32
  summation-order noise, which Adam's normalisation amplifies over a run.
  """
  rows, reference = [], {}
  runs = [(layout, 'f3eo_reference') for layout in LAYOUTS] + [
      ('1 device', 'f3eo'), ('jit', 'f3eo'), ('1 device', 'adamw'), ('jit', 'adamw')]
  for layout, opt in runs:
    v = variants[(layout, opt)]
    p, state = v['place_params'](params), v['tx'].init(v['place_params'](params))
    batches = data_lib.batches(dataset.x_train, dataset.y_train, args.batch, seed=0)
    losses = []
    for step in range(args.train_steps):
      p, state, loss = v['step'](p, state, *v['place_batch'](next(batches)))
      losses.append(float(loss))  # one step in flight at a time (see timing)
      if step + 1 == EARLY_STEPS:
        early = jax.device_get(p)
    p = jax.device_get(p)
    reference.setdefault(opt, (early, p))
    rows.append({
        'layout': layout,
        'optimizer': opt,
        'final_loss': float(np.mean(losses[-10:])),
        'test_accuracy': accuracy(model, p, dataset.x_test, dataset.y_test),
        'early_param_diff': max_abs_diff(early, reference[opt][0]),
        'max_param_diff': max_abs_diff(p, reference[opt][1]),
        'param_scale': max(float(np.max(np.abs(a))) for a in jax.tree.leaves(p)),
    })
    print(f'  trained {layout} {opt}: {rows[-1]}', flush=True)
  return rows


def timing(variants, params, dataset, args) -> dict[tuple[str, str], dict]:
  """Median seconds per step over interleaved rounds (a busy host slows all alike)."""
  x, y = dataset.x_train[: args.batch], dataset.y_train[: args.batch]
  runs = {}
  for key, v in variants.items():
    if key[1] == 'f3eo_reference':
      continue  # the cost of f3eo's; trained above for its accuracy
    p = v['place_params'](params)
    state = v['tx'].init(p)
    batch = v['place_batch']((x, y))
    start = time.perf_counter()
    compiled = v['step'].lower(p, state, *batch).compile()
    compile_s = time.perf_counter() - start
    runs[key] = {'compiled': compiled, 'args': [p, state, *batch], 'times': [],
                 'compile_s': compile_s,
                 'collectives': count_collectives(compiled.as_text())}
    jax.block_until_ready(compiled(*runs[key]['args']))  # warm-up
  keys = list(runs)
  for r in range(args.rounds):
    for key in keys[r % len(keys):] + keys[: r % len(keys)]:
      run = runs[key]
      start = time.perf_counter()
      for _ in range(args.steps_per_round):
        p, state, loss = run['compiled'](*run['args'])
        run['args'][:2] = [p, state]
        # Waiting for each step keeps one in flight: XLA:CPU's simulated devices can
        # deadlock in a collective when many queued steps compete for the host's threads.
        jax.block_until_ready(loss)
      run['times'].append((time.perf_counter() - start) / args.steps_per_round)
  return {
      key: {'step_ms': 1e3 * float(np.median(run['times'])),
            'min_step_ms': 1e3 * float(np.min(run['times'])), 'compile_s': run['compile_s'],
            'collectives': run['collectives']}
      for key, run in runs.items()
  }


# ---------------------------------------------------------------- report

NOTES = """\
## Reading the numbers

- **Simulated devices.** The 8 devices are XLA host-platform devices
  (`--xla_force_host_platform_device_count=8`) that share this machine's {cores} CPU
  cores. A layout's step time against one device therefore measures the overhead of
  partitioning (collectives through memory, per-device dispatch, smaller kernels), not
  a speed-up: real accelerators run the per-device work in parallel. The host was shared
  with other jobs; rounds are interleaved so that load slows every variant alike.
- **Same numbers.** After {early} steps every layout is within float32 rounding of one
  device. (`f3eo_reference`, the published rule, is the one that trains well here; the
  theory's default `f3eo` learns slowly on this task, see `train_main.md`; the
  parallel semantics are the same for both.) Over the whole run the differences grow, for AdamW as much as for F3EO: the
  summation order differs between layouts, and Adam's `m/√v` turns rounding in
  near-zero gradient coordinates into full-size steps. Loss and accuracy agree. The
  tests (`tests/test_sharding.py`) check 4 steps of `f3eo`, `f3eo_reference` and
  `hvp_every=2` to 1e-5, and `H·g` against a dense Hessian.

## Communication per step

Counted in the compiled, SPMD-partitioned HLO of each step (elements per device;
{num_params:,} parameters):

- AdamW all-reduces the gradient once: one parameter-sized all-reduce.
- F3EO all-reduces the gradient **and** `H·g`. The product is a sum over the examples
  of the batch, so each device holds only its share until it is reduced: one more
  all-reduce per step, in every layout. Under `shard_map` it is exactly one
  parameter-sized all-reduce (2.00× in all), inserted by the transpose of the implicit
  `pvary` (`check_vma=True`) or by the `pmean` of `axis_name=` (local gradients).
- Under `jit` the partitioner inserts it, but it reduces the two terms of the product
  rule (`ẋᵀδ + xᵀδ̇`) of every weight after the first layer separately, before adding
  them, so the `H·g` reduction costs more than one parameter count (see the "in cond"
  column of `hvp_every=10`, where it stands alone). Under `shard_map` the reduction is of
  the finished product. Where bandwidth matters, `shard_map` is the cheaper layout for
  F3EO.
- The transform itself needs no parameter-sized collective: with replicated params none,
  with FSDP-sharded params only scalar all-reduces (the inner products and the
  diagnostics) and no all-gather; tested in `tests/test_sharding.py`.
- `hvp_every=k` puts the product, and its all-reduce, inside the `lax.cond` branch, which
  runs on one step in `k`: the average traffic falls towards AdamW's.

On real GPUs (NVLink, InfiniBand) or TPU pods (ICI), a ring all-reduce of `N` float32
parameters over `d` devices moves about `2·(d−1)/d · 4N` bytes per device, so F3EO moves
about twice what AdamW does per step (under `shard_map`), along with roughly 2 to 3×
the compute. Whether that shows in the step time depends on the ratio of compute to
bandwidth: large per-device batches hide it, many hosts over a slower network with small
per-device batches do not; `hvp_every` then trades a staler `H·g` for less traffic.

## Many hosts

The same code runs on several hosts (a TPU pod slice, or GPU nodes). Each host runs one
copy of the program and calls, before any other JAX call:

```python
import jax
jax.distributed.initialize()  # on TPU and under SLURM/Open MPI it finds its peers itself;
# elsewhere: jax.distributed.initialize(coordinator_address='host0:1234',
#                                       num_processes=4, process_id=RANK)
mesh = jax.make_mesh((jax.device_count(),), ('data',))  # every device of every host
```

`jax.device_count()` is then the global count and `jax.local_devices()` this host's
share. Each host loads only its part of the global batch and assembles the global
array with `jax.make_array_from_process_local_data(NamedSharding(mesh, P('data')),
local_batch)`; the params start identical on every host (same seed) and are placed with
`jax.device_put(params, NamedSharding(mesh, P()))`. The training step, the optimizer
and `axis_name` do not change. Checkpoints go through Orbax, which writes each host's
shards. Not run here (one host only).
"""


def write_report(results: dict, path_md: str) -> None:
  env = results['environment']
  num_params = results['num_params']
  lines = [
      '# F3EO across devices: data parallelism on 8 simulated CPU devices',
      '',
      f"Generated by `python benchmarks/data_parallel.py{results['argv']}` on"
      f" {env['date']}: {env['platform']}, {env['cores']} CPU cores, JAX"
      f" {env['jax']}, load average {env['loadavg']} at the start.",
      '',
      f"Model: MLP {results['hidden']} on MNIST-1D ({num_params:,} parameters), global"
      f" batch {results['batch']} ({results['batch'] // NUM_DEVICES} per device),"
      f" learning rate {results['lr']}.",
      '',
      '## Same result on one device and on eight',
      '',
      f"{results['train_steps']} steps from the same initialisation and batches; max abs"
      ' difference of the params from the same optimizer on one device.',
      '',
      f"| layout | optimizer | final train loss | test accuracy | Δθ after {EARLY_STEPS} steps |"
      f" Δθ after {results['train_steps']} |",
      '|---|---|---|---|---|---|',
  ]
  for row in results['equivalence']:
    lines.append(
        f"| {row['layout']} | {row['optimizer']} | {row['final_loss']:.4f} |"
        f" {100 * row['test_accuracy']:.1f}% | {row['early_param_diff']:.1e} |"
        f" {row['max_param_diff']:.1e} |"
    )
  lines.append('')
  lines.append(f"(Params up to {max(r['param_scale'] for r in results['equivalence']):.2f}"
               ' in absolute value.)')
  lines += [
      '',
      '## Step time and collectives',
      '',
      f"Median (and minimum) over {results['rounds']} interleaved rounds of"
      f" {results['steps_per_round']} steps; the ratios use medians. All-reduce elements are"
      ' per step and per device, in units of the parameter count.',
      '',
      '| layout | optimizer | step (ms) | vs 1 device, same optimizer | vs AdamW, same layout'
      ' | all-reduces: ops, elements / params | in cond (1 step in k) | all-gathers |',
      '|---|---|---|---|---|---|---|---|',
  ]
  timings = results['timing']
  for (layout, opt), t in timings.items():
    single = timings.get(('1 device', opt))
    adamw = timings.get((layout, 'adamw'))
    vs_single = f"{t['step_ms'] / single['step_ms']:.2f}×" if single else '–'
    vs_adamw = f"{t['step_ms'] / adamw['step_ms']:.2f}×" if adamw else '–'
    c = t['collectives']
    ar = c.get('all-reduce (always)', {'ops': 0, 'elements': 0})
    ar_cond = c.get('all-reduce (in_cond)')
    in_cond = f"{ar_cond['ops']}, {ar_cond['elements'] / num_params:.2f}" if ar_cond else '–'
    gathers = sum(v['ops'] for k, v in c.items() if k.startswith('all-gather'))
    lines.append(
        f"| {layout} | {opt} | {t['step_ms']:.2f} ({t['min_step_ms']:.2f}) | {vs_single} |"
        f" {vs_adamw} | {ar['ops']}, {ar['elements'] / num_params:.2f} | {in_cond} |"
        f' {gathers} |'
    )
  lines += ['', NOTES.format(cores=env['cores'], num_params=num_params, early=EARLY_STEPS)]
  with open(path_md, 'w', encoding='utf-8') as f:
    f.write('\n'.join(lines))


def main(argv=None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--batch', type=int, default=512, help='global batch size')
  parser.add_argument('--hidden', default='256,256', help='MLP widths')
  parser.add_argument('--lr', type=float, default=3e-3)
  parser.add_argument('--train-steps', type=int, default=300)
  parser.add_argument('--rounds', type=int, default=21)
  parser.add_argument('--steps-per-round', type=int, default=10)
  parser.add_argument('--quick', action='store_true', help='smoke run')
  parser.add_argument('--out', default=os.path.join(RESULTS_DIR, 'data_parallel.md'))
  args = parser.parse_args(argv)
  if args.quick:
    args.train_steps, args.rounds, args.steps_per_round = 20, 3, 2
  if jax.device_count() != NUM_DEVICES:
    raise RuntimeError(
        f'expected {NUM_DEVICES} devices, got {jax.devices()}: JAX was initialised before'
        ' this script set XLA_FLAGS.'
    )
  if args.batch % NUM_DEVICES:
    raise ValueError(f'--batch must be divisible by {NUM_DEVICES}, got {args.batch}.')

  dataset = data_lib.load_dataset('mnist1d')
  hidden = tuple(int(w) for w in args.hidden.split(','))
  model = models.MLP(hidden=hidden, num_classes=dataset.num_classes)
  params = model.init(jax.random.key(0), jnp.zeros((1, *dataset.x_train.shape[1:])))['params']
  num_params = sum(int(p.size) for p in jax.tree.leaves(params))
  mesh = jax.make_mesh((NUM_DEVICES,), (AXIS,), axis_types=(AxisType.Auto,))
  variants = layouts(model, mesh, args.lr)

  results = {
      'argv': ''.join(f' {a}' for a in (argv if argv is not None else sys.argv[1:])),
      'environment': {
          'date': datetime.datetime.now(datetime.timezone.utc).strftime('%Y-%m-%d %H:%M UTC'),
          'platform': platform.platform(),
          'cores': os.cpu_count(),
          'jax': jax.__version__,
          'loadavg': ', '.join(f'{v:.1f}' for v in os.getloadavg()),
      },
      'hidden': list(hidden), 'batch': args.batch, 'lr': args.lr, 'num_params': num_params,
      'train_steps': args.train_steps, 'rounds': args.rounds,
      'steps_per_round': args.steps_per_round,
  }
  print('equivalence run', flush=True)
  results['equivalence'] = equivalence_run(model, variants, params, dataset, args)
  print('timing', flush=True)
  results['timing'] = timing(variants, params, dataset, args)
  for key, t in results['timing'].items():
    print(f'  {key}: {t["step_ms"]:.2f} ms  {t["collectives"]}', flush=True)

  os.makedirs(os.path.dirname(args.out), exist_ok=True)
  write_report(results, args.out)
  serialisable = dict(results, timing=[
      {'layout': k[0], 'optimizer': k[1], **v} for k, v in results['timing'].items()
  ])
  with open(os.path.splitext(args.out)[0] + '.json', 'w', encoding='utf-8') as f:
    json.dump(serialisable, f, indent=1)
  print(open(args.out, encoding='utf-8').read())


if __name__ == '__main__':
  main()
