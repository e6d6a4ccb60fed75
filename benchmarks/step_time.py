"""Step time and peak memory of F3EO against AdamW, in JAX and in PyTorch, per model and dtype.

Rows of a model are compiled, warmed up, then timed in interleaved rounds of 10 steps;
``× AdamW``: median of per-round ratios to the same framework's AdamW. Memory: XLA's
``memory_analysis()`` (state donated); PyTorch's peak on CUDA only. ``f3eo_hvp10``: the
in-graph ``lax.cond``; ``f3eo_hvp10_python``: ``f3eo_jax.jit_amortized``; ``torch_f3eo``:
double backward. Then a short training comparison on MNIST-1D.

Usage::

  python -m benchmarks.step_time                 # --preset cpu: MLP and CNN, float32
  python -m benchmarks.step_time --preset gpu    # 4 models, float32 and bfloat16, < 8 min
  python -m benchmarks.step_time --preset smoke  # tiny sizes (the tests run it)
"""

from __future__ import annotations

import dataclasses
import functools
import os
import time

os.environ.setdefault('OMP_WAIT_POLICY', 'PASSIVE')  # PyTorch's spin-waiting on a shared CPU

import argparse  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402

from benchmarks import config, harness, models, report, steps, tasks  # noqa: E402

JAX_ROWS = ('adamw', 'f3eo', 'f3eo_hvp10', 'f3eo_hvp10_python', 'f3eo_reference')
ROWS = (*JAX_ROWS, 'torch_adamw', 'torch_f3eo')
FULL = dict(mlp=dict(hidden=(512, 512)), cnn={}, resnet18={}, gpt=dict(d_model=128, n_layer=2))
TINY = dict(mlp=dict(hidden=(16,)), cnn=dict(channels=(4, 8), dense=16), gpt=dict(d_model=16))
TINY.update(resnet18=dict(widths=(4, 8, 8, 16)))
GPU = dict(mlp=256, cnn=256, gpt=64, resnet18=256)
SHORT = ('adamw', 'f3eo', 'f3eo_hvp10_python', 'torch_adamw', 'torch_f3eo')
CHEAP = dict(cnn=('adamw', 'f3eo', 'torch_adamw'), gpt=('adamw', 'torch_adamw', 'torch_f3eo'))
PRESETS = {  # runs: (model, dtype, batch, rows); image: the MLP's, CNN's and ResNet's input
  'cpu': dict(runs=[('mlp', 'float32', 256, ROWS), ('cnn', 'float32', 128, ROWS)], rounds=7),
  'gpu': dict(runs=[(m, d, b, ROWS) for d in ('float32', 'bfloat16') for m, b in GPU.items()]),
  'smoke': dict(runs=[('mlp', 'float32', 8, ROWS), ('mlp', 'bfloat16', 8, SHORT)], sizes=TINY),
}
PRESETS['cpu'].update(image=(28, 28, 1), train=())
PRESETS['gpu'].update(image=(32, 32, 3), rounds=5, train=(500, 'mnist1d_mlp', 'mnist1d_cnn'))
PRESETS['gpu']['budget_s'] = 330  # of rows; then the training comparison: < 8 minutes in all
PRESETS['smoke']['runs'] += [(m, 'float32', 2, r) for m, r in CHEAP.items()]  # compile time
PRESETS['smoke']['runs'].append(('resnet18', 'float32', 2, ('adamw', 'torch_adamw')))
PRESETS['smoke'].update(image=(8, 8, 3), train=(6, 'mnist1d_mlp'), rounds=1)
VOCAB, SEQ = 65, 64
TRAINED = ('adamw', 'f3eo', 'f3eo_hvp10_python', 'f3eo_reference')
MODELS = dict(mlp=models.MLP, cnn=models.CNN, resnet18=models.ResNet18)
BLOCK = 10


def batch(name: str, size: int, image, dtype):
  """Random inputs and labels (token windows and their next tokens for the GPT)."""
  rng = np.random.default_rng(0)
  if name == 'gpt':
    x = rng.integers(0, VOCAB, size=(size, SEQ))
    return jnp.asarray(x, jnp.int32), jnp.asarray(np.roll(x, -1, axis=1), jnp.int32)
  x = jnp.asarray(rng.standard_normal((size, *image)), dtype)
  return x, jnp.asarray(rng.integers(0, 10, size=size), jnp.int32)


def jax_row(name, row, x, y, sizes, dtype):
  """Compiles the row's step and returns a block timer and its compile figures."""
  model = models.GPT(VOCAB, SEQ, **sizes) if name == 'gpt' else MODELS[name](**sizes)
  variant = config.get(row)
  hp = steps.hyperparams(variant, 1e-3, None, 1e6)
  variables = jax.jit(model.init)(jax.random.key(0), x)
  cast = lambda a: a.astype(dtype) if jnp.issubdtype(a.dtype, jnp.floating) else a
  params = jax.tree.map(cast, variables.pop('params'))
  model_state = dict(variables)  # batch statistics stay float32, as Flax keeps them
  opt_state = steps.make_tx(variant, hp).init(params)
  step0 = jnp.zeros((), jnp.int32)
  state = steps.TrainState(step0, params, model_state, opt_state, jax.random.key(1))
  fn = functools.partial(steps.train_step, model=model, loss=tasks.xent, variant=variant)
  step, info = steps.compile_step(fn, (state, x, y, hp), variant)
  holder = [step(state, x, y, hp)[0]]  # warm-up
  if variant.schedule == 'python':
    holder = [step(holder[0], x, y, hp)[0]]  # and the reuse step
  return steps.block_timer(step, holder, (x, y, hp), BLOCK), info


def torch_row(name, row, x, y, sizes, dtype):
  """The PyTorch twin: a block timer and (on CUDA) the step's peak memory."""
  import torch

  from benchmarks import torch_f3eo, torch_models

  device = 'cuda' if torch.cuda.is_available() else 'cpu'
  dtype = torch.bfloat16 if dtype == 'bfloat16' else torch.float32
  torch.manual_seed(0)
  model = {
    'mlp': lambda: torch_models.MLP(int(np.prod(x.shape[1:])), **sizes),
    'cnn': lambda: torch_models.CNN(x.shape[1:], **sizes),
    'resnet18': lambda: torch_models.ResNet18(in_channels=x.shape[-1], **sizes),
    'gpt': lambda: torch_models.GPT(VOCAB, SEQ, **sizes),
  }[name]()
  model = model.to(device=device, dtype=dtype).train()
  tx = torch.tensor(np.asarray(x, np.float32)).to(device, dtype)
  tx = tx.long() if name == 'gpt' else tx
  ty = torch.tensor(np.asarray(y)).long().to(device)
  opt = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=config.WEIGHT_DECAY)
  fn = torch_f3eo.f3eo_step if row == 'torch_f3eo' else torch_f3eo.plain_step
  sync = torch.cuda.synchronize if device == 'cuda' else lambda: None
  base = torch.cuda.memory_allocated() if device == 'cuda' else None
  fn(model, opt, tx, ty)
  sync()
  peak = torch.cuda.max_memory_allocated() - base if device == 'cuda' else None  # CPU: not measured

  def run():
    start = time.perf_counter()
    for _ in range(BLOCK):
      fn(model, opt, tx, ty)
    sync()
    return (time.perf_counter() - start) / BLOCK

  return run, {'memory': {'peak': peak}, 'flops': None, 'compile_s': None}


def bench(name, dtype, size, row_names, preset, deadline) -> list[dict]:
  """The rows of one model and dtype, timed side by side."""
  sizes = preset.get('sizes', FULL)[name]
  x, y = batch(name, size, preset['image'], dtype)
  blocks, infos = {}, {}
  for row in row_names:
    if time.perf_counter() > deadline:
      infos[row] = {'skipped': 'time budget spent'}
      continue
    try:
      maker = torch_row if row.startswith('torch') else jax_row
      blocks[row], infos[row] = maker(name, row, x, y, sizes, dtype)
    except ImportError as e:
      infos[row] = {'skipped': str(e)}
    print(f'  {name} {dtype} {row}: {infos[row]}', flush=True)
  times = steps.interleaved(blocks, preset['rounds']) if blocks else {}
  out = []
  for row, info in infos.items():
    base = 'torch_adamw' if row.startswith('torch') else 'adamw'
    t, b = times.get(row), times.get(base)
    mem, base_mem = (i.get('memory', {}).get('peak') for i in (info, infos.get(base, {})))
    r = dict(model=name, dtype=dtype, batch=size, row=row, skipped=info.get('skipped'))
    r['ms/step'] = 1e3 * float(np.median(t)) if t else None
    r['× AdamW'] = steps.paired_ratio(t, b) if t and b else None
    r['peak MiB'] = mem / 2**20 if mem else None
    r['memory × AdamW'] = mem / base_mem if mem and base_mem else None
    r['GFLOP/step'] = info['flops'] / 1e9 if info.get('flops') else None
    out.append(dict(r, **{'compile s': info.get('compile_s')}))
  return out


def training(preset, cache) -> pd.DataFrame:
  """A short training comparison on MNIST-1D: four optimizers, one seed."""
  (num_steps, *names), task_map, runs, tiny = preset['train'], {}, [], 'sizes' in preset
  for name in names:
    task = task_map[name] = tasks.get(name, **(tasks.SMOKE_SIZES[name] if tiny else {}))
    make = lambda o: harness.RunConfig(config.get(o), 3e-3, num_steps=num_steps)
    configs = {o: dataclasses.replace(make(o), train_subset=256 if tiny else None) for o in TRAINED}
    results, _ = harness.compare(configs, task, task.load(), cache=cache)
    runs += [r for res in results.values() for r in res['runs']]
  return report.summary(runs, task_map)


def main(argv=None) -> pd.DataFrame:
  parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
  parser.add_argument('--preset', default='cpu', choices=sorted(PRESETS))
  parser.add_argument('--models', nargs='+', help="a subset of the preset's models")
  parser.add_argument('--rounds', type=int, help='timed rounds per model')
  report.add_output_arguments(parser)
  args = parser.parse_args(argv)
  preset = dict(PRESETS[args.preset], rounds=args.rounds or PRESETS[args.preset]['rounds'])
  start, info = time.perf_counter(), report.machine_info((*report.PACKAGES, 'torch'))
  deadline = start + preset.get('budget_s', 1e9)
  rows = []
  for name, dtype, size, row_names in preset['runs']:
    if not args.models or name in args.models:
      rows += bench(name, dtype, size, row_names, preset, deadline)
  table = pd.DataFrame(rows)
  train = pd.DataFrame()
  if preset.get('train') and time.perf_counter() < deadline + 60:
    train = training(preset, harness.StepCache())
  info.update(wall_time_s=round(time.perf_counter() - start))
  md = report.header(f'Step time and memory: preset `{args.preset}`', info)
  md += report.section('Step time and memory', table, '.3g')
  if len(train):
    md += report.section('Training comparison', train)
  stem = 'step_time' + ('' if args.preset == 'cpu' else f'_{args.preset}')
  folder = report.out_dir(args)
  report.write(folder / f'{stem}.md', '\n'.join(md) + '\n')
  payload = dict(machine=info, preset=preset, rows=rows, training=train.to_dict('records'))
  report.write(folder / f'{stem}.json', payload=payload)
  print('\n'.join(md))
  return table


if __name__ == '__main__':
  main()
