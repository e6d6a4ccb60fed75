"""The consistency check under every single-process execution mode, on 4 CPU devices.

Run in a subprocess by ``tests/test_sharding.py`` (the device count must be
set before JAX initialises): ``python tests/_consistency_cases.py OUT.json``. In every
mode, the problem of ``_distributed_problem.py`` is trained twice by one compiled step
that donates params and state: with the right ``obj_fn`` throughout, and with one
step whose ``obj_fn`` is the loss of another batch, followed by one more step. What it
measured goes to ``OUT.json``, under the keys of the two-process worker's runs; the
assertions live in the test module.

Modes: ``jit`` on one device; ``jit`` with ``NamedSharding`` in data parallel and
FSDP; ``shard_map`` with varying-axis typing (``check_vma=True``: the loss divided by
the device count, no ``axis_name``) and with local gradients (``check_vma=False``:
``g`` pmean'ed by the caller, ``axis_name`` given); ``jax.pmap`` (local gradients,
``axis_name``). The ``shard_map`` and ``pmap`` steps also return every device's copy
of the params, and the local-gradient modes run a step where only the first device's
slice of ``obj_fn``'s batch is wrong: the devices must agree to drop the meta term.
"""

from __future__ import annotations

import importlib.metadata
import os

NUM_DEVICES = 4


def _xla_flags() -> str:
  # Simulated devices; the backend flags only cut CPU compile time (same HLO, same math).
  flags = [
    f'--xla_force_host_platform_device_count={NUM_DEVICES}',
    '--xla_backend_optimization_level=0',
    '--xla_llvm_disable_expensive_passes=true',
  ]
  jaxlib = tuple(int(v) for v in importlib.metadata.version('jaxlib').split('.')[:2])
  if jaxlib >= (0, 9):
    # A deadlocked collective fails within 2 min, before the test's 5 min bound; a busy
    # host can starve a device thread past the 40 s rendezvous default.
    flags += [
      '--xla_cpu_collective_call_terminate_timeout_seconds=120',
      '--xla_cpu_collective_timeout_seconds=120',
    ]
  return ' '.join(flags)


os.environ['XLA_FLAGS'] = _xla_flags()
os.environ['JAX_PLATFORMS'] = 'cpu'

import functools  # noqa: E402
import json  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
import traceback  # noqa: E402

import _distributed_problem as problem  # noqa: E402
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402
from _distributed_problem import AXIS, loss_fn  # noqa: E402
from jax.sharding import AxisType, NamedSharding  # noqa: E402
from jax.sharding import PartitionSpec as P  # noqa: E402

# ---------------------------------------------------------------- steps of each mode


def vma_step(tx, params, opt_state, x, y, obj_x, obj_y):
  """shard_map(check_vma=True): the local loss / n, whose gradient comes back summed."""
  n = jax.lax.axis_size(AXIS)
  grads = jax.grad(lambda p: loss_fn(p, x, y) / n)(params)
  updates, opt_state = tx.update(
    grads, opt_state, params, obj_fn=lambda p: loss_fn(p, obj_x, obj_y) / n
  )
  return optax.apply_updates(params, updates), opt_state


def local_grad_step(tx, params, opt_state, x, y, obj_x, obj_y):
  """shard_map(check_vma=False) or pmap: local gradients, averaged by the caller."""
  grads = jax.lax.pmean(jax.grad(loss_fn)(params, x, y), AXIS)
  updates, opt_state = tx.update(  # tx has axis_name
    grads, opt_state, params, obj_fn=lambda p: loss_fn(p, obj_x, obj_y)
  )
  return optax.apply_updates(params, updates), opt_state


def with_device_copies(step_fn):
  """The step, also returning each device's params (to see whether devices agree)."""

  def run(*args):
    params, opt_state = step_fn(*args)
    return params, opt_state, jax.tree.map(lambda a: a[None], params)

  return run


# ---------------------------------------------------------------- the modes


class Mode:
  """How one execution mode places the inputs and compiles the step."""

  def __init__(self, name, mesh):
    self.name, self.mesh = name, mesh
    self.local = name in ('shard_map_local_grads', 'pmap')

  def optimizers(self):
    txs = problem.optimizers(axis_name=AXIS if self.local else None)
    return txs if self.name == 'jit_one_device' else {k: txs[k] for k in MULTI_DEVICE_OPTIMIZERS}

  def place_params(self, params):
    """Fresh device arrays: replicated, FSDP-sharded, or on the default device."""
    if self.name in ('jit_data_parallel', 'jit_fsdp'):
      specs = problem.LAYOUTS['fsdp' if self.name == 'jit_fsdp' else 'data_parallel']
      return {k: jax.device_put(v, NamedSharding(self.mesh, specs[k])) for k, v in params.items()}
    return jax.tree.map(jnp.array, params)

  def place_batch(self, batch):
    """A batch (tuple of arrays) as the mode takes it."""
    if self.name == 'jit_one_device':
      return tuple(jnp.array(b) for b in batch)
    if self.name == 'pmap':
      return tuple(b.reshape(NUM_DEVICES, -1, *b.shape[1:]) for b in batch)
    return tuple(jax.device_put(b, NamedSharding(self.mesh, P(AXIS))) for b in batch)

  def compile(self, tx):
    """The step ``(params, opt_state, x, y, obj_x, obj_y)``, donating params and state.

    It returns ``(params, opt_state, copies)``: ``copies`` holds each device's params
    in the modes where devices could disagree, else it is None.
    """
    if self.name.startswith('jit'):
      run = jax.jit(functools.partial(problem.step, tx), donate_argnums=(0, 1))
      return lambda *args: (*run(*args), None)
    body = functools.partial(vma_step if self.name == 'shard_map_vma' else local_grad_step, tx)
    if self.name == 'pmap':
      return jax.pmap(
        with_device_copies(body),
        axis_name=AXIS,
        in_axes=(None, None, 0, 0, 0, 0),
        out_axes=(None, None, 0),
        donate_argnums=(0, 1),
      )
    return jax.jit(
      jax.shard_map(
        with_device_copies(body),
        mesh=self.mesh,
        check_vma=self.name == 'shard_map_vma',
        in_specs=(P(), P()) + (P(AXIS),) * 4,
        out_specs=(P(), P(), P(AXIS)),
      ),
      donate_argnums=(0, 1),
    )


def agree(copies) -> bool | None:
  """Whether every device returned the same params (None where the mode has one copy)."""
  if copies is None:
    return None
  return all(bool(np.all(np.asarray(c) == np.asarray(c)[:1])) for c in jax.tree.leaves(copies))


def run_case(mode: Mode, tx, params, batch, other_batch) -> dict:
  """Two runs of one compiled step that donates params and state.

  First ``NUM_STEPS`` correct steps. Then, from the start again, ``MISMATCH_AFTER``
  correct steps, one whose obj_fn is the loss of ``other_batch``, and one more correct
  step on what that step returned. The keys are those of the two-process worker's runs.
  """
  x, y = mode.place_batch(batch)
  x_other, y_other = mode.place_batch(other_batch)
  train_step = mode.compile(tx)

  def start():
    p = mode.place_params(params)
    return p, tx.init(p)  # outside jit: the moments take each leaf's sharding

  p, opt_state = start()
  for _ in range(problem.NUM_STEPS):
    p, opt_state, copies = jax.block_until_ready(train_step(p, opt_state, x, y, x, y))
  out = {
    'params': problem.to_lists(p),
    'diagnostics': problem.diagnostics_to_host(opt_state),
    'raised': problem.raised(opt_state),
    'devices_agree': agree(copies),
  }
  p, opt_state = start()
  for _ in range(problem.MISMATCH_AFTER):
    p, opt_state, _ = jax.block_until_ready(train_step(p, opt_state, x, y, x, y))
  out['raised_before'] = problem.raised(opt_state)
  donated = problem.donated_buffers(p, opt_state)
  p, opt_state, copies = jax.block_until_ready(train_step(p, opt_state, x, y, x_other, y_other))
  out |= {
    'donated_deleted': all(a.is_deleted() for a in donated),
    'params_after': problem.to_lists(p),
    'param_specs_after': {k: problem.spec_of(v) for k, v in p.items()},
    'diagnostics_after': problem.diagnostics_to_host(opt_state),
    'raised_after': problem.raised(opt_state),
    'devices_agree_after': agree(copies),
  }
  p, opt_state, _ = jax.block_until_ready(train_step(p, opt_state, x, y, x, y))  # usable
  out |= {
    'params_next': problem.to_lists(p),
    'diagnostics_next': problem.diagnostics_to_host(opt_state),
  }
  if mode.local:
    # Only the first device's slice of obj_fn's batch is wrong: every device must still
    # drop the meta term, or the replicas would silently part.
    per_device = batch[0].shape[0] // NUM_DEVICES
    mixed = mode.place_batch(
      tuple(np.concatenate([o[:per_device], b[per_device:]]) for o, b in zip(other_batch, batch))
    )
    p, opt_state = start()
    for _ in range(problem.MISMATCH_AFTER):
      p, opt_state, _ = jax.block_until_ready(train_step(p, opt_state, x, y, x, y))
    p, opt_state, copies = jax.block_until_ready(train_step(p, opt_state, x, y, *mixed))
    out['partly_wrong'] = {
      'params_after': problem.to_lists(p),
      'diagnostics_after': problem.diagnostics_to_host(opt_state),
      'raised_after': problem.raised(opt_state),
      'devices_agree_after': agree(copies),
    }
  return out


MODES = problem.MODES
# One device runs every optimizer; the multi-device modes the two whose consistency
# check runs differently (directly, and inside hvp_every's lax.cond).
MULTI_DEVICE_OPTIMIZERS = ('f3eo', 'f3eo_hvp_every_2')


def main(out_path: str) -> None:
  start = time.perf_counter()
  assert jax.device_count() == NUM_DEVICES, jax.devices()
  mesh = jax.make_mesh((NUM_DEVICES,), (AXIS,), axis_types=(AxisType.Auto,))
  params, x, y, x_other, y_other = problem.make_problem()
  results = {'jax_version': jax.__version__}
  for name in MODES:
    mode = Mode(name, mesh)
    cases = results[name] = {}
    for opt_name, tx in mode.optimizers().items():
      try:
        cases[opt_name] = run_case(mode, tx, params, (x, y), (x_other, y_other))
      except Exception:  # pylint: disable=broad-except
        cases[opt_name] = {'error': traceback.format_exc()}
    print(f'{name}: {time.perf_counter() - start:.1f} s', file=sys.stderr, flush=True)
  results['wall_seconds'] = round(time.perf_counter() - start, 1)
  with open(out_path, 'w', encoding='utf-8') as f:
    json.dump(results, f)


if __name__ == '__main__':
  main(sys.argv[1])
