"""The main job: F3EO against AdamW on MNIST-1D, an MLP and a CNN.

With no arguments: the library's default ``f3eo``, the published rule ``f3eo_reference``,
the theory's rule without any cap (``f3eo_theory_uncapped_global``, to show why the cap
exists) and ``adamw``; 1000 steps of batch 128, one seed, learning rate 3e-3 with cosine
decay, weight decay 1e-4. It prints a table and writes markdown, JSON and plots to
``benchmarks/out/`` (``--update-results``: the committed ``benchmarks/results/``).
Other presets are data in :data:`PRESETS`; every option below overrides the preset's.

Usage::

  python -m benchmarks.train                 # the main job (a few minutes on 2 CPU cores)
  python -m benchmarks.train --preset full   # + AdamW-wd and SGD; sweeps; 3 seeds
  python -m benchmarks.train --tasks mnist1d_cnn --optimizers f3eo adamw sgd --steps 500
  python -m benchmarks.train --dataset mnist --data-dir ~/tensorflow_datasets  # prepared TFDS
"""

from __future__ import annotations

import argparse
import os
import time
from collections.abc import Sequence

if __package__ in (None, ''):  # `python benchmarks/train.py`: the package is not importable
  raise SystemExit('Run it as a module, from the repository root: python -m benchmarks.train')

from benchmarks import outputs, registry, reporting, tasks, training

MAIN_OPTIMIZERS = ('f3eo', 'f3eo_reference', 'f3eo_theory_uncapped_global', 'adamw')
MNIST1D_TASKS = ('mnist1d_mlp', 'mnist1d_cnn')
PRESETS = {
  'main': dict(tasks=MNIST1D_TASKS, optimizers=MAIN_OPTIMIZERS, seeds=1, sweep=False),
  'full': dict(
    tasks=MNIST1D_TASKS, optimizers=(*MAIN_OPTIMIZERS, 'adamw_wd', 'sgd'), seeds=3, sweep=True
  ),
  'smoke': dict(
    tasks=MNIST1D_TASKS,
    optimizers=('f3eo', 'adamw'),
    seeds=1,
    sweep=False,
    steps=6,
    eval_every=3,
    train_subset=256,
    sizes=tasks.SMOKE_SIZES,
  ),
}


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
  parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
  parser.add_argument('--preset', default='main', choices=sorted(PRESETS))
  tasks.add_arguments(parser)
  parser.add_argument(
    '--optimizers',
    nargs='+',
    default=None,
    choices=sorted(registry.VARIANTS),
    metavar='NAME',
    help='registry names (benchmarks/registry.py)',
  )
  parser.add_argument('--seeds', type=int, default=None, help='number of seeds (0, 1, ...)')
  parser.add_argument(
    '--sweep',
    action=argparse.BooleanOptionalAction,
    default=None,
    help="pick each optimizer's hyperparameters on a validation split",
  )
  parser.add_argument(
    '--learning-rate',
    type=float,
    default=None,
    help="one peak learning rate for every optimizer (default: each variant's)",
  )
  parser.add_argument(
    '--weight-decay',
    type=float,
    default=None,
    help=f'weight decay of the Adam family (default {registry.DEFAULT_WEIGHT_DECAY:g})',
  )
  parser.add_argument('--eval-every', type=int, default=None)
  parser.add_argument(
    '--train-subset', type=int, default=None, help='train on the first N examples'
  )
  parser.add_argument(
    '--tag', default=None, help='output files train_<tag>.* (default: the preset)'
  )
  outputs.add_arguments(parser)
  parser.add_argument('--no-progress', action='store_true', help='no progress bars')
  args = parser.parse_args(argv)
  args.sizes = None
  for key, value in PRESETS[args.preset].items():
    if getattr(args, key, None) is None:
      setattr(args, key, value)
  args.tag = args.tag or args.preset
  return args


def base_config(task: tasks.Task, name: str, args: argparse.Namespace) -> training.Config:
  """The run of optimizer ``name`` on ``task`` before any sweep."""
  variant = registry.get(name)
  wd = args.weight_decay if variant.has_weight_decay else None
  return training.Config(
    task=task.name,
    optimizer=name,
    learning_rate=args.learning_rate or variant.learning_rate * task.lr_scale,
    weight_decay=wd,
    num_steps=task.num_steps,
    eval_every=args.eval_every,
    train_subset=args.train_subset,
  )


def write_report(out_dir, tag, task_map, runs, sweeps, info, args) -> str:
  """``train_<tag>.md``/``.json`` and the plots; returns the markdown."""
  prefix = os.path.join(out_dir, f'train_{tag}')
  plots = [
    reporting.plot_curves(runs, task_map, f'{prefix}_curves.png'),
    reporting.plot_diagnostics(runs, task_map, f'{prefix}_diagnostics.png'),
  ]
  rows = reporting.summarize(runs)
  md = [
    f'# F3EO against baselines: preset `{args.preset}`',
    '',
    reporting.machine_paragraph(info),
    '',
  ]
  md += [f'- {t.label}: {t.description}' for t in task_map.values()]
  md += [
    '',
    'Cosine decay of the learning rate to 0 over the run; final metric mean ± std over seeds;'
    ' train time excludes compilation and evaluation.',
    '',
    reporting.results_table(rows, task_map),
    '',
  ]
  for (task_name, name), records in sweeps.items():
    task = task_map[task_name]
    cells = ', '.join(
      f'{registry.Hyperparams(r["learning_rate"], r["weight_decay"]).label()} → '
      + ('diverged' if r['diverged'] else reporting.format_value(r['metric'], task.metric_kind))
      for r in records
    )
    md.append(f'- sweep {task.label}, {registry.get(name).label} (validation split): {cells}')
  for task in task_map.values():
    if task.references:
      refs = ', '.join(
        f'{k} {reporting.format_value(v, task.metric_kind)}' for k, v in task.references.items()
      )
      md.append(f'- {task.label}, published references: {refs}.')
  md += [''] + [f'![]({os.path.basename(p)})' for p in plots]
  text = '\n'.join(md) + '\n'
  reporting.write_text(f'{prefix}.md', text)
  reporting.write_json(
    f'{prefix}.json',
    {
      'machine': info,
      'args': vars(args),
      'summary': rows,
      'sweeps': [{'task': t, 'optimizer': o, 'candidates': r} for (t, o), r in sweeps.items()],
      'runs': [reporting.downsample(r) for r in runs],
      'plots': [os.path.basename(p) for p in plots],
    },
  )
  return text


def main(argv: Sequence[str] | None = None, *, cache: training.StepCache | None = None) -> str:
  """Runs the command line ``argv``; returns the report. ``cache``: compiled steps to reuse."""
  args = parse_args(argv)
  t_start = time.perf_counter()
  info = reporting.machine_info()
  out_dir = str(outputs.directory(args))
  os.makedirs(out_dir, exist_ok=True)
  task_map = tasks.build(args.tasks, args, args.sizes)
  print(f'{info["command"]}\n{info["cpu"]}, {info["cores_available"]} cores; {info["date_utc"]}')
  cache, runs, sweeps = cache or training.StepCache(), [], {}
  for task in task_map.values():
    data = task.load()
    for name in args.optimizers:
      result = training.run_protocol(
        base_config(task, name, args),
        task,
        data,
        seeds=range(args.seeds),
        tune=args.sweep,
        cache=cache,
        progress=not args.no_progress,
      )
      if args.sweep:
        sweeps[(task.name, name)] = result['sweep']
        print(f'sweep {task.name}/{name}: chose {result["chosen"].label()}')
      for run in result['runs']:
        print(training.one_line(run, task), flush=True)
      runs += result['runs']
  info.update(
    total_wall_time_s=time.perf_counter() - t_start, load_average_end=reporting.load_average()
  )
  text = write_report(out_dir, args.tag, task_map, runs, sweeps, info, args)
  print('\n' + text)
  print(
    'wrote',
    os.path.join(os.path.relpath(out_dir), f'train_{args.tag}')
    + '{.md,.json,_curves.png,_diagnostics.png}',
  )
  return text


if __name__ == '__main__':
  main()
