"""What the benchmarks write: the command, machine, versions, tables (pandas), JSON, plots.

Files go to ``benchmarks/out/`` (ignored by git), ``--update-results``: the committed
``benchmarks/results/``, ``--out DIR``: anywhere.

Example:
  >>> import pandas as pd
  >>> from benchmarks import report
  >>> df = pd.DataFrame({'task': list('aabb'), 'opt': list('xyxy'), 'metric': [0.9, 0.8, 2, 1]})
  >>> report.mean_ranks(df, 'task', 'opt', 'metric', {'a': True, 'b': False}).to_dict()
  {'x': 1.5, 'y': 1.5}
"""

from __future__ import annotations

import datetime
import importlib
import json
import math
import os
import platform
import re
import shlex
import sys
from pathlib import Path

import numpy as np
import pandas as pd

HERE = Path(__file__).resolve().parent
OUT_DIR, RESULTS_DIR = HERE / 'out', HERE / 'results'
PACKAGES = ('jax', 'jaxlib', 'optax', 'flax', 'numpy', 'pandas')


def add_output_arguments(parser) -> None:
  parser.add_argument('--update-results', action='store_true', help=f'write to {RESULTS_DIR}')
  parser.add_argument('--out', type=Path, help=f'write to this folder (default: {OUT_DIR})')


def out_dir(args) -> Path:
  path = args.out or (RESULTS_DIR if args.update_results else OUT_DIR)
  path.mkdir(parents=True, exist_ok=True)
  return path


def machine_info(packages=PACKAGES) -> dict:
  """The command (runnable from the repository root), CPU, devices, load, versions, date."""
  import jax

  import f3eo_jax

  cpu = platform.processor() or platform.machine()
  if os.path.exists('/proc/cpuinfo'):
    with open('/proc/cpuinfo') as f:
      cpu = next((ln.split(':', 1)[1].strip() for ln in f if ln.startswith('model name')), cpu)
  argv = ['-m', f'benchmarks.{Path(sys.argv[0]).stem}', *sys.argv[1:]]  # run as a module
  versions = {'python': platform.python_version(), 'f3eo_jax': f3eo_jax.__version__}
  return {
    'command': 'python ' + shlex.join(argv),
    'cpu': cpu,
    'cores_available': len(os.sched_getaffinity(0)) if hasattr(os, 'sched_getaffinity') else None,
    'load_average': [round(v, 2) for v in os.getloadavg()] if hasattr(os, 'getloadavg') else None,
    'devices': sorted({d.device_kind for d in jax.devices()}),
    'backend': jax.default_backend(),
    'versions': {**versions, **{p: importlib.import_module(p).__version__ for p in packages}},
    'date_utc': datetime.datetime.now(datetime.timezone.utc).strftime('%Y-%m-%d %H:%M UTC'),
  }


def header(title: str, info: dict) -> list[str]:
  """The title, then what :func:`machine_info` and the run recorded, as a table."""
  join = lambda v: ', '.join(f'{a} {b}' for a, b in v.items()) if isinstance(v, dict) else v
  flat = {k: join(v) for k, v in info.items()}
  return [f'# {title}', '', pd.Series(flat, name='').to_markdown(), '']


def write(path: Path, text: str | None = None, payload=None) -> Path:
  """Writes ``text``, or ``payload`` as JSON (NaN and infinities as null), atomically."""
  tmp = path.with_name(f'{path.name}.{os.getpid()}.tmp')
  if payload is not None:
    to_json = lambda v: v.tolist() if hasattr(v, 'tolist') else str(v)
    text = json.dumps(payload, default=to_json, indent=1)
    text = re.sub(r'(?<=[\[ ])(-?Infinity|NaN)(?=[,\]}\n])', 'null', text)
  tmp.write_text(text)
  os.replace(tmp, path)
  return path


def fmt(values, kind: str) -> str:
  """Mean ± std (population) of a metric over seeds; accuracies as percentages."""
  s = pd.Series(values, dtype=float) * (100 if kind == 'accuracy' else 1)
  if not np.all(np.isfinite(s)):
    return f'diverged ({int((~np.isfinite(s)).sum())}/{len(s)})'
  unit = '%' if kind == 'accuracy' else ''
  mean = f'{s.mean():.1f}' if unit else f'{s.mean():.4g}'
  return mean + unit if len(s) == 1 else f'{mean} ± {s.std(ddof=0):.2g}{unit}'


RUN_KEYS = 'task label variant steps_done final_metric best_metric final_eval_loss final_train_loss'


def runs_frame(runs) -> pd.DataFrame:
  """One row per run: its task, optimizer, config, metrics and timings."""
  keys = (*RUN_KEYS.split(), 'train_time_s', 'steps_per_s')
  rows = [{**{k: r[k] for k in keys}, **r['config'], 'variant': r['variant']} for r in runs]
  return pd.DataFrame(rows).rename(columns={'label': 'optimizer', 'final_metric': 'metric'})


def summary(runs, tasks) -> pd.DataFrame:
  """Per (task, optimizer, lr, steps): the metric's mean ± std over seeds, means of the rest."""
  df = runs_frame(runs)
  keys = ['task', 'optimizer', 'learning_rate', 'num_steps']
  means = ['best_metric', 'final_eval_loss', 'final_train_loss', 'train_time_s', 'steps_per_s']
  groups = df.groupby(keys, sort=False, dropna=False)
  out = groups.agg(seeds=('seed', 'size'), metric=('metric', list)).join(groups[means].mean())
  out = out.reset_index()
  kinds = [tasks[t].metric_kind for t in out['task']]
  out['metric'] = [fmt(v, k) for v, k in zip(out['metric'], kinds)]
  out['best_metric'] = [fmt([v], k) for v, k in zip(out['best_metric'], kinds)]
  return out.assign(task=[tasks[t].label for t in out['task']])


def mean_ranks(df, task, optimizer, metric, higher_is_better) -> pd.Series:
  """Mean over tasks of each optimizer's rank (1 = best; ties share; non-finite ranks last)."""
  sign = df[task].map(lambda t: 1.0 if higher_is_better[t] else -1.0)
  score = (df[metric] * sign).where(np.isfinite(df[metric]), -np.inf)
  ranks = score.groupby(df[task]).rank(ascending=False, method='average')
  return ranks.groupby(df[optimizer], sort=False).mean().sort_values(kind='stable')


def wall_clock_frame(same_steps, walls, tasks) -> pd.DataFrame:
  """Per task and optimizer: step time, ratio to the reference, the steps that fit the
  reference's time, the metric at equal steps (``same_steps[task][name]``) and at equal
  wall-clock (``walls[task][name]``: ``harness.equal_wall_clock``'s)."""
  rows = []
  for t, by in walls.items():
    kind = tasks[t].metric_kind
    for name, w in by.items():
      same = same_steps[t][name]
      row = {'task': tasks[t].label, 'optimizer': name, 'ms/step': 1e3 * w['step_s']}
      row.update({'× reference': w['ratio'], 'steps': w['steps'], 'equal steps': fmt(same, kind)})
      row['equal wall-clock'] = fmt([r['final_metric'] for r in w['runs']] or same, kind)
      rows.append(row)
  return pd.DataFrame(rows)


def section(title: str, df: pd.DataFrame, floatfmt='.4g') -> list[str]:
  """A markdown section: the title and the table (``DataFrame.to_markdown``)."""
  return [f'## {title}', '', df.to_markdown(index=False, floatfmt=floatfmt), '']


def plot(runs, tasks, path: Path, x='eval_steps', value='metric') -> Path:
  """One panel per task: ``value``, mean over seeds, against ``x``.

  ``value``: ``'metric'`` (the evaluation history; ``x``: ``'eval_steps'`` or ``'wall_time'``)
  or a per-step value such as ``'grad_sq_norm'`` (then against the step).
  """
  import matplotlib

  matplotlib.use('Agg')
  import matplotlib.pyplot as plt

  names = list(dict.fromkeys(r['task'] for r in runs))
  fig, axes = plt.subplots(1, len(names), figsize=(6 * len(names), 3.6), squeeze=False)
  for ax, name in zip(axes[0], names):
    for label in dict.fromkeys(r['label'] for r in runs if r['task'] == name):
      group = [r for r in runs if (r['task'], r['label']) == (name, label)]
      ys = [r[value] if value == 'metric' else r['step_values'].get(value) for r in group]
      if any(y is None for y in ys):
        continue
      n = min(map(len, ys))
      xs = np.mean([r[x][:n] for r in group], 0) if value == 'metric' else np.arange(1, n + 1)
      ax.plot(xs, np.nanmean([y[:n] for y in ys], 0), label=label)
    ax.set(xlabel=x if value == 'metric' else 'step', title=f'{tasks[name].label}: {value}')
    ax.set_yscale('log' if value in ('grad_sq_norm', 'meta_norm', 'loss') else 'linear')
    ax.legend(fontsize=7)
  fig.tight_layout()
  fig.savefig(path, dpi=90)
  plt.close(fig)
  return path


def downsample(run: dict, max_points: int = 250) -> dict:
  """The run with its per-step values averaged over blocks, at most ``max_points`` each."""
  values = run.get('step_values', {})
  every = max(1, math.ceil(max((len(v) for v in values.values()), default=0) / max_points))
  blocks = lambda v: [float(np.mean(v[i : i + every])) for i in range(0, len(v), every)]
  return dict(run, step_values={k: blocks(v) for k, v in values.items()}, step_values_every=every)
