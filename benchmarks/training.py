"""The training harness of the benchmarks: one run, a sweep, and step timing.

Everything a run needs is in a :class:`Config` (plain data) and a task from
``benchmarks/tasks.py``; the optimizer comes from ``benchmarks/registry.py``. The step is
pure and jitted with the state donated. The peak learning rate, the weight decay and the
cosine schedule's horizon are traced inputs of the compiled step, so a sweep, its seeds
and runs of other lengths share one compilation per (task, optimizer); a
:class:`StepCache` holds the compiled steps and says what compiling them cost.

F3EO's ``obj_fn`` comes from ``f3eo_jax.flax.linen_value_grad_and_obj_fn``: the same
batch, the same dropout key and the same pre-step batch statistics as the gradient.

Example:
  >>> from benchmarks import tasks, training
  >>> task = tasks.get('regression', hidden=(8,), n_train=64, n_test=32)
  >>> config = training.Config(task='regression', optimizer='adamw', learning_rate=1e-2,
  ...                          num_steps=20, batch_size=16)
  >>> run = training.train_and_evaluate(config, task, task.load(), progress=False)
  >>> run['steps_done'], run['diverged']
  (20, False)
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import os
import platform
import time
from collections.abc import Mapping, Sequence
from typing import Any

import flax
import jax
import jax.numpy as jnp
import numpy as np
import optax

import f3eo_jax
from benchmarks import registry, reporting, timing
from benchmarks import tasks as tasks_lib
from f3eo_jax import flax as f3eo_flax

# Per-step values kept from f3eo_jax.diagnostics (those the installed library has), and
# the counters read once at the end of a run.
STEP_DIAGNOSTICS = ('grad_sq_norm', 'cos_g_hg', 'meta_norm', 'cap_scale', 'grad_mismatch')
COUNTERS = ('cap_count', 'nonfinite_count', 'mismatch_count')
VALIDATION_FRACTION = 0.1


@dataclasses.dataclass(frozen=True)
class Config:
  """One training run, as plain data.

  Attributes:
    task: the task's name (the :class:`tasks.Task` itself is passed beside the config).
    optimizer: a registry name.
    learning_rate: the peak learning rate; a cosine decays it to 0 over ``num_steps``.
    weight_decay: decoupled weight decay; ``None`` is the registry's default (none for SGD).
    num_steps: optimizer steps.
    batch_size: examples per step (``None``: the task's).
    eval_every: evaluate every this many steps (``None``: ten evaluations per run).
    seed: seeds the initialisation, the batch order and dropout.
    train_subset: train on the first this many examples only (smoke tests).
    overrides: further optimizer options, as ``((name, value), ...)``, e.g.
      ``(('hvp_every', 10),)``; checked by :func:`registry.make`.
  """

  task: str
  optimizer: str
  learning_rate: float
  weight_decay: float | None = None
  num_steps: int = 1000
  batch_size: int | None = None
  eval_every: int | None = None
  seed: int = 0
  train_subset: int | None = None
  overrides: tuple[tuple[str, Any], ...] = ()

  def variant(self) -> registry.Variant:
    """The registry variant with this config's overrides bound."""
    return registry.get(self.optimizer).with_overrides(**dict(self.overrides))

  def key(self) -> str:
    """A stable string naming this run (for caches of finished runs)."""
    return json.dumps(dataclasses.asdict(self), sort_keys=True, default=str)


@flax.struct.dataclass
class TrainState:
  """Everything a step updates, as arrays (the model and optimizer are static)."""

  step: jax.Array  # int32 scalar: steps taken.
  params: Any  # the 'params' collection.
  model_state: Any  # the other collections ('batch_stats'), {} if none.
  opt_state: Any
  rng: jax.Array  # the run's dropout key; step i uses fold_in(rng, i).


def cosine_schedule(peak: jax.Array, horizon: jax.Array) -> optax.Schedule:
  """``peak · ½(1 + cos(π·min(t, T)/T))``: ``optax.cosine_decay_schedule`` with a traced ``T``."""

  def schedule(count):
    frac = jnp.minimum(count, horizon) / horizon
    return peak * 0.5 * (1.0 + jnp.cos(jnp.pi * frac))

  return schedule


def make_tx(
  variant: registry.Variant, hparams: Mapping[str, jax.Array]
) -> optax.GradientTransformation:
  """The variant's optimizer with a cosine schedule, from (possibly traced) ``hparams``."""
  schedule = cosine_schedule(hparams['learning_rate'], hparams['horizon'])
  return registry.make(variant, schedule, weight_decay=hparams.get('weight_decay'))


def hyperparams(
  variant: registry.Variant, learning_rate, weight_decay, horizon
) -> dict[str, jax.Array]:
  """The traced inputs of a step: peak learning rate, horizon and (if any) weight decay."""
  out = {'learning_rate': jnp.float32(learning_rate), 'horizon': jnp.float32(horizon)}
  if variant.has_weight_decay:
    wd = registry.DEFAULT_WEIGHT_DECAY if weight_decay is None else weight_decay
    out['weight_decay'] = jnp.float32(wd)
  elif weight_decay is not None:
    registry.make(variant, 1.0, weight_decay=weight_decay)  # raises, naming the variant
  return out


def init_variables(model, example_x, seed):
  """The model's variables from ``seed`` (jit it once per model and input shape)."""
  init_key, _ = jax.random.split(jax.random.key(seed))
  return model.init(init_key, jnp.asarray(example_x), train=False)


def create_train_state(model, tx, example_x, seed: int, *, init_fn=None) -> TrainState:
  """Initialises the model from ``seed`` (through ``init_fn``, if given) and the optimizer."""
  init_fn = init_fn or functools.partial(init_variables, model, example_x)
  variables = dict(init_fn(seed))
  _, dropout_key = jax.random.split(jax.random.key(seed))
  params = variables.pop('params')
  return TrainState(
    step=jnp.zeros((), jnp.int32),
    params=params,
    model_state=variables,
    opt_state=tx.init(params),
    rng=dropout_key,
  )


def train_step(state: TrainState, x, y, hparams, *, model, task, variant):
  """One optimizer step; pure (jit it, donating ``state``).

  Args:
    state: the current :class:`TrainState`.
    x: a batch of inputs.
    y: its targets.
    hparams: ``{'learning_rate', 'horizon'[, 'weight_decay']}`` float32 scalars.
    model: the Flax module.
    task: the :class:`tasks.Task` (its loss).
    variant: the :class:`registry.Variant`.

  Returns:
    The new state, and the step's ``loss``, ``grad_sq_norm`` (‖g‖²) and, for the F3EO
    family, the other :data:`STEP_DIAGNOSTICS` and :data:`COUNTERS`.
  """
  tx = make_tx(variant, hparams)
  (loss, model_state), grads, obj_fn = f3eo_flax.linen_value_grad_and_obj_fn(
    model.apply,
    {'params': state.params, **state.model_state},
    lambda out: task.loss(out, y).mean(),
    x,
    train=True,
    rngs={'dropout': jax.random.fold_in(state.rng, state.step)},
  )
  if variant.uses_obj_fn:
    updates, opt_state = tx.update(grads, state.opt_state, state.params, obj_fn=obj_fn)
    diag = f3eo_jax.diagnostics(opt_state)
    metrics = {k: diag[k] for k in (*STEP_DIAGNOSTICS, *COUNTERS) if k in diag}
  else:
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    metrics = {'grad_sq_norm': optax.tree.norm(grads, squared=True)}
  new_state = state.replace(
    step=state.step + 1,
    params=optax.apply_updates(state.params, updates),
    model_state=model_state,
    opt_state=opt_state,
  )
  return new_state, {'loss': loss, **metrics}


def eval_step(state: TrainState, x, y, *, model, task) -> dict[str, jax.Array]:
  """Sums of the loss and of the metric's values over a batch, with the eval-mode model."""
  out = model.apply({'params': state.params, **state.model_state}, x, train=False)
  losses, values = task.loss(out, y), task.metric_values(out, y)
  return {'loss_sum': losses.sum(), 'metric_sum': values.sum(), 'count': jnp.float32(losses.size)}


def evaluate(eval_fn, state: TrainState, x: np.ndarray, y: np.ndarray, batch_size: int = 1000):
  """Mean loss and mean metric over ``(x, y)``, in batches."""
  totals = np.zeros(3)
  for start in range(0, len(x), batch_size):
    out = eval_fn(state, x[start : start + batch_size], y[start : start + batch_size])
    totals += [float(out['loss_sum']), float(out['metric_sum']), float(out['count'])]
  return totals[0] / totals[2], totals[1] / totals[2]


@dataclasses.dataclass
class Compiled:
  """A task's model and an optimizer's compiled steps, with the time compiling took."""

  model: Any
  train_step: Any
  eval_step: Any
  init: Any
  compile_time_s: float


class StepCache:
  """Compiled steps per (task, optimizer, batch shape), built on first use.

  Each :meth:`get` returns the entry and the seconds it spent compiling the training step
  (0 when the entry was already there), so every run records its own compile time, with
  no globals. The evaluation step is shared by all optimizers of a task.
  """

  def __init__(self):
    self._entries: dict[Any, Compiled] = {}
    self._evals: dict[Any, Any] = {}
    self._inits: dict[Any, Any] = {}

  def get(
    self, task: tasks_lib.Task, variant: registry.Variant, data, batch
  ) -> tuple[Compiled, float]:
    task_key = task.model_key()
    # Variants that build the same optimizer (adamw, adamw_wd) share a compiled step.
    key = (
      *task_key,
      variant.build,
      repr(sorted(variant.options.items())),
      variant.has_weight_decay,
      variant.uses_obj_fn,
      tuple(np.shape(batch[0])),
      str(np.asarray(batch[0]).dtype),
    )
    if key in self._entries:
      return self._entries[key], 0.0
    t0 = time.perf_counter()
    model = task.make_model(data)
    hp = hyperparams(variant, 1.0, None, 1.0)
    shape_key = (*task_key, tuple(np.shape(batch[0])))
    if shape_key not in self._inits:
      self._inits[shape_key] = jax.jit(functools.partial(init_variables, model, batch[0]))
    init = functools.partial(
      create_train_state, model, make_tx(variant, hp), batch[0], init_fn=self._inits[shape_key]
    )
    state = jax.eval_shape(init, 0)
    step = (
      jax.jit(
        functools.partial(train_step, model=model, task=task, variant=variant), donate_argnums=0
      )
      .lower(state, *batch, hp)
      .compile()
    )
    if task_key not in self._evals:
      self._evals[task_key] = jax.jit(functools.partial(eval_step, model=model, task=task))
    entry = Compiled(model, step, self._evals[task_key], init, time.perf_counter() - t0)
    self._entries[key] = entry
    return entry, entry.compile_time_s


def _progress(total: int, desc: str, enabled: bool):
  if not enabled:
    return None
  from tqdm.auto import tqdm

  return tqdm(total=total, desc=desc, leave=False, dynamic_ncols=True)


def train_and_evaluate(
  config: Config,
  task: tasks_lib.Task,
  data: tasks_lib.Data,
  *,
  cache: StepCache | None = None,
  progress: bool = True,
  desc: str = '',
) -> dict[str, Any]:
  """Trains one model with one optimizer and evaluates it along the way.

  Args:
    config: the run.
    task: the task (model, loss, metric, batches).
    data: the task's data; its ``x_test``/``y_test`` are evaluated (in a sweep, pass
      ``data.validation_split(...)``).
    cache: compiled steps to share between runs; a new one if ``None``.
    progress: show a tqdm progress bar.
    desc: the progress bar's label.

  Returns:
    A JSON-serialisable dict: ``config``; the history ``eval_steps``, ``metric``,
    ``eval_loss``, ``train_loss`` (mean since the previous evaluation), ``wall_time``
    (training seconds, excluding compilation and evaluation); per-step values
    ``step_values`` (``loss``, ``grad_sq_norm`` and F3EO's diagnostics); ``counters``
    (F3EO's cap, non-finite and mismatch counts at the end); and ``final_metric``,
    ``best_metric``, ``final_eval_loss``, ``final_train_loss``, ``diverged`` (a
    non-finite training loss stopped the run), ``steps_done``, ``train_time_s``,
    ``steps_per_s``, ``compile_time_s``.
  """
  cache = StepCache() if cache is None else cache
  variant = config.variant()
  data = tasks_lib.take_train(data, config.train_subset)
  batch_size = config.batch_size or task.batch_size
  if hasattr(data, 'x_train'):
    batch_size = min(batch_size, len(data.x_train))
  eval_every = config.eval_every or max(1, config.num_steps // 10)
  batch_iter = task.batches(data, batch_size, config.seed)
  first = next(batch_iter)
  compiled, compile_time = cache.get(task, variant, data, first)
  state = compiled.init(config.seed)
  hp = hyperparams(variant, config.learning_rate, config.weight_decay, config.num_steps)
  x_eval, y_eval = data.x_test, data.y_test

  history = {k: [] for k in ('eval_steps', 'metric', 'eval_loss', 'train_loss', 'wall_time')}

  def record(step, train_loss, wall):
    eval_loss, metric = evaluate(compiled.eval_step, state, x_eval, y_eval)
    for k, v in zip(history, (step, metric, eval_loss, train_loss, wall)):
      history[k].append(float(v))

  record(0, math.nan, 0.0)
  step_values: dict[str, list[float]] = {}
  counters: dict[str, int] = {}
  bar = _progress(config.num_steps, desc or f'{task.name}/{variant.name}', progress)
  train_time, window, diverged, batch = 0.0, [], False, first
  t0 = time.perf_counter()
  for step in range(1, config.num_steps + 1):
    state, metrics = compiled.train_step(state, *batch, hp)
    window.append(metrics)
    batch = next(batch_iter) if step < config.num_steps else None
    if step % eval_every and step != config.num_steps:
      continue
    window = jax.device_get(window)
    train_time += time.perf_counter() - t0
    for m in window:
      for k, v in m.items():
        if k in COUNTERS:
          counters[k] = int(v)
        else:
          step_values.setdefault(k, []).append(float(v))
    losses = np.array([m['loss'] for m in window], dtype=float)
    window = []
    diverged = not np.all(np.isfinite(losses))
    record(step, float(losses.mean()), train_time)
    if bar is not None:
      bar.update(step - bar.n)
      bar.set_postfix(loss=f'{losses.mean():.3g}', metric=f'{history["metric"][-1]:.4g}')
    if diverged:
      break  # stop spending the budget; the run is reported as diverged
    t0 = time.perf_counter()
  if bar is not None:
    bar.close()
  steps_done = history['eval_steps'][-1]
  finite = [v for v in history['metric'] if np.isfinite(v)]
  best = (max if task.higher_is_better else min)(finite) if finite else task.worst()
  wd = None
  if variant.has_weight_decay:
    wd = registry.DEFAULT_WEIGHT_DECAY if config.weight_decay is None else config.weight_decay
  return {
    'config': dataclasses.asdict(config),
    'task': task.name,
    'variant': variant.name,
    'label': variant.label,
    'learning_rate': config.learning_rate,
    'weight_decay': wd,
    **history,
    'step_values': step_values,
    'counters': counters,
    'final_metric': task.worst() if diverged else history['metric'][-1],
    'best_metric': best,
    'final_eval_loss': history['eval_loss'][-1],
    'final_train_loss': history['train_loss'][-1],
    'diverged': diverged,
    'steps_done': int(steps_done),
    'train_time_s': train_time,
    'steps_per_s': steps_done / train_time if train_time > 0 else math.nan,
    'compile_time_s': compile_time,
  }


def sweep(
  base: Config,
  task: tasks_lib.Task,
  data: tasks_lib.Data,
  candidates: Sequence[registry.Hyperparams] | None = None,
  *,
  cache: StepCache | None = None,
  progress: bool = True,
  run_fn=None,
) -> tuple[registry.Hyperparams, list[dict[str, Any]]]:
  """Picks the hyperparameters with the best final metric on a validation split.

  The validation split is the last :data:`VALIDATION_FRACTION` of the training data;
  the test data are never seen. A diverged candidate scores the task's worst value; ties
  go to the first candidate.

  Args:
    base: the run to tune (its learning rate and weight decay are replaced).
    task: the task; its ``higher_is_better`` orders the candidates.
    data: the task's full data.
    candidates: defaults to the variant's sweep scaled by ``task.lr_scale``.
    cache: compiled steps to share.
    progress: progress bars.
    run_fn: replaces :func:`train_and_evaluate` (e.g. a caching wrapper); same signature.

  Returns:
    The chosen :class:`registry.Hyperparams` (with the weight decay actually used) and
    one record per candidate: ``learning_rate``, ``weight_decay``, ``metric``,
    ``diverged``.
  """
  run_fn = run_fn or train_and_evaluate
  variant = base.variant()
  candidates = candidates or variant.candidates(task.lr_scale)
  validation = data.validation_split(VALIDATION_FRACTION)
  records, best = [], None
  for c in candidates:
    wd = base.weight_decay if c.weight_decay is None else c.weight_decay
    config = dataclasses.replace(base, learning_rate=c.learning_rate, weight_decay=wd)
    run = run_fn(
      config,
      task,
      validation,
      cache=cache,
      progress=progress,
      desc=f'sweep {task.name}/{variant.name} {c.label()}',
    )
    records.append(
      {
        'learning_rate': c.learning_rate,
        'weight_decay': wd,
        'metric': run['final_metric'],
        'diverged': run['diverged'],
      }
    )
    if best is None or task.better(run['final_metric'], best[1]):
      best = (registry.Hyperparams(c.learning_rate, wd), run['final_metric'])
  return best[0], records


def time_steps(
  configs: Mapping[str, Config],
  task: tasks_lib.Task,
  data: tasks_lib.Data,
  *,
  cache: StepCache | None = None,
  rounds: int = 7,
  block: int = 10,
) -> dict[str, dict[str, Any]]:
  """Seconds per compiled training step of each config, by interleaved timing.

  All steps are compiled and warmed up first, each on one fixed batch; then
  :func:`benchmarks.timing.interleaved` runs ``rounds`` rounds of a block of ``block``
  steps of every config, in an order rotating from round to round. Medians over rounds,
  and medians of per-round ratios to the first config, are robust to a machine whose load
  changes: a busy spell slows the whole round.

  Returns:
    ``{name: {'step_s': median seconds per step, 'per_round_s': [...], 'ratio': median of
    per-round ratios to the first config}}``.
  """
  cache = StepCache() if cache is None else cache
  states, blocks = {}, {}
  for name, config in configs.items():
    batch_size = config.batch_size or task.batch_size
    if hasattr(data, 'x_train'):
      batch_size = min(batch_size, len(data.x_train))
    batch = tuple(jax.device_put(b) for b in next(task.batches(data, batch_size, config.seed)))
    variant = config.variant()
    compiled, _ = cache.get(task, variant, data, batch)
    hp = hyperparams(variant, config.learning_rate, config.weight_decay, config.num_steps)
    states[name] = compiled.train_step(compiled.init(config.seed), *batch, hp)[0]  # warm-up

    def run_block(name=name, step_fn=compiled.train_step, batch=batch, hp=hp):
      state = jax.block_until_ready(states[name])
      t0 = time.perf_counter()
      for _ in range(block):
        state, _ = step_fn(state, *batch, hp)
      states[name] = jax.block_until_ready(state)
      return (time.perf_counter() - t0) / block

    blocks[name] = run_block
  per_round = timing.interleaved(blocks, rounds)
  first = per_round[next(iter(configs))]
  return {
    name: {
      'step_s': float(np.median(t)),
      'per_round_s': t,
      'ratio': timing.paired_ratio(t, first),
    }
    for name, t in per_round.items()
  }


def run_protocol(
  base: Config,
  task: tasks_lib.Task,
  data: tasks_lib.Data,
  *,
  seeds: Sequence[int] = (0,),
  tune: bool = False,
  cache: StepCache | None = None,
  progress: bool = True,
  run_fn=None,
) -> dict[str, Any]:
  """Optionally tunes on the validation split, then trains one run per seed on all the data.

  Args:
    base: the run; with ``tune`` its learning rate (and weight decay, where the sweep has
      one) come from :func:`sweep`.
    task: the task.
    data: the task's full data; the final runs are evaluated on its test split.
    seeds: one final run per seed.
    tune: sweep the variant's candidates first.
    cache: compiled steps to share.
    progress: progress bars.
    run_fn: replaces :func:`train_and_evaluate` (e.g. a caching wrapper).

  Returns:
    ``{'chosen': Hyperparams or None, 'sweep': per-candidate records, 'runs': [...]}``.
  """
  run_fn = run_fn or train_and_evaluate
  chosen, records = None, []
  if tune:
    chosen, records = sweep(base, task, data, cache=cache, progress=progress, run_fn=run_fn)
    base = dataclasses.replace(
      base, learning_rate=chosen.learning_rate, weight_decay=chosen.weight_decay
    )
  name = base.variant().name
  runs = [
    run_fn(
      dataclasses.replace(base, seed=seed),
      task,
      data,
      cache=cache,
      progress=progress,
      desc=f'{task.name}/{name} seed {seed}',
    )
    for seed in seeds
  ]
  return {'chosen': chosen, 'sweep': records, 'runs': runs}


def one_line(run: Mapping[str, Any], task: tasks_lib.Task) -> str:
  """A finished run in one line, for the console."""
  metric = 'diverged' if run['diverged'] else f'{run["final_metric"]:.4g}'
  return (
    f'{task.name}/{run["variant"]} seed {run["config"]["seed"]}: {task.metric} {metric},'
    f' {run["steps_done"]} steps in {run["train_time_s"]:.1f} s'
    f' ({run["steps_per_s"]:.0f} steps/s, +{run["compile_time_s"]:.1f} s compile)'
  )


class RunCache:
  """Finished runs stored in a JSON-lines file, so an interrupted study resumes.

  A run is keyed by its :class:`Config`, its task (name and sizes), the data it trained
  on (a validation split is other data) and the F3EO library version. Use
  :meth:`run` in place of :func:`train_and_evaluate`; :meth:`memo` stores any other
  JSON-serialisable result (step timings) under a key.
  """

  def __init__(self, path: str | None):
    self.path = path
    self.entries: dict[str, Any] = {}
    self.hits = 0
    if path is not None and os.path.exists(path):
      with open(path) as f:
        for line in f:
          if line.strip():
            record = json.loads(line)
            self.entries[record['key']] = record['value']

  def _store(self, key: str, value: Any) -> None:
    self.entries[key] = value
    if self.path is not None:
      os.makedirs(os.path.dirname(os.path.abspath(self.path)), exist_ok=True)
      with open(self.path, 'a') as f:
        f.write(json.dumps({'key': key, 'value': value}, default=str) + '\n')

  def memo(self, key: str, fn):
    """``fn()``, computed once per ``key`` and stored."""
    if key in self.entries:
      self.hits += 1
      return self.entries[key]
    value = fn()
    self._store(key, value)
    return value

  def run(
    self, config: Config, task: tasks_lib.Task, data: tasks_lib.Data, **kwargs
  ) -> dict[str, Any]:
    """:func:`train_and_evaluate`, or its stored result (per-step values block-averaged)."""
    key = json.dumps(
      {
        'config': config.key(),
        'task': task.name,
        'sizes': repr(sorted(task.meta.items())),
        'data': getattr(data, 'name', ''),
        'f3eo_jax': f3eo_jax.__version__,
        'python': platform.python_version(),
      },
      sort_keys=True,
    )
    return self.memo(
      key, lambda: reporting.downsample(train_and_evaluate(config, task, data, **kwargs), 200)
    )
