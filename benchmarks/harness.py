"""Training runs: one run, a sweep, seeds, step timing, equal wall-clock.

Example:
  >>> from benchmarks import config, harness, tasks
  >>> task = tasks.get('regression', hidden=(8,), n_train=64, n_test=32)
  >>> cfg = harness.RunConfig(config.get('adamw'), 1e-2, num_steps=20, batch_size=16)
  >>> harness.train_and_evaluate(cfg, task, task.load())['steps_done']
  20
"""

from __future__ import annotations

import collections
import dataclasses
import functools
import math
import time

import jax
import numpy as np

from benchmarks import config, steps
from benchmarks import data as data_lib

VALIDATION_FRACTION = 0.1


@dataclasses.dataclass(frozen=True)
class RunConfig:
  """One training run: cosine decay from ``learning_rate`` to 0 over ``num_steps``."""

  variant: config.Variant
  learning_rate: float
  weight_decay: float | None = None  # None: config.WEIGHT_DECAY (none for SGD)
  num_steps: int = 1000
  batch_size: int | None = None  # None: the task's
  eval_every: int | None = None  # None: ten evaluations per run
  seed: int = 0
  train_subset: int | None = None  # train on the first N examples (smoke runs)


Compiled = collections.namedtuple('Compiled', 'model train_step eval_step init compile_s')


class StepCache(dict):
  """Compiled steps per (task sizes, optimizer, batch shape); runs record compile seconds."""

  def get(self, task, variant: config.Variant, data, batch) -> tuple[Compiled, float]:
    shape = (tuple(np.shape(batch[0])), str(np.asarray(batch[0]).dtype))
    key = (task.model_key(), variant.kind, variant.options, variant.schedule, shape)
    if key in self:
      return self[key], 0.0
    start = time.perf_counter()
    model = task.make_model(data)
    hp = steps.hyperparams(variant, 1.0, None, 1.0)
    init_fn = jax.jit(functools.partial(steps.init_variables, model, batch[0]))
    tx = steps.make_tx(variant, hp)
    init = functools.partial(steps.create_train_state, model, tx, batch[0], init_fn=init_fn)
    fn = functools.partial(steps.train_step, model=model, loss=task.loss, variant=variant)
    train, _ = steps.compile_step(fn, (jax.eval_shape(init, 0), *batch, hp), variant)
    evaluate = jax.jit(functools.partial(steps.eval_step, model=model, task=task))
    self[key] = Compiled(model, train, evaluate, init, time.perf_counter() - start)
    return self[key], self[key].compile_s


def evaluate(eval_fn, state, x, y, batch_size: int = 1000) -> tuple[float, float]:
  """Mean loss and mean metric over ``(x, y)``, in batches."""
  totals = np.zeros(3)
  for i in range(0, len(x), batch_size):
    out = eval_fn(state, x[i : i + batch_size], y[i : i + batch_size])
    totals += [float(out['loss_sum']), float(out['metric_sum']), float(out['count'])]
  return totals[0] / totals[2], totals[1] / totals[2]


def _prepare(cfg: RunConfig, task, data, cache: StepCache):
  data = data_lib.take_train(data, cfg.train_subset)
  batch_size = min(cfg.batch_size or task.batch_size, len(getattr(data, 'x_train', range(10**9))))
  batch_iter = task.batches(data, batch_size, cfg.seed)
  first = next(batch_iter)
  compiled, compile_s = cache.get(task, cfg.variant, data, first)
  if cfg.variant.schedule == 'python':
    compiled.train_step.count = None  # read the schedule's position from the new state
  hp = steps.hyperparams(cfg.variant, cfg.learning_rate, cfg.weight_decay, cfg.num_steps)
  return data, batch_iter, first, compiled, compile_s, hp


def train_and_evaluate(cfg: RunConfig, task, data, *, cache: StepCache | None = None) -> dict:
  """Trains one model, evaluating on ``data.x_test`` ten times (or every ``eval_every``).

  Returns a JSON-serialisable dict: the history (``wall_time``: training seconds, without
  compiling or evaluating), per-step values, F3EO's counters, the final metric (the task's
  worst if a non-finite loss stopped the run: ``diverged``), timings.
  """
  data, batch_iter, batch, compiled, compile_s, hp = _prepare(
    cfg, task, data, StepCache() if cache is None else cache
  )
  state = compiled.init(cfg.seed)
  eval_every = cfg.eval_every or max(1, cfg.num_steps // 10)
  history: dict = {k: [] for k in ('eval_steps', 'metric', 'eval_loss', 'train_loss', 'wall_time')}

  def record(*values):
    eval_loss, metric = evaluate(compiled.eval_step, state, data.x_test, data.y_test)
    for k, v in zip(history, (values[0], metric, eval_loss, *values[1:])):
      history[k].append(float(v))

  record(0, math.nan, 0.0)
  step_values, counters, train_time, window, diverged = {}, {}, 0.0, [], False
  start = time.perf_counter()
  for step in range(1, cfg.num_steps + 1):
    state, metrics = compiled.train_step(state, *batch, hp)
    window.append(metrics)
    batch = next(batch_iter) if step < cfg.num_steps else None
    if step % eval_every and step != cfg.num_steps:
      continue
    window = jax.device_get(window)
    train_time += time.perf_counter() - start
    counters.update({k: int(v) for k, v in window[-1].items() if k in steps.COUNTERS})
    for k in (k for k in window[0] if k not in steps.COUNTERS):
      step_values.setdefault(k, []).extend(float(m[k]) for m in window)
    losses = np.array([m['loss'] for m in window], dtype=float)
    window, diverged = [], not np.all(np.isfinite(losses))
    record(step, float(losses.mean()), train_time)
    if diverged:
      break  # the run is reported as diverged
    start = time.perf_counter()
  finite = [v for v in history['metric'] if np.isfinite(v)]
  done = int(history['eval_steps'][-1])
  out = dict(config=dataclasses.asdict(cfg), task=task.name, variant=cfg.variant.name, **history)
  out.update(label=cfg.variant.label, step_values=step_values, counters=counters, diverged=diverged)
  out['final_metric'] = task.worst() if diverged else history['metric'][-1]
  out['best_metric'] = (max if task.higher_is_better else min)(finite or [task.worst()])
  out.update(final_eval_loss=history['eval_loss'][-1], final_train_loss=history['train_loss'][-1])
  speed = done / train_time if train_time > 0 else math.nan
  return dict(
    out, steps_done=done, train_time_s=train_time, steps_per_s=speed, compile_time_s=compile_s
  )


def sweep(base: RunConfig, task, data, *, run_fn=None, cache=None):
  """The (lr, weight decay) of the variant's sweep with the best metric on the validation
  split (the last 10% of the training data; ties: the first), and every candidate's."""
  run_fn = run_fn or functools.partial(train_and_evaluate, cache=cache)
  validation = data.validation_split(VALIDATION_FRACTION)
  records, best = [], None
  for lr, wd in base.variant.candidates(task.lr_scale):
    wd = base.weight_decay if wd is None else wd
    run = run_fn(dataclasses.replace(base, learning_rate=lr, weight_decay=wd), task, validation)
    records.append(dict(learning_rate=lr, weight_decay=wd, metric=run['final_metric']))
    if best is None or task.better(run['final_metric'], best[2]):
      best = (lr, wd, run['final_metric'])
  return best[:2], records


def run_protocol(base: RunConfig, task, data, *, seeds=(0,), tune=False, run_fn=None, cache=None):
  """Optionally tunes on the validation split, then one run per seed on all the training data."""
  run_fn = run_fn or functools.partial(train_and_evaluate, cache=cache)
  chosen, records = None, []
  if tune:
    chosen, records = sweep(base, task, data, run_fn=run_fn)
    base = dataclasses.replace(base, learning_rate=chosen[0], weight_decay=chosen[1])
  runs = [run_fn(dataclasses.replace(base, seed=s), task, data) for s in seeds]
  return {'chosen': chosen, 'sweep': records, 'runs': runs}


def compare(configs: dict, task, data, *, seeds=(0,), tune=False, run_fn=None, cache=None):
  """:func:`run_protocol` of each config; returns the results and the tuned configs."""
  results, tuned = {}, {}
  for name, cfg in configs.items():
    res = run_protocol(cfg, task, data, seeds=seeds, tune=tune, run_fn=run_fn, cache=cache)
    lr, wd = res['chosen'] or (cfg.learning_rate, cfg.weight_decay)
    results[name], tuned[name] = res, dataclasses.replace(cfg, learning_rate=lr, weight_decay=wd)
    print(f'{task.name}/{name}: {[r["final_metric"] for r in res["runs"]]}', flush=True)
  return results, tuned


def time_steps(configs: dict[str, RunConfig], task, data, *, cache=None, rounds=5, block=10):
  """Seconds per step (median of interleaved rounds) and paired ratio to the first config."""
  cache = StepCache() if cache is None else cache
  blocks = {}
  for name, cfg in configs.items():
    _, _, batch, compiled, _, hp = _prepare(cfg, task, data, cache)
    batch = tuple(jax.device_put(b) for b in batch)
    state = [compiled.train_step(compiled.init(cfg.seed), *batch, hp)[0]]  # warm-up
    blocks[name] = steps.block_timer(compiled.train_step, state, (*batch, hp), block)
  times = steps.interleaved(blocks, rounds)
  first = times[next(iter(configs))]
  return {
    n: {'step_s': float(np.median(t)), 'per_round_s': t, 'ratio': steps.paired_ratio(t, first)}
    for n, t in times.items()
  }


def equal_wall_clock(configs, reference, task, data, *, seeds=(0,), cache=None, run_fn=None):
  """Each config re-run for ``num_steps × t_reference / t_config`` steps (same wall-clock):
  ``{name: {'step_s', 'ratio', 'steps', 'runs'}}``; no runs within 5% of ``num_steps``."""
  run_fn = run_fn or functools.partial(train_and_evaluate, cache=cache)
  times = time_steps({reference: configs[reference], **configs}, task, data, cache=cache)
  out = {}
  for name, cfg in configs.items():
    budget = max(1, round(cfg.num_steps / times[name]['ratio']))
    rerun = [] if abs(budget - cfg.num_steps) <= 0.05 * cfg.num_steps else seeds
    runs = [run_fn(dataclasses.replace(cfg, num_steps=budget, seed=s), task, data) for s in rerun]
    out[name] = dict(times[name], steps=budget, runs=runs)
  return out
