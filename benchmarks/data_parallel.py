"""Data-parallel F3EO on 8 simulated CPU devices: same numbers, step time, traffic.

Three ways to spread one global batch over a ``'data'`` mesh axis, all with JAX's own
SPMD machinery (no communication code of our own):

- ``jit``: ``jax.jit`` with the batch placed by ``NamedSharding(mesh, P('data'))`` and
  the params replicated; XLA's partitioner (GSPMD) inserts every collective.
- ``shard_map (vma)``: ``jax.shard_map`` with ``check_vma=True`` (the default): the
  local loss is divided by the device count, the gradient of the replicated params
  comes back summed over devices, and so does ``H·g``; no ``axis_name``.
- ``shard_map (local)``: ``check_vma=False`` (what ``jax.pmap`` does): local gradients,
  ``lax.pmean`` of ``g`` by hand and ``axis_name='data'`` for ``H·g``.

The script (1) trains an MLP on MNIST-1D with each optimizer on one device and in each
layout on 8 devices, from the same initialisation and batches, and reports how far the
parameters end up from the single-device run; (2) times the step of each layout, AdamW
and F3EO, against one device on the same global batch (interleaved rounds,
:mod:`benchmarks.timing`); (3) counts the collectives in each compiled step (XLA's
SPMD-partitioned HLO, :func:`benchmarks.xla_utils.collectives`) and their sizes. The
optimizers come from :mod:`benchmarks.registry`; the loss, gradient and ``obj_fn`` from
``f3eo_jax.flax.linen_value_grad_and_obj_fn``. The report's prose is generated from the
measured numbers.

The 8 devices are simulated (``--xla_force_host_platform_device_count=8``) and share the
host's CPU cores, so the step times measure the cost of partitioning and collectives on
one host, not a speed-up. Run as a script, it sets ``XLA_FLAGS`` itself, before JAX starts.

Usage::

  python -m benchmarks.data_parallel                    # a few minutes on 2 cores
  python -m benchmarks.data_parallel --quick            # smoke run
  python -m benchmarks.data_parallel --update-results   # write benchmarks/results/, not out/

Writes ``data_parallel.md`` and ``data_parallel.json`` to ``benchmarks/out/`` (ignored by
git), or to ``benchmarks/results/`` with ``--update-results``.
"""

from __future__ import annotations

from benchmarks import xla_utils

NUM_DEVICES = 8
if __name__ == '__main__':  # before JAX starts; importing the module (tests) changes nothing
  xla_utils.use_host_devices(NUM_DEVICES)

import argparse  # noqa: E402
import functools  # noqa: E402
import time  # noqa: E402
from collections.abc import Callable  # noqa: E402
from pathlib import Path  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402
from jax.sharding import AxisType, NamedSharding  # noqa: E402
from jax.sharding import PartitionSpec as P  # noqa: E402

import f3eo_jax.flax  # noqa: E402
from benchmarks import data as data_lib  # noqa: E402
from benchmarks import models, outputs, registry, reporting, timing  # noqa: E402

AXIS = 'data'
LAYOUTS = ('1 device', 'jit', 'shard_map (vma)', 'shard_map (local)')
# The optimizers, by label: (registry name, overrides).
OPTIMIZERS = {
  'adamw': ('adamw', {}),
  'f3eo': ('f3eo', {}),
  'f3eo hvp_every=10': ('f3eo', {'hvp_every': 10}),
  'f3eo_reference': ('f3eo_reference', {}),
}
EQUIVALENCE_RUNS = (
  *((layout, 'f3eo_reference') for layout in LAYOUTS),
  ('1 device', 'f3eo'),
  ('jit', 'f3eo'),
  ('1 device', 'adamw'),
  ('jit', 'adamw'),
)
TIMING_RUNS = (
  *((layout, opt) for layout in LAYOUTS for opt in ('adamw', 'f3eo')),
  ('jit', 'f3eo hvp_every=10'),
)
EARLY_STEPS = 4
EARLY_TOL = 1e-5  # what tests/test_sharding.py allows after 4 steps (float32 summation order)


# ---------------------------------------------------------------- steps


def make_step(
  model, tx, *, num_devices: int = 1, average_grads: bool = False, meta: bool = True
) -> Callable:
  """A training step ``(params, opt_state, x, y) -> (params, opt_state, loss)``.

  Args:
    model: a Flax Linen module.
    tx: the optimizer.
    num_devices: the local loss is divided by it (shard_map with check_vma=True).
    average_grads: ``lax.pmean`` the gradients and the loss (check_vma=False).
    meta: whether ``tx`` is F3EO and needs ``obj_fn``.
  """

  def step(params, opt_state, x, y):
    loss_of = lambda logits: models.cross_entropy(logits, y) / num_devices
    (loss, _), grads, obj_fn = f3eo_jax.flax.linen_value_grad_and_obj_fn(
      model.apply, {'params': params}, loss_of, x
    )
    if average_grads:
      loss, grads = jax.lax.pmean((loss, grads), AXIS)
    elif num_devices > 1:
      loss = jax.lax.psum(loss, AXIS)  # the local share of the mean loss, summed
    extra = {'obj_fn': obj_fn} if meta else {}
    updates, opt_state = tx.update(grads, opt_state, params, **extra)
    return optax.apply_updates(params, updates), opt_state, loss

  return step


@functools.cache
def build(layout: str, optimizer: str, model, mesh, lr: float) -> dict:
  """The step of one (layout, optimizer), its optimizer and input placement.

  Returns:
    ``step`` (jitted), ``tx``, ``place_params``, ``place_batch``, and ``compile(p, state,
    x, y)``, which compiles the step once for the shapes of the global batch and returns
    ``(compiled, seconds)``.
  """
  name, overrides = OPTIMIZERS[optimizer]
  meta = registry.get(name).uses_obj_fn
  local = layout == 'shard_map (local)'
  if local and meta:  # local gradients: H·g must be averaged like g
    overrides = {**overrides, 'axis_name': AXIS}
  tx = registry.make(name, lr, **overrides)
  if layout in ('1 device', 'jit'):
    step = jax.jit(make_step(model, tx, meta=meta))
  else:
    step = jax.jit(
      jax.shard_map(
        make_step(model, tx, num_devices=1 if local else mesh.size, average_grads=local, meta=meta),
        mesh=mesh,
        in_specs=(P(), P(), P(AXIS), P(AXIS)),
        out_specs=(P(), P(), P()),
        check_vma=not local,
      )
    )
  if layout == '1 device':
    place_params = place_batch = lambda tree: jax.device_put(tree, jax.devices()[0])
  else:  # shard_map splits its inputs by in_specs; jit follows the inputs' shardings
    place_params = functools.partial(jax.device_put, device=NamedSharding(mesh, P()))
    place_batch = functools.partial(jax.device_put, device=NamedSharding(mesh, P(AXIS)))
  compiled = {}

  def compile_once(*args):
    if not compiled:
      start = time.perf_counter()
      compiled['step'] = step.lower(*args).compile()
      compiled['seconds'] = time.perf_counter() - start
    return compiled['step'], compiled['seconds']

  return dict(
    step=step, tx=tx, place_params=place_params, place_batch=place_batch, compile=compile_once
  )


# ---------------------------------------------------------------- the three measurements


def max_abs_diff(a, b) -> float:
  return max(
    float(np.max(np.abs(np.asarray(u) - np.asarray(v))))
    for u, v in zip(jax.tree.leaves(a), jax.tree.leaves(b))
  )


def accuracy(model, params, x, y) -> float:
  logits = jax.jit(lambda p, x: model.apply({'params': p}, x))(params, x)
  return float(jnp.mean(jnp.argmax(logits, -1) == y))


def equivalence_run(model, mesh, params, dataset, args) -> list[dict]:
  """Each optimizer from the same init and batches on one device and in each layout.

  Reports how far the params are from the one-device run of the same optimizer after
  ``EARLY_STEPS`` steps and at the end.
  """
  rows, reference = [], {}
  for layout, opt in EQUIVALENCE_RUNS:
    v = build(layout, opt, model, mesh, args.lr)
    p = v['place_params'](params)
    state = v['tx'].init(p)
    batches = data_lib.batches(dataset.x_train, dataset.y_train, args.batch, seed=0)
    losses = []
    for step in range(args.train_steps):
      batch = v['place_batch'](next(batches))
      p, state, loss = v['compile'](p, state, *batch)[0](p, state, *batch)
      losses.append(float(loss))  # one step in flight at a time (see timing)
      if step + 1 == EARLY_STEPS:
        early = jax.device_get(p)
    p = jax.device_get(p)
    reference.setdefault(opt, (early, p))
    rows.append(
      {
        'layout': layout,
        'optimizer': opt,
        'final_loss': float(np.mean(losses[-10:])),
        'test_accuracy': accuracy(model, p, dataset.x_test, dataset.y_test),
        'early_param_diff': max_abs_diff(early, reference[opt][0]),
        'max_param_diff': max_abs_diff(p, reference[opt][1]),
        'param_scale': max(float(np.max(np.abs(a))) for a in jax.tree.leaves(p)),
      }
    )
    print(f'  trained {layout} {opt}: {rows[-1]}', flush=True)
  return rows


def timing_run(model, mesh, params, dataset, args) -> list[dict]:
  """Step time (interleaved rounds) and collectives of every (layout, optimizer)."""
  x, y = dataset.x_train[: args.batch], dataset.y_train[: args.batch]
  runs = {}
  for key in TIMING_RUNS:
    v = build(*key, model, mesh, args.lr)
    p = v['place_params'](params)
    state, batch = v['tx'].init(p), v['place_batch']((x, y))
    compiled, compile_s = v['compile'](p, state, *batch)
    runs[key] = {
      'compiled': compiled,
      'args': [p, state, *batch],
      'compile_s': compile_s,
      'collectives': xla_utils.collectives(compiled.as_text(), by_branch=True),
    }
    jax.block_until_ready(compiled(*runs[key]['args']))  # warm-up

  def block(run) -> float:
    start = time.perf_counter()
    for _ in range(args.steps_per_round):
      p, state, loss = run['compiled'](*run['args'])
      run['args'][:2] = [p, state]
      # Waiting for each step keeps one in flight: XLA:CPU's simulated devices can
      # deadlock in a collective when many queued steps compete for the host's threads.
      jax.block_until_ready(loss)
    return (time.perf_counter() - start) / args.steps_per_round

  times = timing.interleaved({k: functools.partial(block, r) for k, r in runs.items()}, args.rounds)
  out = []
  for (layout, opt), run in runs.items():
    t = times[(layout, opt)]
    single, adamw = times.get(('1 device', opt)), times.get((layout, 'adamw'))
    out.append(
      {
        'layout': layout,
        'optimizer': opt,
        'step_ms': 1e3 * float(np.median(t)),
        'min_step_ms': 1e3 * float(np.min(t)),
        'vs_one_device': timing.paired_ratio(t, single) if single else None,
        'vs_adamw': timing.paired_ratio(t, adamw) if adamw else None,
        'compile_s': run['compile_s'],
        'collectives': run['collectives'],
      }
    )
  return out


# ---------------------------------------------------------------- report


def _elements(row: dict, where: str) -> int:
  return row['collectives'].get(f'all-reduce ({where})', {}).get('elements', 0)


def _ops(row: dict, where: str) -> int:
  return row['collectives'].get(f'all-reduce ({where})', {}).get('count', 0)


def _count(n: int, noun: str) -> str:
  return f'{n} {noun}' + ('' if n == 1 else 's')


def _gathers(row: dict) -> int:
  return sum(v['count'] for k, v in row['collectives'].items() if k.startswith('all-gather'))


def equivalence_prose(results: dict) -> list[str]:
  """Sentences on the parameter agreement, each stating the measured values."""
  rows, steps = results['equivalence'], results['train_steps']
  multi = [r for r in rows if r['layout'] != '1 device']
  lines = []
  worst = max(multi, key=lambda r: r['early_param_diff'])
  within = worst['early_param_diff'] <= EARLY_TOL
  lines.append(
    f'- After {EARLY_STEPS} steps the largest parameter difference from one device is'
    f' {worst["early_param_diff"]:.1e} ({worst["layout"]}, {worst["optimizer"]}): '
    + (
      f'every layout is within the {EARLY_TOL:.0e} that `tests/test_sharding.py` allows'
      ' (float32 sums in another order).'
      if within
      else f'**above** the {EARLY_TOL:.0e} that `tests/test_sharding.py` allows; the layouts'
      ' do not compute the same step here.'
    )
  )
  by_opt = {}
  for r in multi:
    by_opt.setdefault(r['optimizer'], []).append(r)
  final = {opt: max(r['max_param_diff'] for r in rs) for opt, rs in by_opt.items()}
  scale = max(r['param_scale'] for r in rows)
  text = ', '.join(f'{final[o]:.1e} for {o}' for o in final)
  sentence = f'- After {steps} steps the largest differences are {text} (params up to {scale:.2f}).'
  if 'adamw' in final and len(final) > 1:
    f3eo_worst = max(v for o, v in final.items() if o != 'adamw')
    factor = f3eo_worst / final['adamw'] if final['adamw'] > 0 else float('inf')
    sentence += (
      f' AdamW, which has no meta term, drifts by {final["adamw"]:.1e} (float32 summation'
      ' order only); the largest F3EO drift is'
      + (
        f' {factor:.1f}× that, of the same order.'
        if factor <= 10
        else f' {factor:.0f}× that: more than summation-order noise explains.'
      )
    )
  lines.append(sentence)
  ones = {r['optimizer']: r for r in rows if r['layout'] == '1 device'}
  d_loss = max(
    abs(r['final_loss'] - ones[r['optimizer']]['final_loss'])
    / max(ones[r['optimizer']]['final_loss'], 1e-12)
    for r in multi
  )
  d_acc = max(abs(r['test_accuracy'] - ones[r['optimizer']]['test_accuracy']) for r in multi)
  agree = d_acc <= 0.01 and d_loss <= 0.1
  lines.append(
    f'- Against the one-device run of the same optimizer, the final training loss (mean of the'
    f' last 10 steps) differs by at most {100 * d_loss:.1f}% and the test accuracy by at most'
    f' {100 * d_acc:.1f} percentage points: '
    + (
      'they agree within 10% and 1 point.'
      if agree
      else 'beyond 10% or 1 point, so the runs do **not** agree at the end.'
    )
  )
  return lines


def traffic_prose(results: dict) -> list[str]:
  """Sentences on step time and communication, each stating the measured values."""
  n, cores = results['num_params'], results['machine']['cores_available']
  rows = {(r['layout'], r['optimizer']): r for r in results['timing']}
  lines = []
  multi = [r for r in results['timing'] if r['layout'] != '1 device' and r['vs_one_device']]
  if multi:
    lo, hi = min(r['vs_one_device'] for r in multi), max(r['vs_one_device'] for r in multi)
    lines.append(
      f'- The 8 simulated devices share {cores} CPU cores, so a layout against one device'
      f' measures the cost of partitioning (collectives through memory, per-device dispatch,'
      f' smaller kernels), not a speed-up: here {lo:.2f}× to {hi:.2f}× the one-device step.'
    )
  ratios = [
    (layout, rows[(layout, 'f3eo')]['vs_adamw'])
    for layout in LAYOUTS
    if (layout, 'f3eo') in rows and rows[(layout, 'f3eo')]['vs_adamw']
  ]
  if ratios:
    lines.append(
      '- F3EO step / AdamW step in the same layout: '
      + ', '.join(f'{r:.2f}× ({layout})' for layout, r in ratios)
      + '.'
    )
  for layout in LAYOUTS[1:]:
    a, f = rows.get((layout, 'adamw')), rows.get((layout, 'f3eo'))
    if not (a and f):
      continue
    ea, ef = _elements(a, 'always') / n, _elements(f, 'always') / n
    extra = ef - ea
    # within two elements: the scalar loss may be reduced in the same op
    what = (
      'exactly one more parameter-sized all-reduce'
      if abs(extra - 1) * n <= 2
      else f'{extra:.2f} parameter counts more'
    )
    lines.append(
      f'- {layout}: AdamW all-reduces {ea:.2f}× the parameter count per step'
      f' ({_count(_ops(a, "always"), "op")}), F3EO {ef:.2f}×'
      f' ({_count(_ops(f, "always"), "op")}): {what}'
      f'{f", {ef / ea:.2f}× AdamW" if ea else ""}.'
    )
  every = rows.get(('jit', 'f3eo hvp_every=10'))
  if every:
    lines.append(
      f'- jit, `hvp_every=10`: {_elements(every, "always") / n:.2f}× the parameter count is'
      f' all-reduced on every step and {_elements(every, "in_cond") / n:.2f}× inside the'
      ' `lax.cond` branch, which runs on one step in 10.'
    )
  gathers = {f'{r["layout"]}, {r["optimizer"]}': _gathers(r) for r in results['timing']}
  if not any(gathers.values()):
    lines.append('- No compiled step has an all-gather (the params are replicated).')
  else:
    lines.append('- All-gathers: ' + ', '.join(f'{k}: {v}' for k, v in gathers.items() if v) + '.')
  vma = rows.get(('shard_map (vma)', 'f3eo')), rows.get(('shard_map (vma)', 'adamw'))
  if all(vma) and _elements(vma[1], 'always'):
    factor = _elements(vma[0], 'always') / _elements(vma[1], 'always')
    lines += [
      '',
      'On real accelerators a ring all-reduce of `N` float32 parameters over `d` devices'
      ' moves about `2·(d−1)/d · 4N` bytes per device, so with the volumes counted above'
      f' F3EO moves {factor:.2f}× the bytes AdamW moves per step under `shard_map`.'
      ' Whether that shows in the step time depends on the ratio of compute to bandwidth;'
      ' `hvp_every=k` moves the product and its all-reduce into the branch that runs on one'
      ' step in `k`. Not measured here (one host, simulated devices).',
    ]
  return lines


MULTI_HOST = """\
## Many hosts (documentation; not run here: one host only)

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
and `axis_name` are those of the layouts above. Checkpoints go through Orbax, which
writes each host's shards.
"""


def write_report(results: dict, out_dir: Path) -> Path:
  n = results['num_params']
  lines = [
    '# F3EO across devices: data parallelism on 8 simulated CPU devices',
    '',
    reporting.machine_paragraph(results['machine']),
    '',
    f'Model: MLP {results["hidden"]} on MNIST-1D ({n:,} parameters), global batch'
    f' {results["batch"]} ({results["batch"] // NUM_DEVICES} per device), learning rate'
    f' {results["lr"]}, weight decay {registry.DEFAULT_WEIGHT_DECAY:g}; optimizers from'
    ' `benchmarks/registry.py`.',
    '',
    '## Same result on one device and on eight',
    '',
    f'{results["train_steps"]} steps from the same initialisation and batches; max abs'
    ' difference of the params from the same optimizer on one device.',
    '',
    reporting.markdown_table(
      [
        'layout',
        'optimizer',
        'final train loss',
        'test accuracy',
        f'Δθ after {EARLY_STEPS} steps',
        f'Δθ after {results["train_steps"]}',
      ],
      [
        [
          r['layout'],
          r['optimizer'],
          f'{r["final_loss"]:.4f}',
          f'{100 * r["test_accuracy"]:.1f}%',
          f'{r["early_param_diff"]:.1e}',
          f'{r["max_param_diff"]:.1e}',
        ]
        for r in results['equivalence']
      ],
      'llrrrr',
    ),
    '',
    *equivalence_prose(results),
    '',
    '## Step time and collectives',
    '',
    f'Median (and minimum) over {results["rounds"]} interleaved rounds of'
    f' {results["steps_per_round"]} steps; ratios are medians of per-round side-by-side ratios.'
    ' All-reduce elements are per step and per device, in units of the parameter count.',
    '',
  ]
  table = []
  for r in results['timing']:
    cond = f'{_ops(r, "in_cond")}, {_elements(r, "in_cond") / n:.2f}' if _ops(r, 'in_cond') else '–'
    table.append(
      [
        r['layout'],
        r['optimizer'],
        f'{r["step_ms"]:.2f} ({r["min_step_ms"]:.2f})',
        f'{r["vs_one_device"]:.2f}×' if r['vs_one_device'] else '–',
        f'{r["vs_adamw"]:.2f}×' if r['vs_adamw'] else '–',
        f'{_ops(r, "always")}, {_elements(r, "always") / n:.2f}',
        cond,
        _gathers(r),
      ]
    )
  lines += [
    reporting.markdown_table(
      [
        'layout',
        'optimizer',
        'step (ms)',
        'vs 1 device, same optimizer',
        'vs AdamW, same layout',
        'all-reduces: ops, elements / params',
        'in cond (1 step in k)',
        'all-gathers',
      ],
      table,
      'llrrrrrr',
    ),
    '',
    *traffic_prose(results),
    '',
    MULTI_HOST,
  ]
  md = out_dir / 'data_parallel.md'
  reporting.write_text(str(md), '\n'.join(lines))
  return md


def main(argv=None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--batch', type=int, default=512, help='global batch size')
  parser.add_argument('--hidden', default='256,256', help='MLP widths')
  parser.add_argument('--lr', type=float, default=3e-3)
  parser.add_argument('--train-steps', type=int, default=300)
  parser.add_argument('--rounds', type=int, default=21)
  parser.add_argument('--steps-per-round', type=int, default=10)
  parser.add_argument('--quick', action='store_true', help='smoke run: 10 steps, 2 rounds of 2')
  outputs.add_arguments(parser)
  args = parser.parse_args(argv)
  if args.quick:
    args.train_steps, args.rounds, args.steps_per_round = 10, 2, 2
  if jax.device_count() != NUM_DEVICES:
    raise RuntimeError(
      f'expected {NUM_DEVICES} devices, got {jax.devices()}: JAX was initialised'
      ' before this script set XLA_FLAGS.'
    )
  if args.batch % NUM_DEVICES:
    raise ValueError(f'--batch must be divisible by {NUM_DEVICES}, got {args.batch}.')
  if args.train_steps < EARLY_STEPS:
    raise ValueError(f'--train-steps must be at least {EARLY_STEPS}.')
  out_dir = outputs.directory(args)

  start = time.perf_counter()
  machine = reporting.machine_info()
  dataset = data_lib.load_dataset('mnist1d')
  hidden = tuple(int(w) for w in args.hidden.split(','))
  model = models.MLP(hidden=hidden, num_classes=dataset.num_classes)
  params = model.init(jax.random.key(0), jnp.zeros((1, *dataset.x_train.shape[1:])))['params']
  mesh = jax.make_mesh((NUM_DEVICES,), (AXIS,), axis_types=(AxisType.Auto,))
  results = {
    'machine': machine,
    'hidden': list(hidden),
    'batch': args.batch,
    'lr': args.lr,
    'num_params': sum(int(p.size) for p in jax.tree.leaves(params)),
    'train_steps': args.train_steps,
    'rounds': args.rounds,
    'steps_per_round': args.steps_per_round,
    'quick': args.quick,
  }
  print('equivalence run', flush=True)
  results['equivalence'] = equivalence_run(model, mesh, params, dataset, args)
  print('timing', flush=True)
  results['timing'] = timing_run(model, mesh, params, dataset, args)
  for r in results['timing']:
    print(
      f'  {r["layout"]}, {r["optimizer"]}: {r["step_ms"]:.2f} ms  {r["collectives"]}', flush=True
    )
  machine.update(
    load_average_end=reporting.load_average(), total_wall_time_s=time.perf_counter() - start
  )
  md = write_report(results, out_dir)
  reporting.write_json(str(out_dir / 'data_parallel.json'), results)
  print(md.read_text())
  print(f'wrote {md} and {md.with_suffix(".json")}')


if __name__ == '__main__':
  main()
