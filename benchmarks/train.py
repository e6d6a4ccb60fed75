r"""F3EO against AdamW (and SGD) on MNIST-1D: accuracy, loss, wall-clock, diagnostics.

With no arguments this is the project's main job: an MLP and a CNN on MNIST-1D
(generated locally, nothing downloaded), F3EO (the theory's rule as is, the theory's
rule with its meta term clipped to norm 1, and the published rule) against AdamW, 1000
steps, one seed, fixed learning rates; it prints a summary table and writes plots,
markdown and JSON to ``benchmarks/results/train_main*``. ``--full`` runs the full
comparison: six optimizers, a learning-rate sweep on a validation split carved from the training
set, three seeds (``benchmarks/results/train_full*``).

Every optimizer gets the same step budget, batch size, cosine learning-rate decay and
(for the Adam family) the same decoupled weight decay. F3EO's ``obj_fn`` is exactly
the loss that produced the gradient: same batch, same dropout key, same batch-norm
statistics in train mode.

Usage::

  python benchmarks/train.py                     # the main job (a few minutes on 2 CPU cores)
  python benchmarks/train.py --full              # 6 optimizers, lr sweep, 3 seeds
  python benchmarks/train.py --models cnn --optimizers f3eo adamw sgd --steps 500
"""

from __future__ import annotations

import os
import sys

if __package__ in (None, ''):  # run as a script: make the `benchmarks` package importable
  sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import argparse
import dataclasses
import datetime
import functools
import json
import platform
import shlex
import time
from collections.abc import Sequence
from typing import Any

import flax
import jax
import jax.numpy as jnp
import numpy as np
import optax

import f3eo_jax
from f3eo_jax import flax as f3eo_flax
from benchmarks import data as data_lib
from benchmarks import models

RESULTS_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), 'results')

# Test accuracy of the baselines published with MNIST-1D (Greydanus & Kobak, README).
PUBLISHED_MNIST1D = {'logistic regression': 0.32, 'mlp': 0.68, 'cnn': 0.94}

MODELS = {
    'mlp': lambda num_classes: models.MLP(hidden=(512, 512), num_classes=num_classes),
    'cnn': lambda num_classes: models.CNN(
        num_classes=num_classes, channels=(32, 64), dense=128, dropout_rate=0.1
    ),
}

# Per optimizer: a label, the learning rate without a sweep, and the sweep's candidates.
OPTIMIZERS = {
    'f3eo': dict(label='F3EO (theory)', learning_rate=3e-3, sweep=(1e-3, 3e-3, 1e-2)),
    'f3eo_reference': dict(
        label='F3EO (published rule)', learning_rate=3e-3, sweep=(1e-3, 3e-3, 1e-2)
    ),
    'f3eo_clip': dict(
        label='F3EO (theory, clip 1)', learning_rate=3e-3, sweep=(1e-3, 3e-3, 1e-2)
    ),
    'f3eo_hvp10': dict(
        label='F3EO (clip 1), hvp_every=10', learning_rate=3e-3, sweep=(1e-3, 3e-3, 1e-2)
    ),
    'adamw': dict(label='AdamW', learning_rate=3e-3, sweep=(1e-3, 3e-3, 1e-2)),
    'sgd': dict(label='SGD, momentum 0.9', learning_rate=3e-2, sweep=(1e-2, 3e-2, 1e-1)),
}
F3EO_FAMILY = ('f3eo', 'f3eo_clip', 'f3eo_reference', 'f3eo_hvp10')


@dataclasses.dataclass(frozen=True)
class Config:
  """One training run, as plain data.

  Attributes:
    dataset: ``'mnist1d'`` or a prepared TFDS dataset (see ``benchmarks/data.py``).
    model: a key of ``MODELS``.
    optimizer: a key of ``OPTIMIZERS``.
    learning_rate: peak learning rate, decayed to 0 by a cosine over ``num_steps``.
    weight_decay: decoupled weight decay for the Adam family (SGD has none).
    batch_size: examples per step.
    num_steps: optimizer steps.
    eval_every: evaluate on the full test split every this many steps.
    seed: seeds the initialisation, the batch order and dropout.
    train_subset: use only the first this many training examples (smoke tests).
    check_consistency: passed to F3EO: relative tolerance of ``obj_fn`` against ``g``.
    meta_coef: ``meta_coef`` of the ``'f3eo'`` optimizer (the theory's rule).
    hvp_every: ``hvp_every`` of the ``'f3eo'`` optimizer.
    meta_clip_norm: ``meta_clip_norm`` of the ``'f3eo'`` optimizer (None: no clipping).
    data_dir: TFDS data directory (TFDS datasets only).
  """

  dataset: str = 'mnist1d'
  model: str = 'mlp'
  optimizer: str = 'f3eo'
  learning_rate: float = 3e-3
  weight_decay: float = 1e-4
  batch_size: int = 128
  num_steps: int = 1000
  eval_every: int = 100
  seed: int = 0
  train_subset: int | None = None
  check_consistency: float | None = None
  meta_coef: float = 1.0
  hvp_every: int = 1
  meta_clip_norm: float | None = None
  data_dir: str | None = None


@flax.struct.dataclass
class TrainState:
  """Everything a step updates: pure arrays, no callables."""

  step: jax.Array  # int32 scalar.
  params: Any  # the model's 'params' collection.
  batch_stats: Any  # the model's 'batch_stats' collection ({} for models without BatchNorm).
  opt_state: Any  # the optimizer's state.


def make_optimizer(
    config: Config, learning_rate: float | jax.Array | None = None
) -> optax.GradientTransformationExtraArgs:
  """The optimizer named by ``config.optimizer``, with a cosine-decayed learning rate.

  Args:
    config: the run's configuration.
    learning_rate: the peak learning rate, a float or a traced scalar (so one compiled
      step serves every learning rate of a sweep); defaults to ``config.learning_rate``.

  Returns:
    An Optax transformation; the F3EO ones need ``obj_fn=`` in ``update``.
  """
  peak = config.learning_rate if learning_rate is None else learning_rate
  lr = optax.cosine_decay_schedule(peak, config.num_steps)
  wd = config.weight_decay
  name = config.optimizer
  if name == 'f3eo':
    return f3eo_jax.f3eo(
        lr, weight_decay=wd, meta_coef=config.meta_coef, hvp_every=config.hvp_every,
        meta_clip_norm=config.meta_clip_norm, check_consistency=config.check_consistency,
    )
  if name in ('f3eo_clip', 'f3eo_hvp10'):
    # The theory's rule with the meta term's norm clipped to 1, as the published rule clips.
    return f3eo_jax.f3eo(
        lr, weight_decay=wd, meta_clip_norm=1.0, hvp_every=10 if name == 'f3eo_hvp10' else 1,
        check_consistency=config.check_consistency,
    )
  if name == 'f3eo_reference':
    if config.check_consistency is not None:
      raise ValueError(
          'f3eo_reference has no check_consistency option; check the shared train_step with'
          " optimizer='f3eo'."
      )
    return f3eo_jax.f3eo_reference(lr, weight_decay=wd)
  if name == 'adamw':
    return optax.adamw(lr, weight_decay=wd)
  if name == 'sgd':
    return optax.sgd(lr, momentum=0.9)
  raise ValueError(f'unknown optimizer {name!r}; choose from {sorted(OPTIMIZERS)}.')


def create_train_state(
    config: Config, model: Any, tx: optax.GradientTransformation, example_x: np.ndarray
) -> TrainState:
  """Initialises the model's variables and the optimizer state from ``config.seed``."""
  variables = model.init(jax.random.key(config.seed), jnp.asarray(example_x), train=False)
  params = variables['params']
  return TrainState(
      step=jnp.zeros((), jnp.int32),
      params=params,
      batch_stats=variables.get('batch_stats', {}),
      opt_state=tx.init(params),
  )


def train_step(
    state: TrainState,
    x: jax.Array,
    y: jax.Array,
    dropout_key: jax.Array,
    learning_rate: jax.Array,
    *,
    model: Any,
    config: Config,
) -> tuple[TrainState, dict[str, jax.Array]]:
  """One optimizer step on one batch; pure, meant to be jitted.

  The loss is a function of the params only, with the batch, the dropout key and the
  incoming batch statistics fixed, so the ``obj_fn`` F3EO differentiates twice is
  exactly the function whose gradient is ``grads``. BatchNorm runs in train mode
  (batch statistics); its running averages are updated once, from the same forward.

  Args:
    state: the current :class:`TrainState`.
    x: a batch of inputs.
    y: its integer labels.
    dropout_key: the PRNG key for this step's dropout.
    learning_rate: the peak learning rate (a scalar; the schedule is in ``config``).
    model: a Flax module with ``__call__(x, train)``.
    config: the run's configuration (static: optimizer, steps, weight decay).

  Returns:
    The new state, and the step's ``loss``, ``accuracy``, ``grad_sq_norm`` (‖g‖²) and
    ``cos_g_hg`` (cos(g, H·g); NaN for optimizers that do not compute ``H·g``).
  """

  tx = make_optimizer(config, learning_rate)
  ((loss, logits), model_state), grads, obj_fn = f3eo_flax.linen_value_grad_and_obj_fn(
      model.apply,
      {'params': state.params, 'batch_stats': state.batch_stats},
      lambda logits: (models.cross_entropy(logits, y), logits),
      x,
      train=True,
      rngs={'dropout': dropout_key},
      mutable=['batch_stats'],
      has_aux=True,
  )
  batch_stats = model_state.get('batch_stats', {})
  if config.optimizer in F3EO_FAMILY:
    updates, opt_state = tx.update(grads, state.opt_state, state.params, obj_fn=obj_fn)
    diag = f3eo_jax.diagnostics(opt_state)
    grad_sq_norm, cos_g_hg = diag['grad_sq_norm'], diag['cos_g_hg']
  else:
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    grad_sq_norm = optax.tree.norm(grads, squared=True)
    cos_g_hg = jnp.full((), jnp.nan, jnp.float32)
  new_state = TrainState(
      step=state.step + 1,
      params=optax.apply_updates(state.params, updates),
      batch_stats=batch_stats,
      opt_state=opt_state,
  )
  metrics = {
      'loss': loss,
      'accuracy': jnp.mean(jnp.argmax(logits, -1) == y),
      'grad_sq_norm': grad_sq_norm.astype(jnp.float32),
      'cos_g_hg': cos_g_hg.astype(jnp.float32),
  }
  return new_state, metrics


def eval_step(state: TrainState, x: jax.Array, y: jax.Array, *, model: Any) -> dict[str, jax.Array]:
  """Summed loss and number correct on a batch, with the eval-mode model (running stats)."""
  logits = model.apply({'params': state.params, 'batch_stats': state.batch_stats}, x, train=False)
  losses = optax.softmax_cross_entropy_with_integer_labels(logits, y)
  return {'loss_sum': jnp.sum(losses), 'correct': jnp.sum(jnp.argmax(logits, -1) == y)}


def evaluate(eval_fn, state: TrainState, x: np.ndarray, y: np.ndarray, batch_size: int = 2000):
  """Mean loss and accuracy over the whole split, in batches."""
  loss_sum, correct = 0.0, 0
  for start in range(0, len(y), batch_size):
    out = eval_fn(state, x[start:start + batch_size], y[start:start + batch_size])
    loss_sum += float(out['loss_sum'])
    correct += int(out['correct'])
  return loss_sum / len(y), correct / len(y)


_COMPILE_TIMES: dict[Any, float] = {}


def _static_part(config: Config) -> Config:
  """The config without what the compiled step takes as data (learning rate, seed)."""
  return dataclasses.replace(config, learning_rate=0.0, seed=0)


@functools.lru_cache(maxsize=None)
def _step_functions(static: Config, num_classes: int, batch_shape: tuple[int, ...]):
  """The model and its compiled train and eval steps, built once per static config.

  Learning rate and seed are inputs of the compiled step, so a sweep and its seeds
  share one compilation; its time is recorded for the first run that uses it.
  """
  model = MODELS[static.model](num_classes)
  tx = make_optimizer(static, 1.0)
  x = jnp.zeros(batch_shape, jnp.float32)
  y = jnp.zeros(batch_shape[:1], jnp.int32)
  state = jax.eval_shape(lambda: create_train_state(static, model, tx, x))
  key = jax.random.key(0)
  t0 = time.perf_counter()
  step_fn = (
      jax.jit(functools.partial(train_step, model=model, config=static), donate_argnums=0)
      .lower(state, x, y, key, jnp.zeros((), jnp.float32))
      .compile()
  )
  _COMPILE_TIMES[(static, num_classes)] = time.perf_counter() - t0
  eval_fn = jax.jit(functools.partial(eval_step, model=model))
  return model, step_fn, eval_fn


def train_and_evaluate(
    config: Config, dataset: data_lib.Dataset, *, progress: bool = True, desc: str = ''
) -> dict[str, Any]:
  """Trains one model with one optimizer and evaluates it on the test split.

  Args:
    config: the run's configuration.
    dataset: the data; its test split is the one evaluated (a validation split in a
      learning-rate sweep).
    progress: show a tqdm progress bar.
    desc: the progress bar's label.

  Returns:
    A dict with the config, the evaluation history (``eval_steps``, ``test_accuracy``,
    ``test_loss``, ``train_loss`` averaged since the last evaluation, ``wall_time`` of
    training only), per-step ``grad_sq_norm`` and ``cos_g_hg``, and the summary
    numbers: ``final_accuracy``, ``best_accuracy``, ``final_loss``, ``train_time_s``,
    ``steps_per_s``, ``compile_time_s``.
  """
  x_train, y_train = dataset.x_train, dataset.y_train
  if config.train_subset is not None:
    x_train, y_train = x_train[:config.train_subset], y_train[:config.train_subset]
  batch_size = min(config.batch_size, len(y_train))
  model, step_fn, eval_fn = _step_functions(
      _static_part(config), dataset.num_classes, (batch_size, *x_train.shape[1:])
  )
  compile_time = _COMPILE_TIMES.pop((_static_part(config), dataset.num_classes), 0.0)
  state = create_train_state(config, model, make_optimizer(config), x_train[:batch_size])
  learning_rate = jnp.asarray(config.learning_rate, jnp.float32)
  dropout_base = jax.random.fold_in(jax.random.key(config.seed), 1)
  batch_iter = data_lib.batches(x_train, y_train, batch_size, seed=config.seed)
  x0, y0 = next(batch_iter)

  history = {k: [] for k in ('eval_steps', 'test_accuracy', 'test_loss', 'train_loss', 'wall_time')}
  step_metrics = []
  loss0, acc0 = evaluate(eval_fn, state, dataset.x_test, dataset.y_test)
  for key, value in zip(history, (0, acc0, loss0, float('nan'), 0.0)):
    history[key].append(value)

  bar = None
  if progress:
    from tqdm.auto import tqdm

    bar = tqdm(total=config.num_steps, desc=desc or f'{config.model}/{config.optimizer}', leave=False)
  train_time, window = 0.0, []
  batch = (x0, y0)
  t_start = time.perf_counter()
  for step in range(1, config.num_steps + 1):
    x, y = batch if batch is not None else next(batch_iter)
    batch = None
    state, metrics = step_fn(state, x, y, jax.random.fold_in(dropout_base, step), learning_rate)
    window.append(metrics)
    if step % config.eval_every == 0 or step == config.num_steps:
      jax.block_until_ready(state)
      train_time += time.perf_counter() - t_start
      window = jax.device_get(window)
      step_metrics.extend(window)
      train_loss = float(np.mean([m['loss'] for m in window]))
      window = []
      test_loss, test_acc = evaluate(eval_fn, state, dataset.x_test, dataset.y_test)
      for key, value in zip(history, (step, test_acc, test_loss, train_loss, train_time)):
        history[key].append(value)
      if bar is not None:
        bar.update(step - bar.n)
        bar.set_postfix(loss=f'{train_loss:.3f}', test_acc=f'{test_acc:.3f}')
      if not np.isfinite(train_loss):
        break  # diverged: stop spending the budget; the run is reported as it is
      t_start = time.perf_counter()
  if bar is not None:
    bar.close()

  steps_done = history['eval_steps'][-1]
  return {
      'config': dataclasses.asdict(config),
      **history,
      'grad_sq_norm': [float(m['grad_sq_norm']) for m in step_metrics],
      'cos_g_hg': [float(m['cos_g_hg']) for m in step_metrics],
      'step_loss': [float(m['loss']) for m in step_metrics],
      'final_accuracy': history['test_accuracy'][-1],
      'best_accuracy': max(history['test_accuracy']),
      'final_loss': history['test_loss'][-1],
      'final_train_loss': history['train_loss'][-1],
      'train_time_s': train_time,
      'steps_per_s': steps_done / train_time if train_time > 0 else float('nan'),
      'compile_time_s': compile_time,
      'steps_done': steps_done,
  }


def sweep_learning_rate(
    base: Config, dataset: data_lib.Dataset, candidates: Sequence[float], *, progress: bool = True
) -> tuple[float, dict[float, float]]:
  """Picks the learning rate with the best final accuracy on a validation split.

  The validation split is the last 10% of the training set; the test set is not seen.

  Returns:
    The chosen learning rate and ``{lr: validation accuracy}``.
  """
  validation = dataset.validation_split(0.1)
  scores = {}
  for lr in candidates:
    run = train_and_evaluate(
        dataclasses.replace(base, learning_rate=lr), validation, progress=progress,
        desc=f'sweep {base.model}/{base.optimizer} lr={lr:g}',
    )
    acc = run['final_accuracy']
    scores[lr] = acc if np.isfinite(run['final_train_loss']) else float('-inf')
  return max(scores, key=scores.get), scores


def machine_info() -> dict[str, Any]:
  """CPU model, cores, library versions, date and the exact command."""
  cpu = platform.processor() or platform.machine()
  try:
    with open('/proc/cpuinfo') as f:
      for line in f:
        if line.startswith('model name'):
          cpu = line.split(':', 1)[1].strip()
          break
  except OSError:
    pass
  import jaxlib

  versions = {
      'python': platform.python_version(),
      'jax': jax.__version__,
      'jaxlib': jaxlib.__version__,
      'numpy': np.__version__,
      'optax': optax.__version__,
      'flax': flax.__version__,
      'f3eo_jax': f3eo_jax.__version__,
  }
  return {
      'cpu': cpu,
      'cpu_count': os.cpu_count(),
      'cores_available': len(os.sched_getaffinity(0)) if hasattr(os, 'sched_getaffinity') else None,
      'load_average_at_start': list(os.getloadavg()) if hasattr(os, 'getloadavg') else None,
      'platform': platform.platform(),
      'jax_backend': jax.default_backend(),
      'jax_devices': [str(d) for d in jax.devices()],
      'versions': versions,
      'date_utc': datetime.datetime.now(datetime.timezone.utc).strftime('%Y-%m-%d %H:%M UTC'),
      'command': 'python ' + shlex.join(sys.argv),
  }


def summarize(runs: list[dict[str, Any]]) -> list[dict[str, Any]]:
  """Groups runs by (model, optimizer) and reduces over seeds (mean and std)."""
  groups: dict[tuple[str, str], list[dict[str, Any]]] = {}
  for run in runs:
    c = run['config']
    groups.setdefault((c['model'], c['optimizer']), []).append(run)
  rows = []
  for (model, opt), group in groups.items():
    stat = lambda k: (float(np.mean([r[k] for r in group])), float(np.std([r[k] for r in group])))
    rows.append({
        'model': model,
        'optimizer': opt,
        'label': OPTIMIZERS[opt]['label'],
        'learning_rate': group[0]['config']['learning_rate'],
        'seeds': len(group),
        'final_accuracy': stat('final_accuracy'),
        'best_accuracy': stat('best_accuracy'),
        'final_loss': stat('final_loss'),
        'final_train_loss': stat('final_train_loss'),
        'train_time_s': stat('train_time_s'),
        'steps_per_s': stat('steps_per_s'),
        'steps': group[0]['steps_done'],
    })
  return rows


def format_table(rows: list[dict[str, Any]]) -> str:
  """The summary as a markdown table."""
  pm = lambda v, scale=100, fmt='.1f': f'{v[0] * scale:{fmt}} ± {v[1] * scale:{fmt}}'
  lines = [
      '| model | optimizer | lr | seeds | final test acc (%) | best test acc (%) | final test loss'
      ' | final train loss | train time (s) | steps/s |',
      '|---|---|---|---|---|---|---|---|---|---|',
  ]
  for r in rows:
    lines.append(
        f"| {r['model'].upper()} | {r['label']} | {r['learning_rate']:g} | {r['seeds']} |"
        f" {pm(r['final_accuracy'])} | {pm(r['best_accuracy'])} |"
        f" {pm(r['final_loss'], 1, '.3f')} | {pm(r['final_train_loss'], 1, '.3f')} |"
        f" {pm(r['train_time_s'], 1, '.0f')} | {pm(r['steps_per_s'], 1, '.0f')} |"
    )
  return '\n'.join(lines)


def format_baselines(rows: list[dict[str, Any]], dataset: str) -> str:
  """Where each run stands against MNIST-1D's published test accuracies."""
  if dataset != data_lib.MNIST1D:
    return ''
  published = ', '.join(f'{k} {v:.0%}' for k, v in PUBLISHED_MNIST1D.items())
  lines = [f'Published MNIST-1D test accuracies: {published}.', '']
  for r in rows:
    ref = PUBLISHED_MNIST1D.get(r['model'])
    if ref is None:
      continue
    acc = r['final_accuracy'][0]
    lines.append(
        f"- {r['model'].upper()}, {r['label']}: {acc:.1%} final test accuracy,"
        f" {100 * (acc - ref):+.1f} points against the published {r['model'].upper()} ({ref:.0%})."
    )
  return '\n'.join(lines)


def _mean_curve(group: list[dict[str, Any]], key: str, x_key: str):
  n = min(len(r[key]) for r in group)
  ys = np.array([r[key][:n] for r in group], dtype=float)
  xs = np.array([r[x_key][:n] for r in group], dtype=float).mean(0)
  return xs, ys.mean(0), ys.std(0)


def _smooth(values: np.ndarray, width: int) -> np.ndarray:
  if width <= 1 or len(values) < width:
    return values
  kernel = np.ones(width) / width
  return np.convolve(values, kernel, mode='valid')


def write_plots(runs: list[dict[str, Any]], prefix: str) -> list[str]:
  """Accuracy and loss against steps and wall-clock, and the F3EO diagnostics."""
  import matplotlib

  matplotlib.use('Agg')
  import matplotlib.pyplot as plt

  by_model: dict[str, dict[str, list[dict[str, Any]]]] = {}
  for run in runs:
    c = run['config']
    by_model.setdefault(c['model'], {}).setdefault(c['optimizer'], []).append(run)
  model_names = list(by_model)
  colors = dict(zip(OPTIMIZERS, plt.rcParams['axes.prop_cycle'].by_key()['color']))

  fig, axes = plt.subplots(len(model_names), 4, figsize=(18, 3.8 * len(model_names)), squeeze=False)
  for row, model in enumerate(model_names):
    for opt, group in by_model[model].items():
      label = f"{OPTIMIZERS[opt]['label']} (n={len(group)})"
      for col, (key, x_key) in enumerate(
          [('test_accuracy', 'eval_steps'), ('test_loss', 'eval_steps'),
           ('test_accuracy', 'wall_time'), ('test_loss', 'wall_time')]
      ):
        xs, mean, std = _mean_curve(group, key, x_key)
        ax = axes[row, col]
        ax.plot(xs, mean, label=label, color=colors[opt])
        if len(group) > 1:
          ax.fill_between(xs, mean - std, mean + std, color=colors[opt], alpha=0.2)
    for col, (ylabel, xlabel) in enumerate(
        [('test accuracy', 'step'), ('test loss', 'step'),
         ('test accuracy', 'training wall-clock (s)'), ('test loss', 'training wall-clock (s)')]
    ):
      ax = axes[row, col]
      ax.set_xlabel(xlabel)
      ax.set_ylabel(ylabel)
      ax.set_title(f'MNIST-1D {model.upper()}: {ylabel} vs {xlabel.split(" (")[0]}')
      ax.grid(alpha=0.3)
      if 'loss' in ylabel:
        ax.set_yscale('log')
      ax.legend(fontsize=8)
    if model in PUBLISHED_MNIST1D:
      for col in (0, 2):
        axes[row, col].axhline(
            PUBLISHED_MNIST1D[model], color='gray', ls='--', lw=1,
            label=f'published {model.upper()}',
        )
        axes[row, col].legend(fontsize=8)
  fig.tight_layout()
  curves = f'{prefix}_curves.png'
  fig.savefig(curves, dpi=110)
  plt.close(fig)

  fig, axes = plt.subplots(len(model_names), 2, figsize=(13, 3.8 * len(model_names)), squeeze=False)
  for row, model in enumerate(model_names):
    for opt, group in by_model[model].items():
      label = OPTIMIZERS[opt]['label']
      n = min(len(r['grad_sq_norm']) for r in group)
      steps = np.arange(1, n + 1)
      for col, key in enumerate(('grad_sq_norm', 'cos_g_hg')):
        values = np.mean([r[key][:n] for r in group], axis=0)
        if np.all(np.isnan(values)):
          continue
        width = 25
        axes[row, col].plot(
            steps[width - 1:] if n >= width else steps, _smooth(values, width),
            label=label, color=colors[opt],
        )
    axes[row, 0].set_yscale('log')
    axes[row, 0].set_ylabel('‖g‖² (Fisher-trace estimate)')
    axes[row, 1].set_ylabel('cos(g, H·g)')
    for col in range(2):
      axes[row, col].set_xlabel('step')
      axes[row, col].grid(alpha=0.3)
      axes[row, col].legend(fontsize=8)
    axes[row, 0].set_title(f'MNIST-1D {model.upper()}: minibatch ‖g‖² (mean over seeds, 25-step average)')
    axes[row, 1].set_title(f'MNIST-1D {model.upper()}: cos(g, H·g) (F3EO only, 25-step average)')
  fig.tight_layout()
  diagnostics = f'{prefix}_diagnostics.png'
  fig.savefig(diagnostics, dpi=110)
  plt.close(fig)
  return [curves, diagnostics]


def _downsample(run: dict[str, Any], every: int) -> dict[str, Any]:
  """Keeps every ``every``-th per-step value, so the JSON stays small."""
  out = dict(run)
  for key in ('grad_sq_norm', 'cos_g_hg', 'step_loss'):
    out[key] = run[key][every - 1::every]
  out['per_step_values_every'] = every
  return out


def write_report(
    rows, runs, sweeps, info, plots, prefix: str, dataset: str, args: argparse.Namespace
) -> str:
  """Writes ``{prefix}.md`` and ``{prefix}.json``; returns the markdown."""
  md = [
      f'# {dataset}: F3EO against baselines',
      '',
      f"Command: `{info['command']}`  ",
      f"Machine: {info['cpu']}, {info['cores_available']} cores available"
      f" ({info['cpu_count']} in total), load average at start"
      f" {', '.join(f'{v:.1f}' for v in info['load_average_at_start'] or [])}; JAX backend"
      f" {info['jax_backend']}. Whole command: {info['total_wall_time_s']:.0f} s wall-clock"
      f" (load average at end {', '.join(f'{v:.1f}' for v in info['load_average_at_end'] or [])}).  ",
      'Versions: ' + ', '.join(f'{k} {v}' for k, v in info['versions'].items()) + '.  ',
      f"Date: {info['date_utc']}.",
      '',
      f'{args.steps} steps of batch {args.batch_size}, cosine decay of the learning rate, weight'
      f' decay {args.weight_decay} (Adam family), test accuracy on the full test split every'
      f' {args.eval_every} steps; mean ± std over seeds. Train time excludes compilation and'
      ' evaluation.',
      '',
      format_table(rows),
      '',
  ]
  if sweeps:
    md += ['Learning-rate sweep (final accuracy on a validation split, the last 10% of train):', '']
    for (model, opt), (best, scores) in sweeps.items():
      md.append(
          f"- {model.upper()}, {OPTIMIZERS[opt]['label']}: "
          + ', '.join(f'{lr:g} → {acc:.1%}' for lr, acc in scores.items())
          + f'; chose {best:g}'
      )
    md.append('')
  baselines = format_baselines(rows, dataset)
  if baselines:
    md += [baselines, '']
  md += [f'![]({os.path.basename(p)})' for p in plots]
  text = '\n'.join(md) + '\n'
  with open(f'{prefix}.md', 'w') as f:
    f.write(text)
  payload = {
      'machine': info,
      'args': vars(args),
      'summary': rows,
      'sweeps': [
          {'model': m, 'optimizer': o, 'chosen': best, 'validation_accuracy': {str(k): v for k, v in s.items()}}
          for (m, o), (best, s) in sweeps.items()
      ],
      'runs': [_downsample(r, 10) for r in runs],
      'plots': [os.path.basename(p) for p in plots],
  }
  with open(f'{prefix}.json', 'w') as f:
    json.dump(payload, f, indent=1, default=float)
  return text


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
  parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
  parser.add_argument('--full', action='store_true',
                      help='all six optimizers, lr sweep, 3 seeds (sets the defaults below)')
  parser.add_argument('--dataset', default='mnist1d')
  parser.add_argument('--data-dir', default=None, help='TFDS data directory (TFDS datasets only)')
  parser.add_argument('--models', nargs='+', default=None, choices=sorted(MODELS))
  parser.add_argument('--optimizers', nargs='+', default=None, choices=list(OPTIMIZERS))
  parser.add_argument('--seeds', type=int, default=None, help='number of seeds (0, 1, ...)')
  parser.add_argument('--sweep', action='store_true', default=None,
                      help='pick each learning rate from 3 candidates on a validation split')
  parser.add_argument('--steps', type=int, default=None)
  parser.add_argument('--batch-size', type=int, default=128)
  parser.add_argument('--weight-decay', type=float, default=1e-4)
  parser.add_argument('--eval-every', type=int, default=100)
  parser.add_argument('--tag', default=None, help="output name: benchmarks/results/train_<tag>*")
  parser.add_argument('--no-progress', action='store_true')
  args = parser.parse_args(argv)
  preset = (
      dict(models=['mlp', 'cnn'], optimizers=list(OPTIMIZERS), seeds=3, sweep=True, steps=1000,
           tag='full')
      if args.full else
      dict(models=['mlp', 'cnn'], optimizers=['f3eo', 'f3eo_clip', 'f3eo_reference', 'adamw'],
           seeds=1, sweep=False, steps=1000, tag='main')
  )
  for key, value in preset.items():
    if getattr(args, key) is None:
      setattr(args, key, value)
  return args


def main(argv: Sequence[str] | None = None) -> None:
  args = parse_args(argv)
  t_total = time.perf_counter()
  info = machine_info()
  dataset = data_lib.load_dataset(args.dataset, data_dir=args.data_dir)
  print(f"{info['command']}\n{info['cpu']}, {info['cores_available']} cores; {info['date_utc']}")
  print(f'{dataset.name}: {dataset.x_train.shape} train, {dataset.x_test.shape} test')
  runs, sweeps = [], {}
  for model in args.models:
    for opt in args.optimizers:
      base = Config(
          dataset=args.dataset, model=model, optimizer=opt,
          learning_rate=OPTIMIZERS[opt]['learning_rate'], weight_decay=args.weight_decay,
          batch_size=args.batch_size, num_steps=args.steps, eval_every=args.eval_every,
          data_dir=args.data_dir,
      )
      if args.sweep:
        best, scores = sweep_learning_rate(
            base, dataset, OPTIMIZERS[opt]['sweep'], progress=not args.no_progress
        )
        sweeps[(model, opt)] = (best, scores)
        print(f'sweep {model}/{opt}: '
              + ', '.join(f'{lr:g}→{acc:.3f}' for lr, acc in scores.items()) + f'; chose {best:g}')
        base = dataclasses.replace(base, learning_rate=best)
      for seed in range(args.seeds):
        run = train_and_evaluate(
            dataclasses.replace(base, seed=seed), dataset, progress=not args.no_progress,
            desc=f'{model}/{opt} seed {seed}',
        )
        runs.append(run)
        print(f"{model}/{opt} seed {seed}: test acc {run['final_accuracy']:.3f}"
              f" (best {run['best_accuracy']:.3f}), test loss {run['final_loss']:.3f},"
              f" {run['train_time_s']:.1f} s, {run['steps_per_s']:.0f} steps/s"
              f" (+{run['compile_time_s']:.1f} s compile)", flush=True)
  rows = summarize(runs)
  info['total_wall_time_s'] = time.perf_counter() - t_total
  info['load_average_at_end'] = list(os.getloadavg()) if hasattr(os, 'getloadavg') else None
  os.makedirs(RESULTS_DIR, exist_ok=True)
  prefix = os.path.join(RESULTS_DIR, f'train_{args.tag}')
  plots = write_plots(runs, prefix)
  print()
  print(write_report(rows, runs, sweeps, info, plots, prefix, args.dataset, args))
  print('wrote', ', '.join(os.path.relpath(p) for p in [f'{prefix}.md', f'{prefix}.json', *plots]))


if __name__ == '__main__':
  main()
