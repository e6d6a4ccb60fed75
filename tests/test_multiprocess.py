"""F3EO on two real JAX processes: a 4-device mesh over 2 × 2 CPU devices, Gloo over loopback.

``tests/_multiprocess_worker.py`` runs in two processes that join one cluster with
``jax.distributed.initialize`` (coordinator and Gloo on 127.0.0.1 only). Each process
feeds its half of the global batch; the step is the plain ``jax.jit`` step, in data
parallel and FSDP. The tests compare what both processes report with the same
optimizer run here, on one device, and check the consistency check across processes:
a wrong ``obj_fn`` drops the meta term for that step (an AdamW step on ``g``) and
``f3eo_jax.raise_on_mismatch`` raises on the host afterwards.

Every subprocess is bounded: a hung collective can ignore SIGTERM, so on timeout the
whole process group gets SIGKILL; XLA's CPU collective timeouts are lowered as well,
so a peer that stops answering fails the run in about a minute, with an error naming
the collective, rather than after half an hour. The module also runs the README's
multi-host recipe on two processes, when the README marks one for it.
"""

from __future__ import annotations

import importlib.metadata
import json
import os
import pathlib
import re
import socket
import subprocess
import sys
import time
from collections.abc import Callable

import _distributed_problem as problem
import pytest

pytestmark = pytest.mark.slow

WORKER = pathlib.Path(__file__).with_name('_multiprocess_worker.py')
NUM_PROCESSES = 2
TIMEOUT_S = 300  # the whole two-process run, which takes 25-50 s on 2 shared cores
# How long a process waits in a collective (a Gloo operation, or the rendezvous of its
# own devices) before it fails with an error naming the collective. XLA:CPU's defaults
# are 30 min and 40 s; 60 s is far above the skew between the processes here (a
# compilation, ~3 s) and makes a peer that stopped answering fail the run in ~1.5 min.
COLLECTIVE_TIMEOUT_S = 60
LAYOUTS = tuple(problem.LAYOUTS)


# ---------------------------------------------------------------- launching the cluster


def _free_loopback_port() -> int:
  with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
    s.bind(('127.0.0.1', 0))
    return s.getsockname()[1]


def _worker_env() -> dict[str, str]:
  """This environment without inherited device, cluster or proxy settings."""
  env = {
    k: v
    for k, v in os.environ.items()
    if not (k == 'XLA_FLAGS' or k.startswith('JAX_') or 'proxy' in k.lower())
  }
  flags = ['--xla_backend_optimization_level=0', '--xla_llvm_disable_expensive_passes=true']
  jaxlib = tuple(int(v) for v in importlib.metadata.version('jaxlib').split('.')[:2])
  if jaxlib >= (0, 9):
    flags += [
      f'--xla_cpu_collective_timeout_seconds={COLLECTIVE_TIMEOUT_S}',
      f'--xla_cpu_collective_call_terminate_timeout_seconds={COLLECTIVE_TIMEOUT_S}',
    ]
  env['XLA_FLAGS'] = ' '.join(flags)
  env['JAX_PLATFORMS'] = 'cpu'
  return env


def run_cluster(
  make_command: Callable[[str, int], list[str]],
  workdir: pathlib.Path,
  timeout_s: float = TIMEOUT_S,
) -> tuple[list[int | None], list[str]]:
  """Starts ``make_command(coordinator, process_id)`` for each process and waits, bounded.

  Each process leads its own session (process group), writes to ``workdir``, and is
  killed with its whole group if the run outlives ``timeout_s``.

  Returns:
    The return codes (None where the process was killed on timeout) and each process's
    combined stdout and stderr.
  """
  coordinator = f'127.0.0.1:{_free_loopback_port()}'
  procs, logs = [], [workdir / f'process_{i}.log' for i in range(NUM_PROCESSES)]
  try:
    for i, log in enumerate(logs):
      procs.append(
        problem.start(make_command(coordinator, i), log, cwd=WORKER.parents[1], env=_worker_env())
      )
    deadline = time.monotonic() + timeout_s
    codes = []
    for proc in procs:
      try:
        proc.communicate(timeout=max(deadline - time.monotonic(), 0.1))
        codes.append(proc.returncode)
      except subprocess.TimeoutExpired:
        codes.append(None)
  finally:
    for proc in procs:  # after a timeout, or an error here: leave nothing running
      problem.kill_group(proc)
  return codes, [log.read_text(errors='replace') for log in logs]


def run_two_processes(make_command, workdir: pathlib.Path, timeout_s: float = TIMEOUT_S) -> None:
  """:func:`run_cluster`, again on a new port if another program took the free one."""
  for _ in range(2):
    codes, logs = run_cluster(make_command, workdir, timeout_s)
    if codes == [0] * NUM_PROCESSES or not any(map(_bind_failed, logs)):
      break
  report = '\n'.join(
    f'--- process {i} (exit {c}) ---\n{log[-4000:]}' for i, (c, log) in enumerate(zip(codes, logs))
  )
  assert codes == [0] * NUM_PROCESSES, f'two-process run failed:\n{report}'


def _bind_failed(output: str) -> bool:
  return bool(re.search(r'address already in use|failed to bind', output, re.IGNORECASE))


@pytest.fixture(scope='module')
def processes(tmp_path_factory):
  """What each of the two processes measured; run once per test session."""
  workdir = problem.session_dir(tmp_path_factory) / 'multiprocess'
  workdir.mkdir(exist_ok=True)
  out = str(workdir / 'process_{}.json')

  def produce(path):
    run_two_processes(
      lambda coordinator, i: [
        sys.executable,
        str(WORKER),
        coordinator,
        str(NUM_PROCESSES),
        str(i),
        out,
      ],
      workdir,
    )
    results = [json.loads(pathlib.Path(out.format(i)).read_text()) for i in range(NUM_PROCESSES)]
    path.write_text(json.dumps(results))

  return problem.once_per_session(workdir / 'processes.json', produce)


@pytest.fixture(scope='module')
def reference(tmp_path_factory):
  """The same runs on one device, here (no mesh)."""
  return problem.shared_single_device_runs(tmp_path_factory)


# ---------------------------------------------------------------- the tests


def test_cluster_is_two_processes_of_two_devices(processes):
  half = problem.GLOBAL_BATCH // 2
  for i, result in enumerate(processes):
    assert result['process_index'] == i
    assert result['process_count'] == NUM_PROCESSES
    assert (result['device_count'], result['local_device_count']) == (4, 2)
    assert result['mesh_processes'] == [0, 0, 1, 1]
    assert result['local_batch_rows'] == list(range(i * half, (i + 1) * half))  # its half only
    assert result['gloo'] != 'default'  # kept on loopback


@pytest.mark.parametrize('layout', LAYOUTS)
@pytest.mark.parametrize('name', problem.OPTIMIZERS)
def test_matches_single_device(processes, reference, layout, name):
  """The right obj_fn throughout: same params and diagnostics, no mismatch, no exception."""
  for result in processes:
    problem.check_correct_run(result[layout][name], reference[name])
  # the comparison means something only if training moved the params
  assert problem.max_abs_diff(reference[name]['params'], reference['initial']) > 0.01
  # both processes hold the same global values
  assert processes[0][layout][name]['params'] == processes[1][layout][name]['params']


@pytest.mark.parametrize('name', problem.OPTIMIZERS)
def test_fsdp_keeps_params_and_moments_sharded(processes, name):
  for result in processes:
    run = result['fsdp'][name]
    assert run['param_specs'] == {'w1': "P('data',)", 'b1': 'P()', 'w2': "P('data',)", 'b2': 'P()'}
    assert run['param_specs_after'] == run['param_specs']
    # Adam's moments (and the stored H·g with hvp_every=2) stay sharded like w1.
    assert run['state_specs_w1'] == ["P('data',)"]


@pytest.mark.parametrize('layout', LAYOUTS)
@pytest.mark.parametrize('name', problem.OPTIMIZERS)
def test_wrong_obj_fn_drops_the_meta_term_and_raises_on_the_host(
  processes, reference, layout, name
):
  """An obj_fn of another batch: the step returns an AdamW step on g, then the host raises."""
  reference = reference[name]
  for result in processes:
    problem.check_wrong_obj_fn_run(result[layout][name], reference)
  assert processes[0][layout][name]['params_after'] == processes[1][layout][name]['params_after']
  # the library on one device does the same
  assert problem.max_abs_diff(reference['wrong_step'], reference['adamw_on_g']) < problem.PARAM_TOL


# ---------------------------------------------------------------- the README recipe and the harness

README = pathlib.Path(__file__).resolve().parents[1] / 'README.md'
# README snippets that this module runs on two processes are marked (test_readme.py skips them)
# <!-- readme-test: skip (two processes: tests/test_multiprocess.py runs it) -->
_BLOCK = re.compile(
  r'(?:<!--\s*readme-test:\s*(?P<directive>[^>]*?)\s*-->\s*\n)?```python\n(?P<code>.*?)```',
  re.DOTALL,
)


def multi_host_recipes(text: str) -> list[str]:
  """The README's python snippets whose readme-test directive names this module."""
  return [
    m.group('code')
    for m in _BLOCK.finditer(text)
    if 'test_multiprocess.py' in (m.group('directive') or '')
  ]


def test_readme_multi_host_recipe_runs_on_two_processes(tmp_path):
  recipes = multi_host_recipes(README.read_text(encoding='utf-8'))
  if not recipes:
    pytest.skip('README.md marks no snippet for tests/test_multiprocess.py')
  for k, code in enumerate(recipes):
    script = tmp_path / f'recipe_{k}.py'
    script.write_text(code, encoding='utf-8')
    run_two_processes(
      lambda coordinator, i, script=script: [
        sys.executable,
        str(WORKER),
        '--script',
        str(script),
        coordinator,
        str(NUM_PROCESSES),
        str(i),
      ],
      tmp_path,
    )


_HANG = """
import signal, subprocess, sys, time
signal.signal(signal.SIGTERM, signal.SIG_IGN)  # as a process stuck in a collective may
child = subprocess.Popen([sys.executable, '-c', 'import signal, time;'
                          ' signal.signal(signal.SIGTERM, signal.SIG_IGN); time.sleep(600)'])
with open(sys.argv[1], 'w') as f:
  f.write(str(child.pid))
time.sleep(600)
"""


def _running(pid: int) -> bool:
  """Whether ``pid`` is alive (a zombie, killed and awaiting its reaper, is not)."""
  try:
    stat = pathlib.Path(f'/proc/{pid}/stat').read_text()
  except FileNotFoundError:
    return False
  return stat.rsplit(')', 1)[1].split()[0] != 'Z'


@pytest.mark.skipif(not pathlib.Path('/proc/self/stat').exists(), reason='reads /proc')
def test_a_hung_run_is_killed_with_everything_it_started(tmp_path):
  """The bound itself: processes that ignore SIGTERM, and their children, are gone in time."""
  pid_files = [tmp_path / f'child_{i}.pid' for i in range(NUM_PROCESSES)]
  start = time.monotonic()
  codes, _ = run_cluster(
    lambda _, i: [sys.executable, '-c', _HANG, str(pid_files[i])], tmp_path, timeout_s=3
  )
  assert codes == [None] * NUM_PROCESSES
  assert time.monotonic() - start < 30
  children = [int(f.read_text()) for f in pid_files]
  deadline = time.monotonic() + 5
  while any(map(_running, children)) and time.monotonic() < deadline:
    time.sleep(0.05)
  assert not any(map(_running, children))
