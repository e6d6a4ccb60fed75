"""One process of the two-process F3EO run in ``tests/test_multiprocess.py``.

``python tests/_multiprocess_worker.py COORDINATOR NUM_PROCESSES PROCESS_ID OUT``
joins a JAX cluster of ``NUM_PROCESSES`` processes with 2 CPU devices each (Gloo
collectives; coordinator and Gloo on loopback when ``COORDINATOR`` is
``127.0.0.1:PORT``), builds one mesh over every device of every process, and trains
the problem of ``_distributed_problem.py`` with each of its optimizers, in data
parallel (params replicated) and FSDP (the leading dim of each weight matrix
sharded). Each process feeds only its share of the global batch. Each run is done
twice: with the right ``obj_fn`` throughout, and with one step whose ``obj_fn`` is the
loss of another batch. What it measured, gathered to host values, goes to the JSON
file ``OUT.format(PROCESS_ID)``; the assertions live in the test module.

The multi-host part is the README's "Many hosts" recipe: ``jax.distributed.initialize``
before anything else, a mesh over ``jax.devices()``, params put on it with
``jax.device_put`` (every process holds the same values), the batch assembled with
``jax.make_array_from_process_local_data``, the unchanged jitted step, and
``f3eo_jax.raise_on_mismatch`` on the host. ``python tests/_multiprocess_worker.py
--script SCRIPT COORDINATOR NUM_PROCESSES PROCESS_ID`` runs the README's recipe itself
as one such process (see :func:`run_script`).
"""

from __future__ import annotations

import functools
import json
import os
import runpy
import socket
import sys
import time
import traceback

import _distributed_problem as problem
import jax
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import AxisType, NamedSharding
from jax.sharding import PartitionSpec as P

LOCAL_DEVICES = 2  # CPU devices per process


# ---------------------------------------------------------------- the cluster


def pin_gloo_to_loopback() -> str:
  """Makes Gloo listen on 127.0.0.1 rather than on the address of the machine's hostname.

  JAX has no public option for Gloo's address; this wraps the factory that
  ``jax.distributed`` calls when it creates the CPU client, so it must run before
  the first JAX computation. Where that private hook has moved, it carries on only if
  the hostname resolves to a loopback address anyway.

  Returns:
    How Gloo was kept on loopback, for the report.
  """
  try:
    from jax._src import xla_bridge  # pylint: disable=g-import-not-at-top

    factory = xla_bridge._jax.make_gloo_tcp_collectives
  except (ImportError, AttributeError):
    address = socket.gethostbyname(socket.gethostname())
    if not address.startswith('127.'):
      raise RuntimeError(
        f'cannot pin Gloo to loopback in this JAX, and the hostname resolves to {address}'
      ) from None
    return f'hostname resolves to {address}'
  xla_bridge._jax.make_gloo_tcp_collectives = functools.partial(factory, hostname='127.0.0.1')
  return 'hostname=127.0.0.1'


def initialize(coordinator: str, num_processes: int, process_id: int) -> str:
  """Joins the cluster: ``LOCAL_DEVICES`` CPU devices here, Gloo between processes."""
  jax.config.update('jax_platforms', 'cpu')
  jax.config.update('jax_num_cpu_devices', LOCAL_DEVICES)
  jax.config.update('jax_cpu_collectives_implementation', 'gloo')  # the default since JAX 0.5
  gloo = pin_gloo_to_loopback() if coordinator.startswith('127.') else 'default'
  jax.distributed.initialize(
    coordinator_address=coordinator,
    coordinator_bind_address=coordinator,  # JAX's default binds every interface
    num_processes=num_processes,
    process_id=process_id,
    # A peer that died is noticed within seconds, not after JAX's 100 s default.
    initialization_timeout=60,
    heartbeat_timeout_seconds=10,
    shutdown_timeout_seconds=30,
  )
  return gloo


def host_local_rows(global_value: np.ndarray, sharding: NamedSharding) -> np.ndarray:
  """This process's share of a global batch: the rows its devices hold.

  A real input pipeline loads only its own examples; the test slices them out of the
  global batch, which every process can build, to compare with one device.
  """
  indices = sharding.addressable_devices_indices_map(global_value.shape).values()
  rows = sorted({idx[0].indices(global_value.shape[0])[:2] for idx in indices})
  assert all(a[1] == b[0] for a, b in zip(rows, rows[1:])), rows  # contiguous
  return global_value[rows[0][0] : rows[-1][1]]


def gather(tree) -> dict:
  """Global arrays (sharded or not) as host lists, the same in every process."""
  return problem.to_lists(multihost_utils.process_allgather(tree, tiled=True))


# ---------------------------------------------------------------- the runs


def run_case(mesh, layout, tx, params, batch, other_batch) -> dict:
  """Two runs of one compiled step that donates params and state.

  First ``NUM_STEPS`` correct steps. Then, from the start again, ``MISMATCH_AFTER``
  correct steps, one whose obj_fn is the loss of ``other_batch``, and one more correct
  step on what that step returned.
  """
  specs = problem.LAYOUTS[layout]
  x, y = batch
  train_step = jax.jit(functools.partial(problem.step, tx), donate_argnums=(0, 1))

  def start():
    # Every process holds the same initial values: device_put places its part.
    p = {k: jax.device_put(v, NamedSharding(mesh, specs[k])) for k, v in params.items()}
    return p, tx.init(p)  # outside jit: Adam's moments take each leaf's sharding

  p, opt_state = start()
  for _ in range(problem.NUM_STEPS):
    p, opt_state = train_step(p, opt_state, x, y, x, y)
  out = {
    'params': gather(p),
    'diagnostics': problem.diagnostics_to_host(opt_state),
    'raised': problem.raised(opt_state),
    'param_specs': {k: problem.spec_of(v) for k, v in p.items()},
    'state_specs_w1': sorted(
      {problem.spec_of(a) for a in jax.tree.leaves(opt_state) if a.shape == problem.WIDTHS[:2]}
    ),
  }
  p, opt_state = start()
  for _ in range(problem.MISMATCH_AFTER):
    p, opt_state = train_step(p, opt_state, x, y, x, y)
  out['raised_before'] = problem.raised(opt_state)
  donated = problem.donated_buffers(p, opt_state)
  p, opt_state = train_step(p, opt_state, x, y, *other_batch)
  out |= {
    'donated_deleted': all(a.is_deleted() for a in donated),
    'params_after': gather(p),
    'diagnostics_after': problem.diagnostics_to_host(opt_state),
    'param_specs_after': {k: problem.spec_of(v) for k, v in p.items()},
    'raised_after': problem.raised(opt_state),
  }
  p, opt_state = train_step(p, opt_state, x, y, x, y)  # the outputs are usable
  out |= {'params_next': gather(p), 'diagnostics_next': problem.diagnostics_to_host(opt_state)}
  return out


def main(coordinator: str, num_processes: int, process_id: int, out_path: str) -> None:
  start = time.perf_counter()
  gloo = initialize(coordinator, num_processes, process_id)
  try:
    results = {
      'process_index': jax.process_index(),
      'process_count': jax.process_count(),
      'device_count': jax.device_count(),
      'local_device_count': jax.local_device_count(),
      'gloo': gloo,
      'jax_version': jax.__version__,
    }
    mesh = jax.make_mesh((jax.device_count(),), (problem.AXIS,), axis_types=(AxisType.Auto,))
    results['mesh_processes'] = [d.process_index for d in mesh.devices.flat]
    params, x, y, x_other, y_other = problem.make_problem()
    batch_sharding = NamedSharding(mesh, P(problem.AXIS))
    rows = host_local_rows(np.arange(problem.GLOBAL_BATCH), batch_sharding)
    results['local_batch_rows'] = rows.tolist()
    # Each process feeds only its share of the global batch.
    x, y, x_other, y_other = (
      jax.make_array_from_process_local_data(batch_sharding, a[rows])
      for a in (x, y, x_other, y_other)
    )
    for layout in problem.LAYOUTS:
      results[layout] = {}
      for name, tx in problem.optimizers().items():
        try:
          results[layout][name] = run_case(mesh, layout, tx, params, (x, y), (x_other, y_other))
        except Exception:  # pylint: disable=broad-except
          # The same code fails the same way in every process: report it and go on.
          results[layout][name] = {'error': traceback.format_exc()}
      print(f'{layout}: {time.perf_counter() - start:.1f} s', file=sys.stderr, flush=True)
    results['wall_seconds'] = round(time.perf_counter() - start, 1)
    with open(out_path.format(process_id), 'w', encoding='utf-8') as f:
      json.dump(results, f)
  finally:
    jax.distributed.shutdown()


def run_script(path: str, argv: list[str]) -> None:
  """Runs ``path COORDINATOR NUM_PROCESSES PROCESS_ID`` as one process of a loopback cluster.

  Adds to the script what only a test machine needs: the coordinator bound to the
  loopback address it is given, Gloo kept on loopback, and ``LOCAL_DEVICES`` CPU
  devices per process. ``tests/test_multiprocess.py`` runs the README's multi-host
  recipe this way, as written.
  """
  os.environ['JAX_COORDINATOR_BIND_ADDRESS'] = argv[0]
  jax.config.update('jax_platforms', 'cpu')
  jax.config.update('jax_num_cpu_devices', LOCAL_DEVICES)
  pin_gloo_to_loopback()
  sys.argv = [path, *argv]
  runpy.run_path(path, run_name='__main__')


if __name__ == '__main__':
  if sys.argv[1] == '--script':
    run_script(sys.argv[2], sys.argv[3:])
  else:
    main(sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4])
