"""The optimizer study: choose on selection tasks, judge on held-out evaluation tasks.

``--phase selection`` (hours; the record: ``results/study_full.json``), on ``tasks.py``'s
four: (a) screening of the grid, ``f3eo_reference`` and baselines (lr tuned on validation);
(b) pruning by mean rank; (c) the kept ones tuned, several seeds; (d) the baselines at the
best F3EO's wall-clock. ``--phase evaluation``: AdamW, ``f3eo``, ``f3eo_hvp10_python``,
``f3eo_reference`` on ``evaluation_tasks.py``, seeds 100-102, lr tuned on validation; equal
steps and equal wall-clock (``f3eo``'s time). Runs are cached in ``out/``: reruns resume.

Usage::

  python -m benchmarks.study                       # selection (hours)
  python -m benchmarks.study --phase evaluation    # the held-out judgement
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import shelve
import time

import pandas as pd

import f3eo_jax
from benchmarks import config, evaluation_tasks, harness, report, tasks

SELECTION_TASKS = ('mnist1d_mlp', 'mnist1d_cnn', 'regression', 'char_lm')
ALWAYS_KEPT = ('f3eo_reference', 'f3eo_theory_uncapped_global', *config.BASELINES)
EVALUATED = ('adamw', 'f3eo', 'f3eo_hvp10_python', 'f3eo_reference')
FULL = dict(selection=SELECTION_TASKS, evaluation=tuple(evaluation_tasks.EVALUATION_TASKS))
FULL.update(screen=(*config.GRID, 'f3eo_reference', *config.BASELINES), screen_fraction=0.4)
FULL.update(keep_top=6, keep_theory=2, seeds=3, evaluation_seeds=(100, 101, 102), sizes={})
FULL.update(steps=None, train_subset=None)
SMOKE = dict(FULL, selection=('regression',), evaluation=('modular_addition',), keep_top=1)
SMOKE.update(screen=('f3eo_theory_clip1_global', 'f3eo_reference', 'adamw', 'adamw_wd'), seeds=2)
SMOKE.update(evaluation_seeds=(100, 101), steps=4, train_subset=256, screen_fraction=0.5)
SMOKE['sizes'] = {**tasks.SMOKE_SIZES, **evaluation_tasks.SMOKE_SIZES}
PRESETS = {'full': FULL, 'smoke': SMOKE}


class RunCache:
  """Finished runs and timings in a ``shelve`` file, keyed by config, task, data, version."""

  def __init__(self, path: str, cache: harness.StepCache, fresh: bool = False):
    self.db, self.cache, self.hits = shelve.open(path, 'n' if fresh else 'c'), cache, 0

  def memo(self, key: str, fn):
    self.hits += key in self.db
    if key not in self.db:
      self.db[key] = fn()
      self.db.sync()
    return self.db[key]

  def run(self, cfg: harness.RunConfig, task, data) -> dict:
    parts = [dataclasses.asdict(cfg), task.name, sorted(task.meta.items()), data.name]
    key = json.dumps([*parts, f3eo_jax.__version__], sort_keys=True, default=str)
    run = lambda: harness.train_and_evaluate(cfg, task, data, cache=self.cache)
    return self.memo(key, lambda: report.downsample(run(), 200))


def base(task, variant, steps, preset) -> harness.RunConfig:
  variant = config.get(variant)
  lr = variant.default_lr() * task.lr_scale
  return harness.RunConfig(variant, lr, num_steps=steps, train_subset=preset['train_subset'])


def screening(tasks_map, datas, preset, runner) -> dict:
  """(a): ``{task: {variant: {'chosen', 'records', 'metric' (validation)}}}``."""
  out = {}
  for task in tasks_map.values():
    steps = max(1, round(preset['screen_fraction'] * task.num_steps))
    out[task.name] = {}
    for name in preset['screen']:
      cfg = base(task, name, steps, preset)
      chosen, records = harness.sweep(cfg, task, datas[task.name], run_fn=runner.run)
      best = next(r for r in records if (r['learning_rate'], r['weight_decay']) == chosen)
      out[task.name][name] = {'chosen': chosen, 'records': records, 'metric': best['metric']}
  return out


def prune(screen, tasks_map, preset) -> tuple[list[config.Variant], pd.Series]:
  """(b): the baselines, ``f3eo_reference``, the uncapped theory rule; the ``keep_top`` grid
  variants by mean rank of their validation metric; the ``keep_theory`` best theory-sign
  capped ones; and ``hvp_every=10`` on the best grid and the best theory-sign capped one."""
  rows = [(t, v, r['metric']) for t, by in screen.items() for v, r in by.items()]
  df = pd.DataFrame(rows, columns=['task', 'variant', 'metric'])
  higher = {t: tasks_map[t].higher_is_better for t in screen}
  ranks = report.mean_ranks(df, 'task', 'variant', 'metric', higher)
  ranked = [n for n in ranks.index if n in config.GRID and n not in ALWAYS_KEPT]
  top = ranked[: preset['keep_top']]
  theory = [n for n in ranked if n.startswith('f3eo_theory_rho')][: preset['keep_theory']]
  top += [n for n in theory if n not in top]
  every = [config.get(n).with_options(hvp_every=10) for n in dict.fromkeys(ranked[:1] + theory[:1])]
  always = [config.get(n) for n in ALWAYS_KEPT if n in preset['screen']]
  return [config.get(n) for n in top] + every + always, ranks


def protocol(tasks_map, datas, variants, preset, runner, seeds) -> tuple[dict, dict]:
  """(c) and the evaluation at equal steps: tuned on validation, one run per seed."""
  out, tuned = {}, {}
  for task in tasks_map.values():
    configs = {v.name: base(task, v, task.num_steps, preset) for v in variants}
    data = datas[task.name]
    out[task.name], tuned[task.name] = harness.compare(
      configs, task, data, seeds=seeds, tune=True, run_fn=runner.run
    )
  return out, tuned


def wall_clock(tasks_map, datas, tuned, names, reference, runner, seeds) -> dict:
  """(d) and the evaluation at equal wall-clock: each of ``names`` given ``reference``'s time."""
  out = {}
  for task in tasks_map.values():
    configs = {n: tuned[task.name][n] for n in names}
    key = f'timing|{task.name}|{sorted(task.meta.items())}|{sorted(configs)}|{list(seeds)}'
    kw = dict(seeds=seeds, run_fn=runner.run, cache=runner.cache)
    measure = functools.partial(harness.equal_wall_clock, configs, reference, task, **kw)
    out[task.name] = runner.memo(key, lambda m=measure, d=datas[task.name]: m(d))
  return out


def metrics(full) -> dict:
  per_run = lambda res: [r['final_metric'] for r in res['runs']]
  return {t: {n: per_run(res) for n, res in by.items()} for t, by in full.items()}


def steps_table(full, tasks_map) -> pd.DataFrame:
  """Optimizers x tasks: the test metric's mean ± std over seeds, and the mean rank."""
  runs = [r for by in full.values() for res in by.values() for r in res['runs']]
  df = report.runs_frame(runs)
  cells = df.groupby(['variant', 'task'], sort=False)['metric'].agg(list).reset_index()
  kinds = [tasks_map[t].metric_kind for t in cells['task']]
  cells['cell'] = [report.fmt(v, k) for v, k in zip(cells['metric'], kinds)]
  means = df.groupby(['task', 'variant'], sort=False)['metric'].mean().reset_index()
  higher = {t: tasks_map[t].higher_is_better for t in full}
  ranks = report.mean_ranks(means, 'task', 'variant', 'metric', higher)
  table = cells.pivot(index='variant', columns='task', values='cell').loc[ranks.index]
  table = table.rename(columns=lambda t: tasks_map[t].label)
  return table.assign(**{'mean rank': ranks}).reset_index()


def selection(tasks_map, datas, preset, runner) -> tuple[list[str], dict]:
  screen = screening(tasks_map, datas, preset, runner)
  kept, ranks_a = prune(screen, tasks_map, preset)
  full, tuned = protocol(tasks_map, datas, kept, preset, runner, range(preset['seeds']))
  f3eo_ranks = steps_table(full, tasks_map)
  best = next(n for n in f3eo_ranks['variant'] if n.startswith('f3eo'))
  compared = [v.name for v in kept if v.name == best or v.name in config.BASELINES]
  wall = wall_clock(tasks_map, datas, tuned, compared, best, runner, range(preset['seeds']))
  rows = [(tasks_map[t].label, v, r['metric']) for t, by in screen.items() for v, r in by.items()]
  screen_df = pd.DataFrame(rows, columns=['task', 'variant', 'metric'])
  screen_df = screen_df.pivot(index='variant', columns='task', values='metric').loc[ranks_a.index]
  md = report.section('(a) Screening (validation metric)', screen_df.reset_index())
  md += ['## (b) Kept', '', ', '.join(f'`{v.name}`' for v in kept), '']
  md += report.section('(c) Test metric, equal steps', f3eo_ranks, '.3g')
  wall_df = report.wall_clock_frame(metrics(full), wall, tasks_map)
  md += report.section(f'(d) Equal wall-clock (reference `{best}`)', wall_df, '.3g')
  payload = dict(screening=screen, screening_mean_ranks=ranks_a.to_dict(), full=full)
  payload.update(kept=[v.name for v in kept], wall_clock=wall)
  return md, payload


def evaluation(tasks_map, datas, preset, runner) -> tuple[list[str], dict]:
  variants = [config.get(n) for n in EVALUATED]
  seeds = preset['evaluation_seeds']
  full, tuned = protocol(tasks_map, datas, variants, preset, runner, seeds)
  wall = wall_clock(tasks_map, datas, tuned, EVALUATED, 'f3eo', runner, seeds)
  table = steps_table(full, tasks_map)
  md = report.section(f'Evaluation: equal steps (seeds {list(seeds)})', table)
  wall_df = report.wall_clock_frame(metrics(full), wall, tasks_map)
  md += report.section('Evaluation: equal wall-clock (the time `f3eo` took)', wall_df, '.3g')
  return md, dict(evaluation=full, evaluation_wall_clock=wall)


PHASES = {'selection': selection, 'evaluation': evaluation}


def main(argv=None) -> str:
  parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
  parser.add_argument('--preset', default='full', choices=sorted(PRESETS))
  parser.add_argument('--phase', nargs='+', default=['selection'], choices=PHASES)
  parser.add_argument('--tasks', nargs='+', help="replace the phase's tasks")
  parser.add_argument('--steps', type=int, help="every task's step count")
  parser.add_argument('--fresh', action='store_true', help='ignore the cache of finished runs')
  report.add_output_arguments(parser)
  args = parser.parse_args(argv)
  preset, start, info = PRESETS[args.preset], time.perf_counter(), report.machine_info()
  args.steps = args.steps or preset['steps']
  folder = report.out_dir(args)
  cache_dir = args.out or report.OUT_DIR  # the cache stays out of git
  cache_dir.mkdir(parents=True, exist_ok=True)
  runner = RunCache(str(cache_dir / f'study_{args.preset}_cache'), harness.StepCache(), args.fresh)
  md, payload = [], {'machine': info, 'preset': preset}
  builders = {**tasks.TASKS, **evaluation_tasks.EVALUATION_TASKS}
  for phase in args.phase:
    names = args.tasks or preset[phase]
    tasks_map = tasks.build(names, args, preset['sizes'], builders)
    datas = {name: task.load() for name, task in tasks_map.items()}
    text, result = PHASES[phase](tasks_map, datas, preset, runner)
    md, payload = md + text, {**payload, **result}
    by_task = result.get('full', result.get('evaluation'))
    runs = [r for by in by_task.values() for res in by.values() for r in res['runs']]
    plot = folder / f'study_{args.preset}_{phase}_wall_time.png'
    md += [f'![]({report.plot(runs, tasks_map, plot, "wall_time").name})', '']
  info.update(wall_time_s=round(time.perf_counter() - start), cached_results_used=runner.hits)
  name = '_'.join(['study', args.preset, *(p for p in args.phase if p != 'selection')])
  text = '\n'.join(report.header(f'F3EO optimizer study: preset `{args.preset}`', info) + md) + '\n'
  report.write(folder / f'{name}.md', text)
  report.write(folder / f'{name}.json', payload=payload)
  print(text)
  return text


if __name__ == '__main__':
  main()
