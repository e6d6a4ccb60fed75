"""The gradient consistency check under every single-process execution mode.

F3EO compares the gradient of ``obj_fn`` with the incoming ``g`` inside the step. A
mismatch must not raise there (under ``jit``, sharding or several processes an
exception in the step loses the step, and with donated arguments the inputs too): it
drops the meta term for that step, so the step is AdamW on ``g``, and counts it;
``f3eo_jax.raise_on_mismatch`` raises on the host afterwards. These tests check that
on one device under ``jit``, under ``jit`` with ``NamedSharding`` (data parallel and
FSDP), ``shard_map`` (with and without varying-axis typing) and ``jax.pmap``, on 4
simulated CPU devices. The two-process run is in ``test_multiprocess.py``.

The cases run once, in a subprocess (``tests/_consistency_cases.py``), because the
device count must be set before JAX initialises; these tests read what it measured
and compare it with the single-device run computed here.
"""

from __future__ import annotations

import os
import pathlib
import sys

import _distributed_problem as problem
import pytest

pytestmark = pytest.mark.slow

CASES = pathlib.Path(__file__).with_name('_consistency_cases.py')
TIMEOUT_S = 300  # then the cases' process group gets SIGKILL; they take 30-60 s
MODES = problem.MODES
LOCAL_GRAD_MODES = ('shard_map_local_grads', 'pmap')
# What _consistency_cases.py runs: every optimizer on one device, two elsewhere.
CASE_IDS = [
  (m, n)
  for m in MODES
  for n in problem.OPTIMIZERS
  if m == 'jit_one_device' or n != 'f3eo_reference'
]


@pytest.fixture(scope='module')
def cases(tmp_path_factory):
  """What the subprocess measured; run once per test session."""

  def produce(path):
    env = {k: v for k, v in os.environ.items() if k != 'XLA_FLAGS'}
    log = path.with_suffix('.log')
    code = problem.run_bounded(
      [sys.executable, str(CASES), str(path)], log, TIMEOUT_S, cwd=CASES.parents[1], env=env
    )
    assert code == 0, f'consistency cases failed (exit {code}):\n{log.read_text()[-6000:]}'

  return problem.once_per_session(
    problem.session_dir(tmp_path_factory) / 'consistency_cases.json', produce
  )


@pytest.fixture(scope='module')
def reference(tmp_path_factory):
  """The same runs on one device, in this process."""
  return problem.shared_single_device_runs(tmp_path_factory)


@pytest.mark.parametrize('mode,name', CASE_IDS)
def test_correct_obj_fn_passes_and_matches_one_device(cases, reference, mode, name):
  run = cases[mode][name]
  problem.check_correct_run(run, reference[name])
  # shard_map and pmap return every device's params: the replicas must not part
  assert run['devices_agree'] is (None if mode.startswith('jit') else True)


@pytest.mark.parametrize('mode,name', CASE_IDS)
def test_wrong_obj_fn_drops_the_meta_term_and_raises_on_the_host(cases, reference, mode, name):
  run = cases[mode][name]
  problem.check_wrong_obj_fn_run(run, reference[name])
  assert run['devices_agree_after'] is (None if mode.startswith('jit') else True)
  if mode == 'jit_fsdp':
    assert run['param_specs_after'] == {
      k: problem.spec_string(v) for k, v in problem.FSDP_SPECS.items()
    }


@pytest.mark.parametrize('mode', LOCAL_GRAD_MODES)
@pytest.mark.parametrize('name', ('f3eo', 'f3eo_hvp_every_2'))
def test_a_mismatch_on_one_device_drops_the_meta_term_on_all(cases, reference, mode, name):
  """Local gradients, obj_fn wrong on the first device's slice only: the replicas agree."""
  run = cases[mode][name]['partly_wrong']
  reference = reference[name]
  assert run['devices_agree_after'] is True
  assert run['diagnostics_after']['mismatch_count'] == 1
  assert run['diagnostics_after']['grad_mismatch'] > problem.CHECK_RTOL
  assert run['raised_after'] is not None and 'GradientMismatchError' in run['raised_after']
  assert problem.max_abs_diff(run['params_after'], reference['adamw_on_g']) < problem.PARAM_TOL
