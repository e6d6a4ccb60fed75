"""The optimizer study: which F3EO rule, against tuned baselines, on four tasks.

One command runs four phases on the tasks of ``benchmarks/tasks.py`` (MNIST-1D MLP and
CNN, Friedman #1 regression, a character-level transformer): (a) screening of the whole F3EO
grid of ``benchmarks/registry.py``, ``f3eo_reference`` and the baselines; (b) pruning by a
rule written in :func:`prune`; (c) the full protocol (tuned on a validation split, several
seeds, test metric); (d) the baselines again at the wall-clock of the best F3EO variant.
:data:`PROTOCOL` (also printed in the report) says exactly what each phase does.

Writes ``study_<preset>.md``, ``.json`` and plots to ``benchmarks/out/`` (with
``--update-results``: the committed ``benchmarks/results/``). Finished runs are cached in
``benchmarks/out/study_<preset>_cache.jsonl``: run the same command again after an
interruption and it resumes (``--fresh`` ignores the cache).

Usage::

  python -m benchmarks.study                    # the whole study (hours on 2 CPU cores)
  python -m benchmarks.study --plan             # what it would run, with a time estimate
  python -m benchmarks.study --preset smoke     # tiny models, a few steps: a smoke test
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import os
import time
from collections.abc import Sequence
from typing import Any

import numpy as np

if __package__ in (None, ''):  # `python benchmarks/study.py`: the package is not importable
  raise SystemExit('Run it as a module, from the repository root: python -m benchmarks.study')

from benchmarks import outputs, registry, reporting, tasks, training

STUDY_TASKS = ('mnist1d_mlp', 'mnist1d_cnn', 'regression', 'char_lm')
ALWAYS_KEPT = ('f3eo_reference', 'f3eo_theory_uncapped_global', *registry.BASELINES)

FULL = dict(
  tasks=STUDY_TASKS,
  screen=(*registry.GRID, 'f3eo_reference', *registry.BASELINES),
  screen_fraction=0.4,
  keep_top=6,
  keep_theory=2,
  hvp_every=10,
  seeds=3,
  timing_rounds=7,
  timing_block=10,
  sizes={},
  steps=None,
  train_subset=None,
)
PRESETS = {
  'full': FULL,
  # Tiny models, two tasks, two F3EO variants: every phase in seconds (the tests run it).
  'smoke': {
    **FULL,
    'tasks': ('regression', 'mnist1d_mlp'),
    'screen': ('f3eo_theory_clip1_global', 'f3eo_reference', *registry.BASELINES),
    'screen_fraction': 0.5,
    'keep_top': 1,
    'seeds': 2,
    'timing_rounds': 2,
    'timing_block': 2,
    'sizes': tasks.SMOKE_SIZES,
    'steps': 4,
    'train_subset': 256,
  },
}

PROTOCOL = """\
- **(a) Screening.** Every variant of the F3EO grid (sign × cap × projection), `f3eo_reference`
  and the baselines, one seed, a fraction of each task's steps; each learning rate (and
  AdamW-wd's weight decay) picked from the variant's sweep by the final metric on a validation
  split (the last 10% of the training data). The scores are those validation metrics: the test
  data are not used before (c).
- **(b) Pruning.** Keep the baselines, `f3eo_reference` and the uncapped theory rule; add the
  `keep_top` grid variants with the best mean rank across tasks in (a), the `keep_theory` best
  theory-sign variants with a relative cap (the candidates for the library's default), and
  `hvp_every=10` applied to the best grid variant and to the best theory-sign capped one.
- **(c) Full protocol.** Per task and kept optimizer: the sweep again on the validation split
  at the full step count, then one run per seed on the full training data; the test metric's
  mean ± std over seeds.
- **(d) Equal wall-clock.** Per task, the step time of the best F3EO variant of (c) (by mean
  rank across tasks) and of each baseline, by interleaved timing of the compiled steps in this
  process; each baseline is re-run for `steps × t_F3EO / t_baseline` steps (its cosine schedule
  over that longer horizon, hyperparameters from (c)), one run per seed."""

Entry = tuple[str, tuple[tuple[str, Any], ...]]  # (registry name, overrides)


def entry_name(entry: Entry) -> str:
  return registry.get(entry[0]).with_overrides(**dict(entry[1])).name


def base_config(task: tasks.Task, entry: Entry, num_steps: int, preset: dict) -> training.Config:
  variant = registry.get(entry[0])
  return training.Config(
    task=task.name,
    optimizer=entry[0],
    learning_rate=variant.learning_rate * task.lr_scale,
    num_steps=num_steps,
    train_subset=preset['train_subset'],
    overrides=entry[1],
  )


def _bar(total: int, desc: str, enabled: bool):
  if not enabled:
    return None
  from tqdm.auto import tqdm

  return tqdm(total=total, desc=desc, position=0, dynamic_ncols=True)


def _tick(bar, text: str = '') -> None:
  if bar is not None:
    bar.update(1)
    if text:
      bar.set_postfix_str(text)


def screening(task_map, datas, preset, runner, cache, progress):
  """(a): ``{task: {variant: {'chosen', 'records', 'metric'}}}``, metrics on validation."""
  out = {}
  bar = _bar(len(task_map) * len(preset['screen']), '(a) screening', progress)
  for task in task_map.values():
    steps = max(1, round(preset['screen_fraction'] * task.num_steps))
    out[task.name] = {}
    for name in preset['screen']:
      chosen, records = training.sweep(
        base_config(task, (name, ()), steps, preset),
        task,
        datas[task.name],
        cache=cache,
        progress=progress,
        run_fn=runner.run,
      )
      best = next(
        r
        for r in records
        if r['learning_rate'] == chosen.learning_rate and r['weight_decay'] == chosen.weight_decay
      )
      out[task.name][name] = {
        'chosen': dataclasses.asdict(chosen),
        'records': records,
        'metric': best['metric'],
      }
      _tick(bar, f'{task.name}/{name}')
  if bar is not None:
    bar.close()
  return out


def prune(screen, task_map, preset) -> tuple[list[Entry], dict[str, float], str]:
  """(b): the kept optimizers, the screening's mean ranks, and the rule in words.

  Keeps every baseline, ``f3eo_reference`` and ``f3eo_theory_uncapped_global`` (when
  screened); the ``keep_top`` grid variants (other than those) with the best mean rank
  across tasks of their validation metric in (a); the ``keep_theory`` best theory-sign
  variants with a relative cap, the candidates for the library's default, if not already
  kept; and ``hvp_every`` applied to the best grid variant and to the best theory-sign
  capped one. A diverged run ranks last on its task.
  """
  metrics = {t: {v: r['metric'] for v, r in by_variant.items()} for t, by_variant in screen.items()}
  mean_ranks = reporting.mean_ranks(metrics, task_map)
  screened = set(preset['screen'])
  kept = [(n, ()) for n in ALWAYS_KEPT if n in screened]
  ranked = [n for n in mean_ranks if n in registry.GRID and n not in ALWAYS_KEPT]
  grid = ranked[: preset['keep_top']]
  theory = [n for n in ranked if n.startswith('f3eo_theory_rho')][: preset['keep_theory']]
  grid += [n for n in theory if n not in grid]
  kept[1:1] = [(n, ()) for n in grid]
  if preset['hvp_every']:
    every = (('hvp_every', preset['hvp_every']),)
    best = [n for n in (ranked[:1] + theory[:1]) if n]
    for n in dict.fromkeys(best):
      kept.insert(1 + len(grid), (n, every))
  rule = (
    'Kept: the baselines, f3eo_reference and f3eo_theory_uncapped_global; the'
    f' {preset["keep_top"]} grid variants (other than the uncapped theory rule) with the best'
    ' mean rank across tasks of their validation metric in (a); the'
    f' {preset["keep_theory"]} best theory-sign variants with a relative cap (the candidates'
    " for the library's default), if not already kept; and"
    f' hvp_every={preset["hvp_every"]} applied to the best grid variant and to the best'
    ' theory-sign capped one. Ranks: 1 = best per task, ties share their mean rank, a'
    ' diverged run ranks last.'
  )
  return kept, mean_ranks, rule


def full_protocol(task_map, datas, kept, preset, protocol, progress):
  """(c): ``{task: {entry name: {'chosen', 'sweep', 'runs'}}}``."""
  out = {}
  bar = _bar(len(task_map) * len(kept), '(c) full protocol', progress)
  for task in task_map.values():
    out[task.name] = {}
    for entry in kept:
      config = base_config(task, entry, task.num_steps, preset)
      result = protocol(config, task, datas[task.name], tune=True)
      out[task.name][entry_name(entry)] = result
      _tick(bar, f'{task.name}/{entry_name(entry)}')
  if bar is not None:
    bar.close()
  return out


def mean_test_metrics(full, task_map) -> dict[str, dict[str, float]]:
  """``{task: {entry: mean test metric over seeds}}``; a diverged seed makes it the worst."""
  out = {}
  for task_name, by_entry in full.items():
    worst = task_map[task_name].worst()
    out[task_name] = {
      name: worst
      if any(r['diverged'] for r in res['runs'])
      else float(np.mean([r['final_metric'] for r in res['runs']]))
      for name, res in by_entry.items()
    }
  return out


def equal_wall_clock(
  task_map, datas, kept, full, f3eo_best, preset, protocol, runner, cache, progress
):
  """(d): per task, step times, the baselines' step budgets and their runs."""
  out = {}
  baselines = [e for e in kept if e[0] in registry.BASELINES]
  entries = {entry_name(e): e for e in kept}
  bar = _bar(len(task_map) * len(baselines), '(d) equal wall-clock', progress)
  for task in task_map.values():
    configs = {}
    for name in (f3eo_best, *(entry_name(e) for e in baselines)):
      chosen = full[task.name][name]['chosen']
      configs[name] = dataclasses.replace(
        base_config(task, entries[name], task.num_steps, preset),
        learning_rate=chosen.learning_rate,
        weight_decay=chosen.weight_decay,
      )
    timing_key = (
      f'timing|{task.name}|{sorted(task.meta.items())}|{[c.key() for c in configs.values()]}'
    )
    measure = functools.partial(
      training.time_steps,
      configs,
      task,
      datas[task.name],
      cache=cache,
      rounds=preset['timing_rounds'],
      block=preset['timing_block'],
    )
    times = runner.memo(timing_key, measure)
    budgets, runs = {}, {}
    for e in baselines:
      name = entry_name(e)
      budgets[name] = max(1, round(task.num_steps / times[name]['ratio']))
      config = dataclasses.replace(configs[name], num_steps=budgets[name])
      result = protocol(config, task, datas[task.name], tune=False)
      runs[name] = result['runs']
      _tick(bar, f'{task.name}/{name}: {budgets[name]} steps')
    out[task.name] = {'reference': f3eo_best, 'times': times, 'budgets': budgets, 'runs': runs}
  if bar is not None:
    bar.close()
  return out


# ----------------------------------------------------------------------------- report


def _cell(values, task, diverged=False):
  return 'diverged' if diverged else reporting.format_mean_std(values, task.metric_kind)


def write_report(out_dir: str, tag: str, task_map, preset: dict, r: dict, info: dict) -> str:
  """Writes ``study_<tag>.md``, ``.json`` and the plots; ``r`` holds every phase's results."""
  screen, mean_ranks_a, kept, rule = r['screen'], r['mean_ranks_a'], r['kept'], r['rule']
  full, means, mean_ranks_c, f3eo_best = r['full'], r['means'], r['mean_ranks_c'], r['f3eo_best']
  wall = r['wall']
  prefix = os.path.join(out_dir, f'study_{tag}')
  columns = [t.label for t in task_map.values()]
  labels = {n: res['runs'][0]['label'] for by_entry in full.values() for n, res in by_entry.items()}
  md = [
    f'# F3EO optimizer study: preset `{tag}`',
    '',
    reporting.machine_paragraph(info),
    '',
    '## Tasks',
    '',
  ]
  md += [
    f'- **{t.label}** ({t.num_steps} steps of batch {t.batch_size}): {t.description}'
    for t in task_map.values()
  ]
  md += [
    '',
    '## Protocol',
    '',
    PROTOCOL,
    '',
    f'Every run: cosine decay of the peak learning rate to 0 over its steps; weight decay'
    f' {registry.DEFAULT_WEIGHT_DECAY:g} for the Adam family unless swept (AdamW-wd), none for'
    ' SGD.'
    f" Screening: {preset['screen_fraction']:.0%} of each task's steps. Seeds in (c), (d):"
    f' {preset["seeds"]}.',
    '',
  ]

  md += ['## (a) Screening (validation metric, 1 seed)', '']
  cells = {}
  for name in mean_ranks_a:
    cells[name] = {
      task_map[t].label: reporting.format_value(screen[t][name]['metric'], task_map[t].metric_kind)
      + f' ({registry.Hyperparams(**screen[t][name]["chosen"]).label()})'
      for t in screen
    }
  md += [
    reporting.pivot_table(
      cells, columns, {'mean rank': {n: f'{r:.2f}' for n, r in mean_ranks_a.items()}}
    ),
    '',
  ]
  md += [
    '## (b) Pruning',
    '',
    rule,
    '',
    'Kept: ' + ', '.join(f'`{entry_name(e)}`' for e in kept) + '.',
    '',
  ]

  md += ['## (c) Full protocol (test metric, mean ± std over seeds; equal steps)', '']
  cells = {}
  for name in mean_ranks_c:
    cells[f'{labels[name]} (`{name}`)'] = {
      task_map[t].label: _cell(
        [r['final_metric'] for r in full[t][name]['runs']],
        task_map[t],
        any(r['diverged'] for r in full[t][name]['runs']),
      )
      + f' ({full[t][name]["chosen"].label()})'
      for t in full
    }
  ranks_col = {f'{labels[n]} (`{n}`)': f'{r:.2f}' for n, r in mean_ranks_c.items()}
  md += [reporting.pivot_table(cells, columns, {'mean rank': ranks_col}), '']
  all_runs = [r for by_entry in full.values() for res in by_entry.values() for r in res['runs']]
  md += ['Details:', '', reporting.results_table(reporting.summarize(all_runs), task_map), '']
  counters = [
    (task_map[r['task']].label, r['variant'], r['config']['seed'], r['counters'])
    for r in all_runs
    if r['counters'] and any(r['counters'].values())
  ]
  if counters:
    md += [
      'F3EO counters at the end of a run (only runs where one is non-zero):',
      '',
      reporting.markdown_table(
        ['task', 'optimizer', 'seed', 'counters'],
        [(a, b, c, ', '.join(f'{k} {v}' for k, v in d.items())) for a, b, c, d in counters],
      ),
      '',
    ]

  md += [
    '## (d) Equal wall-clock',
    '',
    f'Reference: `{f3eo_best}`, the F3EO variant with the best mean rank in (c). Step times:'
    f' medians over {preset["timing_rounds"]} interleaved rounds of {preset["timing_block"]}'
    ' steps; ratios: medians of per-round ratios to the reference.',
    '',
  ]
  rows = []
  for t, w in wall.items():
    task = task_map[t]
    ref_runs = full[t][f3eo_best]['runs']
    rows.append(
      [
        task.label,
        f'`{f3eo_best}`',
        f'{1e3 * w["times"][f3eo_best]["step_s"]:.2f}',
        '1.00',
        task.num_steps,
        _cell([r['final_metric'] for r in ref_runs], task),
        '',
        f'{np.mean([r["train_time_s"] for r in ref_runs]):.1f}',
      ]
    )
    for name, runs in w['runs'].items():
      rows.append(
        [
          task.label,
          f'`{name}`',
          f'{1e3 * w["times"][name]["step_s"]:.2f}',
          f'{w["times"][name]["ratio"]:.2f}',
          w['budgets'][name],
          _cell([r['final_metric'] for r in full[t][name]['runs']], task),
          _cell([r['final_metric'] for r in runs], task, any(r['diverged'] for r in runs)),
          f'{np.mean([r["train_time_s"] for r in runs]):.1f}',
        ]
      )
  md += [
    reporting.markdown_table(
      [
        'task',
        'optimizer',
        'ms/step',
        '× reference',
        'steps',
        'metric, equal steps (c)',
        'metric, equal wall-clock',
        'train s',
      ],
      rows,
    ),
    '',
  ]

  plots = [
    reporting.plot_curves(all_runs, task_map, f'{prefix}_curves.png'),
    reporting.plot_diagnostics(all_runs, task_map, f'{prefix}_diagnostics.png'),
    reporting.plot_curves(
      [
        r for t, w in wall.items() for r in full[t][f3eo_best]['runs'] + sum(w['runs'].values(), [])
      ],
      task_map,
      f'{prefix}_wall_clock.png',
      x_keys=('wall_time',),
    ),
  ]
  md += [f'![]({os.path.basename(p)})' for p in plots]
  text = '\n'.join(md) + '\n'
  reporting.write_text(f'{prefix}.md', text)
  reporting.write_json(
    f'{prefix}.json',
    {
      'machine': info,
      'preset': {k: v for k, v in preset.items()},
      'screening': screen,
      'screening_mean_ranks': mean_ranks_a,
      'pruning_rule': rule,
      'kept': [entry_name(e) for e in kept],
      'full': {
        t: {
          n: {
            'chosen': dataclasses.asdict(res['chosen']),
            'sweep': res['sweep'],
            'runs': res['runs'],
          }
          for n, res in by.items()
        }
        for t, by in full.items()
      },
      'test_means': means,
      'full_mean_ranks': mean_ranks_c,
      'wall_clock': wall,
      'plots': [os.path.basename(p) for p in plots],
    },
  )
  return text


# ----------------------------------------------------------------------------- plan


def plan(task_map, datas, preset, cache) -> str:
  """The number of steps per phase, and an estimate of the time from measured step times."""
  n_screen_f3eo = sum(1 for n in preset['screen'] if registry.get(n).uses_obj_fn)
  sweep_size = lambda n: len(registry.get(n).sweep)
  kept_f3eo = 2 + preset['keep_top'] + preset['keep_theory']  # + hvp_every runs (cheaper)
  lines, total = [], 0.0
  for task in task_map.values():
    probe = {
      n: training.Config(task=task.name, optimizer=n, learning_rate=1e-3, num_steps=task.num_steps)
      for n in ('adamw', 'f3eo_reference', 'f3eo_theory_uncapped_global')
    }
    times = training.time_steps(probe, task, datas[task.name], cache=cache, rounds=3, block=5)
    t_base, t_f3eo = (
      times['adamw']['step_s'],
      max(times['f3eo_reference']['step_s'], times['f3eo_theory_uncapped_global']['step_s']),
    )
    screen_steps = round(preset['screen_fraction'] * task.num_steps)
    f3eo_steps = (
      n_screen_f3eo * 3 * screen_steps + kept_f3eo * (3 + preset['seeds']) * task.num_steps
    )
    base_steps = sum(sweep_size(n) for n in registry.BASELINES) * (
      screen_steps + task.num_steps
    ) + 3 * preset['seeds'] * task.num_steps * (1 + t_f3eo / t_base)
    seconds = f3eo_steps * t_f3eo + base_steps * t_base
    total += seconds
    lines.append(
      f'{task.name}: AdamW {1 / t_base:.0f} steps/s, F3EO {1 / t_f3eo:.0f} steps/s;'
      f' {f3eo_steps} F3EO steps, {base_steps:.0f} baseline steps: ~{seconds / 60:.0f} min'
    )
  lines.append(f'total ~{total / 3600:.1f} h of training (plus compilation and evaluation)')
  return '\n'.join(lines)


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
  parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
  parser.add_argument('--preset', default='full', choices=sorted(PRESETS))
  tasks.add_arguments(parser)
  parser.add_argument('--seeds', type=int, default=None)
  parser.add_argument('--keep-top', type=int, default=None)
  parser.add_argument('--screen-fraction', type=float, default=None)
  parser.add_argument(
    '--plan', action='store_true', help='print the plan and a time estimate; train nothing'
  )
  parser.add_argument(
    '--fresh', action='store_true', help='ignore (and replace) the cache of finished runs'
  )
  outputs.add_arguments(parser)
  parser.add_argument('--no-progress', action='store_true', help='no progress bars')
  return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> str:
  args = parse_args(argv)
  preset = dict(PRESETS[args.preset])
  for key in ('tasks', 'steps', 'seeds', 'keep_top', 'screen_fraction'):
    if getattr(args, key) is not None:
      preset[key] = getattr(args, key)
  args.steps = preset['steps']
  t_start = time.perf_counter()
  info = reporting.machine_info()
  out_dir = str(outputs.directory(args))
  os.makedirs(out_dir, exist_ok=True)
  task_map = tasks.build(preset['tasks'], args, preset['sizes'])
  datas = {name: task.load() for name, task in task_map.items()}
  cache = training.StepCache()
  if args.plan:
    text = plan(task_map, datas, preset, cache)
    print(text)
    return text
  # The cache stays in the ignored folder (or --out), even with --update-results.
  cache_path = os.path.join(args.out or outputs.OUT_DIR, f'study_{args.preset}_cache.jsonl')
  if args.fresh and os.path.exists(cache_path):
    os.remove(cache_path)
  runner = training.RunCache(cache_path)
  print(
    f'{info["command"]}\n{info["cpu"]}, {info["cores_available"]} cores; {info["date_utc"]};'
    f' {len(runner.entries)} cached results in {os.path.relpath(cache_path)}',
    flush=True,
  )
  progress = not args.no_progress

  # training.run_protocol with this study's seeds, compiled steps and cache of finished runs.
  protocol = functools.partial(
    training.run_protocol,
    seeds=range(preset['seeds']),
    cache=cache,
    progress=progress,
    run_fn=runner.run,
  )
  r: dict[str, Any] = {}
  r['screen'] = screening(task_map, datas, preset, runner, cache, progress)
  r['kept'], r['mean_ranks_a'], r['rule'] = prune(r['screen'], task_map, preset)
  print('(b) kept:', ', '.join(entry_name(e) for e in r['kept']), flush=True)
  r['full'] = full_protocol(task_map, datas, r['kept'], preset, protocol, progress)
  r['means'] = mean_test_metrics(r['full'], task_map)
  r['mean_ranks_c'] = reporting.mean_ranks(r['means'], task_map)
  r['f3eo_best'] = next(n for n in r['mean_ranks_c'] if registry.get(n.split('+')[0]).uses_obj_fn)
  print(f'(c) best F3EO variant by mean rank: {r["f3eo_best"]}', flush=True)
  r['wall'] = equal_wall_clock(
    task_map,
    datas,
    r['kept'],
    r['full'],
    r['f3eo_best'],
    preset,
    protocol,
    runner,
    cache,
    progress,
  )
  info.update(
    total_wall_time_s=time.perf_counter() - t_start,
    load_average_end=reporting.load_average(),
    cached_results_used=runner.hits,
  )
  text = write_report(out_dir, args.preset, task_map, preset, r, info)
  print('\n' + text)
  print(
    'wrote', os.path.join(os.path.relpath(out_dir), f'study_{args.preset}') + '{.md,.json,_*.png}'
  )
  return text


if __name__ == '__main__':
  main()
