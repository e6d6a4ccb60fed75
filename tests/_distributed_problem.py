"""The problem every multi-device F3EO test trains, and the checks they share.

A small tanh MLP on fixed float32 data, three optimizers, one step function, the
single-device run everything is compared with, and the checks of a run with a
correct and with a deliberately wrong ``obj_fn``. Used by the two-process worker
(``_multiprocess_worker.py``), the single-process multi-device cases
(``_consistency_cases.py``) and their test modules, so all of them run the same code;
the test modules also share its bounded subprocesses (killed with their whole process
group on timeout) and its once-per-session results (shared by pytest-xdist workers).
Importing it touches no JAX backend.
"""

from __future__ import annotations

import contextlib
import fcntl
import functools
import json
import os
import pathlib
import signal
import subprocess
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

import f3eo_jax

AXIS = 'data'
NUM_STEPS = 4
MISMATCH_AFTER = 2  # correct steps before the step with a wrong obj_fn
GLOBAL_BATCH = 64
WIDTHS = (16, 32, 8)

# FSDP: the leading dim of each weight matrix over the data axis, biases replicated.
FSDP_SPECS = {'w1': P(AXIS, None), 'b1': P(), 'w2': P(AXIS, None), 'b2': P()}
LAYOUTS = {'data_parallel': {k: P() for k in FSDP_SPECS}, 'fsdp': FSDP_SPECS}

LEARNING_RATE = 1e-2
WEIGHT_DECAY = 1e-3


# ---------------------------------------------------------------- the problem


def loss_fn(params, x, y):
  """Mean cross-entropy of a one-hidden-layer tanh MLP."""
  hidden = jnp.tanh(x @ params['w1'] + params['b1'])
  logits = hidden @ params['w2'] + params['b2']
  return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()


def make_problem() -> tuple[dict, np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
  """Params and two global batches, as float32 numpy: the same in every process.

  Returns:
    ``(params, x, y, x_other, y_other)``; ``(x_other, y_other)`` is the batch whose
    loss plays the wrong ``obj_fn``.
  """
  rng = np.random.default_rng(0)
  d_in, d_hidden, d_out = WIDTHS
  f32 = lambda a: np.asarray(a, np.float32)
  params = {
    'w1': f32(0.5 * rng.normal(size=(d_in, d_hidden))),
    'b1': f32(0.1 * rng.normal(size=(d_hidden,))),
    'w2': f32(0.5 * rng.normal(size=(d_hidden, d_out))),
    'b2': np.zeros((d_out,), np.float32),
  }
  x, x_other = (f32(rng.normal(size=(GLOBAL_BATCH, d_in))) for _ in range(2))
  y, y_other = (rng.integers(0, d_out, size=(GLOBAL_BATCH,)).astype(np.int32) for _ in range(2))
  return params, x, y, x_other, y_other


OPTIMIZERS = ('f3eo', 'f3eo_hvp_every_2', 'f3eo_reference')


def optimizers(axis_name=None) -> dict[str, optax.GradientTransformationExtraArgs]:
  """Every optimizer under test, with the library's default consistency check.

  ``axis_name`` only where gradients are local (``shard_map(check_vma=False)``, ``pmap``).
  """
  return {
    'f3eo': f3eo_jax.f3eo(LEARNING_RATE, weight_decay=WEIGHT_DECAY, axis_name=axis_name),
    # lax.cond and the stored H·g, sharded like the params under FSDP.
    'f3eo_hvp_every_2': f3eo_jax.f3eo(
      LEARNING_RATE, weight_decay=WEIGHT_DECAY, hvp_every=2, axis_name=axis_name
    ),
    'f3eo_reference': f3eo_jax.f3eo_reference(LEARNING_RATE, axis_name=axis_name),
  }


# The AdamW each optimizer reduces to when its meta term is dropped: both are
# add_meta_gradient followed by exactly optax.adamw's chain.
ADAMW_WEIGHT_DECAY = {'f3eo': WEIGHT_DECAY, 'f3eo_hvp_every_2': WEIGHT_DECAY, 'f3eo_reference': 0.0}


def step(tx, params, opt_state, x, y, obj_x, obj_y):
  """One training step: ``g`` from the batch ``(x, y)``, ``obj_fn`` the loss of ``(obj_x, obj_y)``.

  Correct steps pass the same batch twice (one compiled step serves both cases).
  Under ``jax.jit`` with the batch sharded over the mesh, ``obj_fn`` is the loss of the
  global batch, and XLA inserts every collective.
  """
  grads = jax.grad(loss_fn)(params, x, y)
  obj_fn = lambda p: loss_fn(p, obj_x, obj_y)
  updates, opt_state = tx.update(grads, opt_state, params, obj_fn=obj_fn)
  return optax.apply_updates(params, updates), opt_state


def donated_buffers(params, opt_state) -> list[jax.Array]:
  """The inputs a donating step consumes: the params and Adam's moments.

  (``jax.jit`` drops unused inputs, such as last step's diagnostics, before donating.)
  """
  adam = find_adam_state(opt_state)
  return jax.tree.leaves((params, adam.mu, adam.nu))


def find_adam_state(opt_state) -> optax.ScaleByAdamState:
  """The one ``ScaleByAdamState`` inside a chain's state."""
  is_adam = lambda s: isinstance(s, optax.ScaleByAdamState)
  found = [s for s in jax.tree.leaves(opt_state, is_leaf=is_adam) if is_adam(s)]
  assert len(found) == 1, opt_state
  return found[0]


def adamw_on_g_step(name, params, opt_state, x, y):
  """AdamW on ``g`` from the Adam moments of an f3eo state: the meta term dropped."""
  tx = optax.adamw(LEARNING_RATE, weight_decay=ADAMW_WEIGHT_DECAY[name])
  adam_state = (find_adam_state(opt_state), *tx.init(params)[1:])
  updates, _ = tx.update(jax.grad(loss_fn)(params, x, y), adam_state, params)
  return optax.apply_updates(params, updates)


@functools.cache
def single_device_runs() -> dict:
  """Every run of the tests on one device, as host numpy values.

  Returns:
    ``{'initial': params, name: {...}}`` per optimizer: ``params`` and ``diagnostics``
    after ``NUM_STEPS`` correct steps; and, from the state after ``MISMATCH_AFTER``
    correct steps, ``adamw_on_g`` (the next step with the meta term dropped),
    ``correct_step`` (with it), ``wrong_step`` (the library's step with a wrong
    ``obj_fn``) and ``next_step`` (one correct step after that), with diagnostics.
  """
  params, x, y, x_other, y_other = make_problem()
  out = {'initial': params}
  for name, tx in optimizers().items():
    run_step = jax.jit(functools.partial(step, tx))
    p, opt_state = params, tx.init(params)
    trajectory = []
    for _ in range(NUM_STEPS):
      trajectory.append((p, opt_state))
      p, opt_state = run_step(p, opt_state, x, y, x, y)
    p_k, state_k = trajectory[MISMATCH_AFTER]
    wrong_params, wrong_state = run_step(p_k, state_k, x, y, x_other, y_other)
    next_params, next_state = run_step(wrong_params, wrong_state, x, y, x, y)
    out[name] = to_host(
      {
        'params': p,
        'diagnostics': diagnostics_to_host(opt_state),
        'adamw_on_g': adamw_on_g_step(name, p_k, state_k, x, y),
        'correct_step': trajectory[MISMATCH_AFTER + 1][0],
        'wrong_step': wrong_params,
        'wrong_step_diagnostics': diagnostics_to_host(wrong_state),
        'next_step': next_params,
        'next_step_diagnostics': diagnostics_to_host(next_state),
      }
    )
  return out


def to_host(tree):
  return jax.tree.map(np.asarray, tree)


def diagnostics_to_host(opt_state) -> dict[str, float]:
  return {k: float(np.asarray(v)) for k, v in f3eo_jax.diagnostics(opt_state).items()}


def to_lists(tree):
  return jax.tree.map(lambda a: np.asarray(a).tolist(), tree)


def spec_string(spec: P) -> str:
  """A spec without trailing Nones: ``P('data', None)`` is ``P('data',)``."""
  spec = tuple(spec)
  while spec and spec[-1] is None:
    spec = spec[:-1]
  return str(P(*spec))


def spec_of(x) -> str:
  """The spec of an array's NamedSharding, as :func:`spec_string` writes it."""
  if not isinstance(x.sharding, NamedSharding):
    return type(x.sharding).__name__
  return spec_string(x.sharding.spec)


def raised(opt_state) -> str | None:
  """What ``f3eo_jax.raise_on_mismatch`` raised (its repr), or None."""
  try:
    f3eo_jax.raise_on_mismatch(opt_state)
  except f3eo_jax.GradientMismatchError as e:
    return repr(e)
  return None


# ---------------------------------------------------------------- bounded subprocesses


def start(command: list[str], log: pathlib.Path, **kwargs) -> subprocess.Popen:
  """Starts ``command`` in a session (process group) of its own, output to ``log``."""
  with open(log, 'wb') as out:
    return subprocess.Popen(
      command,
      stdin=subprocess.DEVNULL,
      stdout=out,
      stderr=subprocess.STDOUT,
      start_new_session=True,
      **kwargs,
    )


def kill_group(proc: subprocess.Popen) -> None:
  """SIGKILL to a running process's whole group (it leads its own session), then reap it.

  SIGKILL, not SIGTERM: a process blocked in a collective can ignore SIGTERM. Only
  while the leader is unreaped is its pid surely still this group's id.
  """
  if proc.poll() is None:
    with contextlib.suppress(ProcessLookupError):
      os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()


def run_bounded(command: list[str], log: pathlib.Path, timeout_s: float, **kwargs) -> int | None:
  """Runs ``command`` to completion, or kills its process group after ``timeout_s``.

  Returns:
    The return code, or None if it was killed on timeout.
  """
  proc = start(command, log, **kwargs)
  try:
    proc.communicate(timeout=timeout_s)
    return proc.returncode
  except subprocess.TimeoutExpired:
    return None
  finally:
    kill_group(proc)


# ---------------------------------------------------------------- sharing across pytest-xdist


# The execution modes of the consistency-check cases (tests/_consistency_cases.py).
MODES = (
  'jit_one_device',
  'jit_data_parallel',
  'jit_fsdp',
  'shard_map_vma',
  'shard_map_local_grads',
  'pmap',
)


def session_dir(tmp_path_factory) -> pathlib.Path:
  """The test session's temporary directory, common to all pytest-xdist workers."""
  root = tmp_path_factory.getbasetemp()
  return root.parent if os.environ.get('PYTEST_XDIST_WORKER') else root


@contextlib.contextmanager
def _locked(path: pathlib.Path):
  with open(path, 'w') as lock:
    fcntl.flock(lock, fcntl.LOCK_EX)
    try:
      yield
    finally:
      fcntl.flock(lock, fcntl.LOCK_UN)


def once_per_session(path: pathlib.Path, produce: Callable[[pathlib.Path], None]) -> dict:
  """The JSON file at ``path``, which ``produce(path)`` writes once per test session.

  A file lock makes concurrent pytest-xdist workers wait for the first one's result
  rather than redo it.
  """
  with _locked(path.with_suffix('.lock')):
    if not path.exists():
      produce(path)
  return json.loads(path.read_text())


def shared_single_device_runs(tmp_path_factory) -> dict:
  """:func:`single_device_runs`, computed once per test session (JSON lists)."""

  def produce(path):
    partial = path.with_suffix('.partial')
    partial.write_text(json.dumps(to_lists(single_device_runs())))
    partial.rename(path)

  return once_per_session(session_dir(tmp_path_factory) / 'single_device_runs.json', produce)


# ---------------------------------------------------------------- the checks

# Against the single-device run, to float32 rounding. The multi-device step sums the
# batch (and the all-reduced g and H·g) in another order, so g differs from the
# single-device g by a few float32 ulps (~1e-7 relative), and so do the inner products.
# Adam's update m̂/(√v̂+ε) is scale-free in g: each step's update (≤ lr = 1e-2 per
# coordinate) differs by ~1e-7 relative, and params of size ≤ 2 by ≲ 1e-6 after
# 4 steps. Measured (jaxlib 0.10.2, CPU): ≤ 5.6e-7 on params, ≤ 4.2e-7 relative on the
# diagnostics. The bounds leave a factor of ~20 for other builds and are still 700
# times below the change the meta term makes to one step (≥ 7.2e-3).
PARAM_TOL = 1e-5  # max |Δθ|: params are O(1), so a relative 1e-5
DIAG_RTOL = 1e-5  # ‖g‖², ⟨g,H·g⟩, ‖H·g‖, ‖m⊥‖, the measured mismatch
CHECK_RTOL = 1e-2  # the library's default check_consistency


def _arrays(tree) -> list[np.ndarray]:
  """The leaves as float64 arrays; a (nested) list, as JSON stores an array, is one leaf."""
  leaves = jax.tree.leaves(tree, is_leaf=lambda x: isinstance(x, list))
  return [np.asarray(a, np.float64) for a in leaves]


def max_abs_diff(a, b) -> float:
  pairs = list(zip(_arrays(a), _arrays(b), strict=True))
  assert all(u.shape == v.shape for u, v in pairs), [(u.shape, v.shape) for u, v in pairs]
  return max(float(np.max(np.abs(u - v))) for u, v in pairs)


def all_finite(tree) -> bool:
  return all(bool(np.all(np.isfinite(a))) for a in _arrays(tree))


def check_correct_run(run: dict, reference: dict) -> None:
  """The right obj_fn on every step: no mismatch, and the single-device numbers."""
  assert 'error' not in run, run['error']
  assert run['raised'] is None and run['raised_before'] is None
  assert run['diagnostics']['mismatch_count'] == 0
  assert run['diagnostics']['grad_mismatch'] < 1e-4  # measured: same loss, same batch
  assert max_abs_diff(run['params'], reference['params']) < PARAM_TOL
  for key in ('grad_sq_norm', 'g_dot_hg', 'hg_norm', 'meta_norm'):
    np.testing.assert_allclose(
      run['diagnostics'][key], reference['diagnostics'][key], rtol=DIAG_RTOL, err_msg=key
    )


def check_wrong_obj_fn_run(run: dict, reference: dict) -> None:
  """A step whose obj_fn is another batch's loss returns, without its meta term."""
  assert 'error' not in run, run['error']
  # the meta term changes this step by far more than the tolerance, or the check is void
  assert max_abs_diff(reference['correct_step'], reference['adamw_on_g']) > 100 * PARAM_TOL
  # the step returned; its donated inputs are gone, so its outputs are all there is
  assert run['donated_deleted']
  assert all_finite(run['params_after'])
  assert max_abs_diff(run['params_after'], reference['adamw_on_g']) < PARAM_TOL
  d = run['diagnostics_after']
  assert d['mismatch_count'] == 1
  assert d['grad_mismatch'] > CHECK_RTOL
  np.testing.assert_allclose(
    d['grad_mismatch'], reference['wrong_step_diagnostics']['grad_mismatch'], rtol=DIAG_RTOL
  )
  assert d['meta_norm'] == 0
  # raise_on_mismatch raised GradientMismatchError, which the worker caught
  assert run['raised_after'] is not None and 'GradientMismatchError' in run['raised_after']
  # a further step on the returned params and state runs and stays finite, and goes on
  # as on one device (with hvp_every=2 it reuses the stored product: the library keeps
  # none from a mismatched step, so there too the meta term is 0)
  assert all_finite(run['params_next'])
  assert max_abs_diff(run['params_next'], run['params_after']) > 100 * PARAM_TOL
  assert max_abs_diff(run['params_next'], reference['next_step']) < PARAM_TOL
  assert run['diagnostics_next']['mismatch_count'] == 1  # the count is kept
  np.testing.assert_allclose(
    run['diagnostics_next']['meta_norm'],
    reference['next_step_diagnostics']['meta_norm'],
    rtol=DIAG_RTOL,
  )
