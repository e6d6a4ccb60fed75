"""Data-parallel F3EO on 8 simulated CPU devices: the same numbers, step time, collectives.

Layouts over a ``'data'`` mesh axis: ``jit`` (GSPMD); ``shard_map (vma)`` (local loss / device
count; gradients and ``H·g`` come back summed); ``shard_map (local)`` (``lax.pmean`` of g,
``axis_name='data'`` for ``H·g``). An MLP on MNIST-1D is trained in each from one init and
batch order (parameter gaps to one device); each step is timed and its collectives counted.

Usage::

  python -m benchmarks.data_parallel            # a few minutes on 2 cores
  python -m benchmarks.data_parallel --quick    # smoke run
"""

from __future__ import annotations

from benchmarks import xla_utils

NUM_DEVICES = 8
if __name__ == '__main__':  # before JAX starts; importing the module (tests) changes nothing
  xla_utils.use_host_devices(NUM_DEVICES)

import argparse  # noqa: E402
import functools  # noqa: E402
import time  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
from jax.sharding import NamedSharding  # noqa: E402
from jax.sharding import PartitionSpec as P  # noqa: E402

from benchmarks import config, data, models, report, steps, tasks  # noqa: E402

AXIS = 'data'
LAYOUTS = ('1 device', 'jit', 'shard_map (vma)', 'shard_map (local)')
PAIRS = [(layout, name) for layout in LAYOUTS[:2] for name in ('f3eo', 'adamw')]
EQUIVALENCE = (*((layout, 'f3eo_reference') for layout in LAYOUTS), *PAIRS)
TIMED = (*((layout, o) for layout in LAYOUTS for o in ('adamw', 'f3eo')), ('jit', 'f3eo_hvp10'))
EARLY_STEPS = 4
COLUMNS = ('final train loss', 'test accuracy', f'Δθ after {EARLY_STEPS} steps', 'Δθ at the end')


def build(layout, name, model, mesh, state, batch, hp):
  """The compiled step ``(state, x, y, hp) -> (state, loss)``, the placed inputs, and a
  function that places a batch."""
  variant, local = config.get(name), layout == 'shard_map (local)'
  if local and variant.uses_obj_fn:  # local gradients: H·g is averaged like g
    variant = variant.with_options(axis_name=AXIS)
  scale = NUM_DEVICES if layout == 'shard_map (vma)' else 1
  loss = lambda out, y: tasks.xent(out, y) / scale
  axis = AXIS if local else None
  step = functools.partial(steps.train_step, model=model, loss=loss, variant=variant, axis=axis)

  def fn(state, x, y, hp):
    state, metrics = step(state, x, y, hp)
    return state, jax.lax.psum(metrics['loss'], AXIS) if scale > 1 else metrics['loss']

  if layout.startswith('shard_map'):
    specs = dict(in_specs=(P(), P(AXIS), P(AXIS), P()), out_specs=(P(), P()), check_vma=not local)
    fn = jax.shard_map(fn, mesh=mesh, **specs)
  if layout == '1 device':
    place = lambda tree, _: jax.device_put(tree, jax.devices()[0])
  else:
    place = lambda tree, spec: jax.device_put(tree, NamedSharding(mesh, spec))
  place_batch = lambda batch: tuple(place(b, P(AXIS)) for b in batch)
  args = (place(state, P()), *place_batch(batch), place(hp, P()))
  return steps.compile_step(fn, args, variant)[0], args, place_batch


def equivalence(model, mesh, init, dataset, hp, args) -> list[dict]:
  """Every (layout, optimizer) from the same init and batches; parameter gaps to one device."""
  rows, reference = [], {}
  gap = lambda a, b: max(
    float(np.max(np.abs(u - v))) for u, v in zip(*map(jax.tree.leaves, (a, b)))
  )
  shapes = (dataset.x_train[: args.batch], dataset.y_train[: args.batch])
  for layout, name in EQUIVALENCE:
    step, (state, *_, hp_placed), place = build(layout, name, model, mesh, init(name), shapes, hp)
    batches, losses, early = data.batches(dataset.x_train, dataset.y_train, args.batch, 0), [], None
    for i in range(args.train_steps):
      state, loss = step(state, *place(next(batches)), hp_placed)
      losses.append(float(loss))  # one step in flight: simulated devices can deadlock otherwise
      early = jax.device_get(state.params) if i + 1 == EARLY_STEPS else early
    params = jax.device_get(state.params)
    ref = reference.setdefault(name, (early, params))
    logits = jax.jit(model.apply)({'params': params}, dataset.x_test)
    accuracy = float(jnp.mean(jnp.argmax(logits, -1) == dataset.y_test))
    values = (float(np.mean(losses[-10:])), accuracy, gap(early, ref[0]), gap(params, ref[1]))
    rows.append(dict(layout=layout, optimizer=name, **dict(zip(COLUMNS, values))))
    print(rows[-1], flush=True)
  return rows


def timing(model, mesh, init, dataset, hp, args, num_params) -> list[dict]:
  """Step time (interleaved rounds, one step in flight) and collectives per step."""
  batch = (dataset.x_train[: args.batch], dataset.y_train[: args.batch])
  blocks, found = {}, {}
  for key in TIMED:
    step, (state, *inputs), _ = build(*key, model, mesh, init(key[1]), batch, hp)
    found[key] = xla_utils.collectives(step.as_text(), by_branch=True)
    holder = [step(state, *inputs)[0]]

    def one_in_flight(state, *inputs, step=step):  # see equivalence()
      state, loss = step(state, *inputs)
      return state, jax.block_until_ready(loss)

    blocks[key] = steps.block_timer(one_in_flight, holder, inputs, args.steps_per_round)
  times = steps.interleaved(blocks, args.rounds)
  rows = []
  for (layout, name), t in times.items():
    row = {'layout': layout, 'optimizer': name, 'ms/step': 1e3 * float(np.median(t))}
    for col, base in (('× 1 device', ('1 device', name)), ('× AdamW', (layout, 'adamw'))):
      row[col] = steps.paired_ratio(t, times[base]) if base in times else None
    for op, c in found[(layout, name)].items():
      row[f'{op}: ops'], row[f'{op}: elements / params'] = c['count'], c['elements'] / num_params
    rows.append(row)
  return rows


def main(argv=None) -> pd.DataFrame:
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--batch', type=int, default=512, help='global batch size')
  parser.add_argument('--hidden', type=int, nargs='+', default=[256, 256], help='MLP widths')
  parser.add_argument('--train-steps', type=int, default=300)
  parser.add_argument('--rounds', type=int, default=21)
  parser.add_argument('--steps-per-round', type=int, default=10)
  parser.add_argument('--quick', action='store_true', help='smoke run: 10 steps, 2 rounds of 2')
  report.add_output_arguments(parser)
  args = parser.parse_args(argv)
  if args.quick:
    args.train_steps, args.rounds, args.steps_per_round = 10, 2, 2
  if jax.device_count() != NUM_DEVICES:
    raise RuntimeError(f'expected {NUM_DEVICES} devices, got {jax.devices()}: run it as a module.')
  start, info = time.perf_counter(), report.machine_info()
  dataset = data.load_mnist1d()
  model = models.MLP(hidden=tuple(args.hidden), num_classes=10)
  mesh = jax.make_mesh((NUM_DEVICES,), (AXIS,), axis_types=(jax.sharding.AxisType.Auto,))
  x0 = dataset.x_train[:1]
  init = lambda name: steps.create_train_state(model, steps.make_tx(config.get(name), hp), x0, 0)
  hp = steps.hyperparams(config.get('adamw'), 3e-3, None, args.train_steps)
  num_params = sum(p.size for p in jax.tree.leaves(init('adamw').params))
  same = pd.DataFrame(equivalence(model, mesh, init, dataset, hp, args))
  timed = pd.DataFrame(timing(model, mesh, init, dataset, hp, args, num_params))
  info.update(wall_time_s=round(time.perf_counter() - start))
  md = report.header('Data parallelism on 8 simulated CPU devices', info)
  md += [f'MLP {args.hidden}, {num_params} parameters, global batch {args.batch}.', '']
  md += report.section('Same result on one device and on eight', same, '.3g')
  md += report.section('Step time and collectives', timed, '.3g')
  folder = report.out_dir(args)
  report.write(folder / 'data_parallel.md', '\n'.join(md) + '\n')
  tables = dict(equivalence=same.to_dict('records'), timing=timed.to_dict('records'))
  report.write(folder / 'data_parallel.json', payload=dict(machine=info, args=vars(args), **tables))
  print('\n'.join(md))
  return same


if __name__ == '__main__':
  main()
