"""Reports of the benchmarks: machine description, markdown tables, JSON and plots.

Nothing here trains or times anything; the scripts pass in what they measured. Prose in
the reports states how the numbers were obtained, never what they are supposed to show.

Example:
  >>> from benchmarks import reporting
  >>> info = reporting.machine_info()
  >>> sorted(info['versions'])[:3]
  ['f3eo_jax', 'flax', 'jax']
  >>> print(reporting.markdown_table(['a', 'b'], [[1, 'x'], [2, 'y']]))
  | a | b |
  |---|---|
  | 1 | x |
  | 2 | y |
"""

from __future__ import annotations

import datetime
import json
import math
import os
import platform
import shlex
import sys
from collections.abc import Iterable, Mapping, Sequence
from importlib import metadata
from typing import Any

import numpy as np

VERSIONED_PACKAGES = ('jax', 'jaxlib', 'optax', 'flax', 'numpy', 'f3eo_jax')


def cpu_model() -> str:
  """The CPU's model name from ``/proc/cpuinfo``, or what ``platform`` knows."""
  try:
    with open('/proc/cpuinfo') as f:
      for line in f:
        if line.startswith('model name'):
          return line.split(':', 1)[1].strip()
  except OSError:
    pass
  return platform.processor() or platform.machine()


def load_average() -> list[float] | None:
  """The 1, 5 and 15 minute load averages, or ``None`` where the OS has none."""
  return [round(v, 2) for v in os.getloadavg()] if hasattr(os, 'getloadavg') else None


def _version(package: str) -> str | None:
  if package == 'f3eo_jax':  # the working tree's version, not the installed metadata's
    try:
      import f3eo_jax

      return f3eo_jax.__version__
    except ImportError:
      return None
  try:
    return metadata.version(package.replace('_', '-'))
  except metadata.PackageNotFoundError:
    try:
      return metadata.version(package)
    except metadata.PackageNotFoundError:
      return None


def machine_info(packages: Sequence[str] = ()) -> dict[str, Any]:
  """Where and how a benchmark ran: hardware, load, versions, date and the command.

  Args:
    packages: further packages whose installed versions to record (e.g. ``('torch',)``).

  Returns:
    A JSON-serialisable dict: ``cpu``, ``cpu_count``, ``cores_available``,
    ``load_average`` (1, 5, 15 min, at the call), ``platform``, ``jax_backend``,
    ``devices``, ``versions`` (python, jax, jaxlib, optax, flax, numpy, f3eo_jax and
    ``packages``; ``None`` for one not installed), ``date_utc`` and ``command`` (the exact
    command line, runnable from the repository root).
  """
  import jax

  versions = {'python': platform.python_version()}
  versions.update({p: _version(p) for p in (*VERSIONED_PACKAGES, *packages)})
  argv = list(sys.argv)
  if (
    argv and argv[0].endswith('.py') and os.sep + 'benchmarks' + os.sep in os.path.abspath(argv[0])
  ):
    module = os.path.splitext(os.path.basename(argv[0]))[0]
    argv = ['-m', f'benchmarks.{module}', *argv[1:]]  # run as `python -m benchmarks.x`
  return {
    'cpu': cpu_model(),
    'cpu_count': os.cpu_count(),
    'cores_available': len(os.sched_getaffinity(0)) if hasattr(os, 'sched_getaffinity') else None,
    'load_average': load_average(),
    'platform': platform.platform(),
    'jax_backend': jax.default_backend(),
    'devices': [str(d) for d in jax.devices()],
    'versions': versions,
    'date_utc': datetime.datetime.now(datetime.timezone.utc).strftime('%Y-%m-%d %H:%M UTC'),
    'command': 'python ' + shlex.join(argv),
  }


def machine_paragraph(info: Mapping[str, Any]) -> str:
  """``machine_info()`` (plus ``total_wall_time_s``/``load_average_end`` if set) as prose."""
  load = lambda v: ', '.join(f'{x:.1f}' for x in v) if v else 'n/a'
  lines = [
    f'Command: `{info["command"]}`  ',
    f'Machine: {info["cpu"]}, {info["cores_available"]} cores available ({info["cpu_count"]}'
    f' in total), JAX backend {info["jax_backend"]}; load average {load(info["load_average"])}'
    ' at the start'
    + (f', {load(info["load_average_end"])} at the end' if info.get('load_average_end') else '')
    + '.  ',
    'Versions: ' + ', '.join(f'{k} {v}' for k, v in info['versions'].items()) + '.  ',
    f'Date: {info["date_utc"]}.'
    + (
      f' Whole command: {info["total_wall_time_s"]:.0f} s.' if 'total_wall_time_s' in info else ''
    ),
  ]
  return '\n'.join(lines)


# ----------------------------------------------------------------------------- formatting


def markdown_table(header: Sequence[str], rows: Iterable[Sequence[Any]], align: str = '') -> str:
  """A markdown table; ``align`` is one character per column (``'l'``, ``'r'``), or empty."""
  marks = [{'r': '---:', 'l': '---'}[a] for a in align] if align else ['---'] * len(header)
  lines = ['| ' + ' | '.join(header) + ' |', '|' + '|'.join(marks) + '|']
  lines += ['| ' + ' | '.join(str(c) for c in row) + ' |' for row in rows]
  return '\n'.join(lines)


def mean_std(values: Sequence[float]) -> tuple[float, float]:
  """Mean and (population) standard deviation; NaN for an empty or non-finite sample."""
  arr = np.asarray(values, dtype=float)
  if arr.size == 0 or not np.all(np.isfinite(arr)):
    return float('nan'), float('nan')
  return float(arr.mean()), float(arr.std())


def format_value(value: float, kind: str) -> str:
  """A metric value: ``'accuracy'`` as a percentage, anything else with 4 significant digits."""
  if value is None or not math.isfinite(value):
    return 'n/a'
  return f'{100 * value:.1f}%' if kind == 'accuracy' else f'{value:.4g}'


def format_mean_std(values: Sequence[float], kind: str, diverged: int = 0) -> str:
  """``'71.3 ± 0.4%'``-style cell; names diverged runs instead of hiding them."""
  if diverged:
    return f'diverged ({diverged}/{len(values)})'
  mean, std = mean_std(values)
  if len(values) == 1:
    return format_value(mean, kind)
  if kind == 'accuracy':
    return f'{100 * mean:.1f} ± {100 * std:.1f}%' if math.isfinite(mean) else 'n/a'
  return f'{format_value(mean, kind)} ± {std:.2g}' if math.isfinite(mean) else 'n/a'


# ----------------------------------------------------------------------------- files


def _json_default(value: Any) -> Any:
  if isinstance(value, (np.floating, np.integer)):
    return value.item()
  if isinstance(value, np.ndarray):
    return value.tolist()
  if hasattr(value, '__dataclass_fields__'):
    import dataclasses

    return dataclasses.asdict(value)
  return str(value)


def _clean(value: Any) -> Any:
  """NaN and infinities as ``None``, so the JSON is standard."""
  if isinstance(value, float):
    return value if math.isfinite(value) else None
  if isinstance(value, dict):
    return {str(k): _clean(v) for k, v in value.items()}
  if isinstance(value, (list, tuple)):
    return [_clean(v) for v in value]
  return value


def write_json(path: str, payload: Any) -> str:
  """Writes ``payload`` as indented JSON (NaN as ``null``), atomically; returns ``path``."""
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  tmp = f'{path}.{os.getpid()}.tmp'
  with open(tmp, 'w') as f:
    json.dump(_clean(json.loads(json.dumps(payload, default=_json_default))), f, indent=1)
  os.replace(tmp, path)
  return path


def write_text(path: str, text: str) -> str:
  """Writes ``text`` to ``path`` (creating its folder); returns ``path``."""
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  with open(path, 'w') as f:
    f.write(text)
  return path


# ----------------------------------------------------------------------------- summaries


def summarize(runs: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
  """Groups runs by (task, variant), in order of first appearance, and reduces over seeds.

  Args:
    runs: results of ``training.train_and_evaluate``.

  Returns:
    One dict per group: ``task``, ``variant``, ``label``, ``learning_rate``,
    ``weight_decay``, ``steps`` (configured), ``seeds``, ``diverged`` (how many),
    ``metric`` (the final metrics), ``metric_mean``/``metric_std`` (NaN if any diverged),
    ``best_metric``, ``eval_loss``, ``train_loss``, ``train_time_s``, ``steps_per_s``
    (means over seeds) and ``compile_time_s`` (the sum).
  """
  groups: dict[tuple[str, str], list[Mapping[str, Any]]] = {}
  for run in runs:
    groups.setdefault((run['task'], run['variant']), []).append(run)
  rows = []
  for (task, variant), group in groups.items():
    config = group[0]['config']
    mean = lambda key, group=group: float(np.mean([r[key] for r in group]))
    metric_mean, metric_std = mean_std([r['final_metric'] for r in group])
    rows.append(
      {
        'task': task,
        'variant': variant,
        'label': group[0]['label'],
        'learning_rate': config['learning_rate'],
        'weight_decay': group[0]['weight_decay'],
        'steps': config['num_steps'],
        'seeds': len(group),
        'diverged': sum(bool(r['diverged']) for r in group),
        'metric': [r['final_metric'] for r in group],
        'metric_mean': metric_mean,
        'metric_std': metric_std,
        'best_metric': mean('best_metric'),
        'eval_loss': mean('final_eval_loss'),
        'train_loss': mean('final_train_loss'),
        'train_time_s': mean('train_time_s'),
        'steps_per_s': mean('steps_per_s'),
        'compile_time_s': float(sum(r['compile_time_s'] for r in group)),
      }
    )
  return rows


def results_table(rows: Sequence[Mapping[str, Any]], tasks: Mapping[str, Any]) -> str:
  """The rows of :func:`summarize` as one markdown table (``tasks``: name -> Task)."""
  header = [
    'task',
    'optimizer',
    'lr',
    'wd',
    'steps',
    'seeds',
    'metric',
    'final',
    'best',
    'eval loss',
    'train loss',
    'train s',
    'steps/s',
  ]
  body = []
  for r in rows:
    task = tasks[r['task']]
    kind = task.metric_kind
    wd = 'none' if r['weight_decay'] is None else f'{r["weight_decay"]:g}'
    body.append(
      [
        task.label,
        r['label'],
        f'{r["learning_rate"]:g}',
        wd,
        r['steps'],
        r['seeds'],
        task.metric,
        format_mean_std(r['metric'], kind, r['diverged']),
        format_value(r['best_metric'], kind),
        f'{r["eval_loss"]:.4g}',
        f'{r["train_loss"]:.4g}',
        f'{r["train_time_s"]:.1f}',
        f'{r["steps_per_s"]:.0f}',
      ]
    )
  return markdown_table(header, body)


def ranks(values: Mapping[str, float], higher_is_better: bool) -> dict[str, float]:
  """Rank 1 = best; ties share their mean rank; NaN and infinities rank last."""
  names = list(values)
  score = np.array([values[n] for n in names], dtype=float)
  score = np.where(np.isfinite(score), score if higher_is_better else -score, -np.inf)
  out = {}
  for i, name in enumerate(names):
    better = np.sum(score > score[i])
    ties = np.sum(score == score[i])
    out[name] = float(better + (ties + 1) / 2)
  return out


def mean_ranks(
  per_task: Mapping[str, Mapping[str, float]], tasks: Mapping[str, Any]
) -> dict[str, float]:
  """Mean over tasks of each variant's rank (``per_task``: task -> variant -> metric)."""
  totals: dict[str, list[float]] = {}
  for task_name, values in per_task.items():
    for name, rank in ranks(values, tasks[task_name].higher_is_better).items():
      totals.setdefault(name, []).append(rank)
  return {
    name: float(np.mean(r)) for name, r in sorted(totals.items(), key=lambda kv: np.mean(kv[1]))
  }


def downsample(run: Mapping[str, Any], max_points: int = 250) -> dict[str, Any]:
  """The run with per-step values averaged over blocks, at most ``max_points`` per key."""
  out = dict(run)
  values = run.get('step_values', {})
  n = max((len(v) for v in values.values()), default=0)
  every = max(1, math.ceil(n / max_points))
  if every > 1:
    out['step_values'] = {
      k: [float(np.mean(v[i : i + every])) for i in range(0, len(v), every)]
      for k, v in values.items()
    }
  out['step_values_every'] = run.get('step_values_every', 1) * every
  return out


# ----------------------------------------------------------------------------- plots


def _pyplot():
  import matplotlib

  matplotlib.use('Agg')
  import matplotlib.pyplot as plt

  return plt


def _save(fig, path: str) -> str:
  fig.tight_layout()
  fig.savefig(path, dpi=100)
  _pyplot().close(fig)
  return path


def _by_task(runs: Sequence[Mapping[str, Any]]) -> dict[str, dict[str, list[Mapping[str, Any]]]]:
  out: dict[str, dict[str, list[Mapping[str, Any]]]] = {}
  for run in runs:
    out.setdefault(run['task'], {}).setdefault(run['label'], []).append(run)
  return out


def _mean_curve(group, key, x_key):
  n = min(len(r[key]) for r in group)
  ys = np.array([r[key][:n] for r in group], dtype=float)
  xs = np.array([r[x_key][:n] for r in group], dtype=float).mean(0)
  return xs, ys.mean(0), ys.std(0)


def plot_curves(
  runs: Sequence[Mapping[str, Any]],
  tasks: Mapping[str, Any],
  path: str,
  x_keys: Sequence[str] = ('eval_steps', 'wall_time'),
) -> str:
  """The metric against steps and against training wall-clock, one row per task.

  Lines are means over seeds, bands ± one standard deviation; a task's published
  references are dashed grey lines.
  """
  plt = _pyplot()
  by_task = _by_task(runs)
  fig, axes = plt.subplots(
    len(by_task), len(x_keys), figsize=(6.5 * len(x_keys), 3.8 * len(by_task)), squeeze=False
  )
  xlabels = {'eval_steps': 'step', 'wall_time': 'training wall-clock (s)'}
  for row, (task_name, groups) in enumerate(by_task.items()):
    task = tasks[task_name]
    for col, x_key in enumerate(x_keys):
      ax = axes[row, col]
      for label, group in groups.items():
        xs, mean, std = _mean_curve(group, 'metric', x_key)
        (line,) = ax.plot(xs, mean, label=f'{label} (n={len(group)})')
        if len(group) > 1:
          ax.fill_between(xs, mean - std, mean + std, color=line.get_color(), alpha=0.2)
      for name, value in task.references.items():
        ax.axhline(
          value,
          color='gray',
          ls='--',
          lw=1,
          label=f'{name}: {format_value(value, task.metric_kind)}',
        )
      if not task.higher_is_better:
        ax.set_yscale('log')
      ax.set(
        xlabel=xlabels.get(x_key, x_key), ylabel=task.metric, title=f'{task.label}: {task.metric}'
      )
      ax.grid(alpha=0.3)
      ax.legend(fontsize=7)
  return _save(fig, path)


def plot_diagnostics(
  runs: Sequence[Mapping[str, Any]],
  tasks: Mapping[str, Any],
  path: str,
  keys: Sequence[str] = ('grad_sq_norm', 'cos_g_hg', 'meta_norm'),
) -> str:
  """Per-step ‖g‖² (every optimizer), cos(g, H·g) and ‖m⊥‖ (F3EO), means over seeds."""
  plt = _pyplot()
  by_task = _by_task(runs)
  titles = {
    'grad_sq_norm': 'minibatch ‖g‖² (Fisher-trace estimate)',
    'cos_g_hg': 'cos(g, H·g)',
    'meta_norm': '‖m⊥‖ (meta term applied)',
    'cap_scale': 'relative-cap factor',
  }
  fig, axes = plt.subplots(
    len(by_task), len(keys), figsize=(6 * len(keys), 3.6 * len(by_task)), squeeze=False
  )
  for row, (task_name, groups) in enumerate(by_task.items()):
    for col, key in enumerate(keys):
      ax = axes[row, col]
      for label, group in groups.items():
        series = [r['step_values'].get(key) for r in group]
        if any(s is None for s in series):
          continue
        n = min(len(s) for s in series)
        every = group[0].get('step_values_every', 1)
        values = np.nanmean(np.array([s[:n] for s in series], dtype=float), axis=0)
        width = max(1, min(25 // every, n // 10))
        if width > 1:
          values = np.convolve(values, np.ones(width) / width, mode='valid')
        ax.plot(every * (np.arange(len(values)) + width), values, label=label)
      if key in ('grad_sq_norm', 'meta_norm'):
        ax.set_yscale('log')
      ax.set(xlabel='step', title=f'{tasks[task_name].label}: {titles.get(key, key)}')
      ax.grid(alpha=0.3)
      if ax.lines:
        ax.legend(fontsize=7)
  return _save(fig, path)


def pivot_table(
  cells: Mapping[str, Mapping[str, str]],
  columns: Sequence[str],
  extra: Mapping[str, Mapping[str, str]] | None = None,
  first: str = 'optimizer',
) -> str:
  """Rows × columns of ready-made cells (``cells[row][column]``; missing cells are blank).

  ``extra`` adds columns after ``columns``: ``extra[column_name][row]``.
  """
  extra = extra or {}
  header = [first, *columns, *extra]
  body = [
    [row, *(cells[row].get(c, '') for c in columns), *(e.get(row, '') for e in extra.values())]
    for row in cells
  ]
  return markdown_table(header, body)
