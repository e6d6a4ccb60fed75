"""The main job: F3EO against AdamW on MNIST-1D, an MLP and a CNN.

``f3eo``, ``f3eo_hvp10_python`` (``jit_amortized``), ``f3eo_reference``, the uncapped theory
rule and AdamW: 1000 steps of batch 128, lr 3e-3 cosine-decayed; then each re-run for the
steps that fit in ``f3eo``'s time (equal wall-clock).

Usage::

  python -m benchmarks.train                 # the main job (about 2 minutes on 2 CPU cores)
  python -m benchmarks.train --preset full   # + AdamW-wd and SGD; sweeps; 3 seeds
  python -m benchmarks.train --tasks mnist1d_cnn --optimizers f3eo adamw sgd --steps 500
  python -m benchmarks.train --dataset mnist --data-dir ~/tensorflow_datasets  # prepared TFDS
"""

from __future__ import annotations

import argparse
import dataclasses
import time

import pandas as pd

from benchmarks import config, data, harness, report, tasks

MAIN = ('f3eo', 'f3eo_hvp10_python', 'f3eo_reference', 'f3eo_theory_uncapped_global', 'adamw')
MNIST1D = ('mnist1d_mlp', 'mnist1d_cnn')
X_AXES = ('eval_steps', 'wall_time')
PRESETS = {
  'main': dict(tasks=MNIST1D, optimizers=MAIN, seeds=1, sweep=False),
  'full': dict(tasks=MNIST1D, optimizers=(*MAIN, 'adamw_wd', 'sgd'), seeds=3, sweep=True),
  'smoke': dict(tasks=MNIST1D, optimizers=('f3eo', 'f3eo_hvp10_python', 'adamw'), seeds=1),
}
PRESETS['smoke'].update(sweep=False, steps=20, eval_every=10, train_subset=256)
PRESETS['smoke']['sizes'] = tasks.SMOKE_SIZES


def parse_args(argv=None) -> argparse.Namespace:
  parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
  parser.add_argument('--preset', default='main', choices=sorted(PRESETS))
  tasks.add_arguments(parser)
  parser.add_argument('--optimizers', nargs='+', choices=sorted(config.VARIANTS), metavar='NAME')
  parser.add_argument('--seeds', type=int, help='number of seeds (0, 1, ...)')
  parser.add_argument('--sweep', action=argparse.BooleanOptionalAction, help='tune the lr')
  parser.add_argument('--learning-rate', type=float, help="one peak lr (default: the variant's)")
  parser.add_argument('--weight-decay', type=float, help=f'default {config.WEIGHT_DECAY:g}')
  parser.add_argument('--eval-every', type=int)
  parser.add_argument('--train-subset', type=int, help='train on the first N examples')
  parser.add_argument('--wall-clock-reference', default='f3eo', help="'none': skip it")
  report.add_output_arguments(parser)
  args = parser.parse_args(argv)
  args.sizes = None
  for key, value in PRESETS[args.preset].items():
    if getattr(args, key, None) is None:
      setattr(args, key, value)
  return args


def run_task(task, args, cache) -> tuple[dict, dict]:
  """The equal-steps results (with sweeps) and the equal-wall-clock runs of one task."""
  configs = {}
  for name in args.optimizers:
    v = config.get(name)
    lr = args.learning_rate or v.default_lr() * task.lr_scale
    wd = args.weight_decay if v.has_weight_decay else None
    configs[name] = harness.RunConfig(v, lr, wd, task.num_steps, None, args.eval_every)
    configs[name] = dataclasses.replace(configs[name], train_subset=args.train_subset)
  data, seeds, ref = task.load(), range(args.seeds), args.wall_clock_reference
  results, tuned = harness.compare(configs, task, data, seeds=seeds, tune=args.sweep, cache=cache)
  if ref not in tuned:
    return results, {}
  return results, harness.equal_wall_clock(tuned, ref, task, data, seeds=seeds, cache=cache)


def main(argv=None, *, cache=None) -> str:
  args = parse_args(argv)
  start, info, folder = time.perf_counter(), report.machine_info(), report.out_dir(args)
  task_map = tasks.build(args.tasks, args, args.sizes)
  cache = cache if cache is not None else harness.StepCache()
  runs, sweeps, walls, same = [], {}, {}, {}
  for task in task_map.values():
    results, walls[task.name] = run_task(task, args, cache)
    sweeps[task.name] = {name: res['sweep'] for name, res in results.items()}
    same[task.name] = {n: [r['final_metric'] for r in res['runs']] for n, res in results.items()}
    runs += [r for res in results.values() for r in res['runs']]
  info.update(wall_time_s=round(time.perf_counter() - start))
  prefix = f'train_{args.preset}'
  plots = [report.plot(runs, task_map, folder / f'{prefix}_{x}.png', x=x) for x in X_AXES]
  for key in ('grad_sq_norm', 'cos_g_hg'):
    plots.append(report.plot(runs, task_map, folder / f'{prefix}_{key}.png', value=key))
  md = report.header(f'F3EO against baselines: preset `{args.preset}`', info)
  md += report.section('Equal steps', report.summary(runs, task_map))
  if any(walls.values()):
    title = f'Equal wall-clock (reference `{args.wall_clock_reference}`)'
    md += report.section(title, report.wall_clock_frame(same, walls, task_map), '.3g')
  if args.sweep:
    rows = [
      dict(task=t, optimizer=o, **r) for t, by in sweeps.items() for o, rs in by.items() for r in rs
    ]
    md += report.section('Sweeps (validation split)', pd.DataFrame(rows))
  text = '\n'.join(md + [f'![]({p.name})' for p in plots]) + '\n'
  report.write(folder / f'{prefix}.md', text)
  payload = dict(machine=info, args={k: v for k, v in vars(args).items() if k != 'sizes'})
  payload.update(sweeps=sweeps, runs=[report.downsample(r) for r in runs])
  shrink = lambda w: {**w, 'runs': [report.downsample(r) for r in w['runs']]}
  payload['wall_clock'] = {t: {n: shrink(w) for n, w in by.items()} for t, by in walls.items()}
  report.write(folder / f'{prefix}.json', payload=payload)
  print(f'\n{text}\nwrote {folder / prefix}.{{md,json}} and {len(plots)} plots')
  return text


if __name__ == '__main__':
  try:
    main()
  except data.DatasetNotPreparedError as e:
    raise SystemExit(f'error: {e}') from None
