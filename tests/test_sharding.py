"""F3EO on simulated CPU devices: same numbers, no gathers, known traffic, and the check.

On 8 devices (``tests/_sharding_cases.py``): every layout trains 4 steps and is compared
with the same optimizer on one device; products ``H·g`` with a dense Hessian of the
global loss; collectives are counted in the compiled HLO. On 4 devices
(``tests/_consistency_cases.py``): the gradient check in every execution mode. Each
script runs once, in a subprocess, because the device count must be set before JAX
initialises; these tests read what it measured.
"""

from __future__ import annotations

import os
import pathlib
import sys

import _distributed_problem as problem
import pytest

pytestmark = pytest.mark.slow

CASES = pathlib.Path(__file__).with_name('_sharding_cases.py')
PARAM_TOL = 1e-5  # max |Δθ| after 4 steps; float32 reductions in another order give ~1e-6
DIAG_RTOL = 1e-4
HVP_RTOL = 1e-5
OPTIMIZERS = ('f3eo', 'f3eo_reference', 'f3eo_hvp_every_2')


def _cases_once(script, tmp_path_factory, timeout_s):
  """What ``script OUT.json`` measured, in a subprocess run once per test session (shared
  by pytest-xdist workers); its process group is killed after ``timeout_s``."""

  def produce(out):
    env = {k: v for k, v in os.environ.items() if k != 'XLA_FLAGS'}
    # the cases import the library (and helpers) from the repository root
    repo = str(script.parents[1])
    env['PYTHONPATH'] = os.pathsep.join(filter(None, [repo, env.get('PYTHONPATH')]))
    log = out.with_suffix('.log')
    code = problem.run_bounded(
      [sys.executable, str(script), str(out)], log, timeout_s, cwd=repo, env=env
    )
    assert code == 0, f'{script.name} failed (exit {code}):\n{log.read_text()[-6000:]}'

  return problem.once_per_session(
    problem.session_dir(tmp_path_factory) / f'{script.stem.lstrip("_")}.json', produce
  )


@pytest.fixture(scope='module')
def cases(tmp_path_factory):
  """The sharding cases on 8 devices."""
  return _cases_once(CASES, tmp_path_factory, timeout_s=900)


def _assert_matches_single_device(result, name):
  assert result['param_err'] < PARAM_TOL, (name, result)
  assert result['diag_rel_err'] < DIAG_RTOL, (name, result)
  # the comparison means something only if training moved the params
  assert result['param_moved'] > 100 * PARAM_TOL, (name, result)
  assert result['grad_mismatch'] < 1e-4, (name, result)


@pytest.mark.parametrize('name', OPTIMIZERS)
def test_jit_data_parallel_matches_single_device(cases, name):
  result = cases['jit_data_parallel'][name]
  _assert_matches_single_device(result, name)
  assert set(result['out_specs'].values()) == {'P()'}


@pytest.mark.parametrize('name', OPTIMIZERS)
def test_jit_fsdp_matches_single_device_and_keeps_shardings(cases, name):
  result = cases['jit_fsdp'][name]
  _assert_matches_single_device(result, name)
  assert result['in_specs']['w1'] == "P('data',)"  # leading dim over the 'data' axis
  assert result['out_specs'] == result['in_specs']
  # Adam moments (and the H·g buffer with hvp_every > 1) stay sharded like w1.
  assert result['state_specs_w1'] == ["P('data',)"]


def test_fsdp_on_explicit_mesh_matches_single_device(cases):
  """jax.make_mesh defaults to Explicit axes: a sharded dot in an inner product fails there."""
  result = cases['explicit_fsdp']
  _assert_matches_single_device(result, 'f3eo')
  assert result['w1_type'] == 'float32[16@data,32]'


@pytest.mark.parametrize('form', ['', '_separate'])
@pytest.mark.parametrize('name', ['f3eo', 'f3eo_hvp_every_2', 'f3eo_last_axis'])
def test_transform_on_sharded_params_needs_only_scalar_all_reduces(cases, name, form):
  """Both forms of the reductions: CPU's (compiled here) and GPU/TPU's (``_separate``).

  ``f3eo_last_axis``: a leaf sharded along its last axis, which the CPU form splits into
  rows of 8; each device holds whole rows.
  """
  collectives = cases['hlo'][f'transform_{name}{form}']
  assert set(collectives) == {'all-reduce'}, collectives
  assert set(collectives['all-reduce']['sizes']) == {1}, collectives


def test_raveled_inner_products_would_gather_the_params(cases):
  """The check above can fail: raveling the pytree gathers every sharded leaf."""
  gathered = cases['hlo']['raveled_projection']['all-gather']['sizes']
  assert max(gathered) == max(cases['param_sizes'])


def test_fsdp_step_gathers_only_what_the_model_needs(cases):
  hlo = cases['hlo']
  f3eo, model = hlo['jit_fsdp_f3eo_unchecked'], hlo['jit_fsdp_grad_and_hvp']
  # the same weight gathers as a bare gradient + jvp-of-gradient step: none from the transform
  assert f3eo['all-gather']['sizes'] == model['all-gather']['sizes']
  # AdamW gathers each weight once; the HVP's second pass through the model gathers again
  assert f3eo['all-gather']['count'] == 2 * hlo['jit_fsdp_adamw']['all-gather']['count']
  large = lambda sizes: sum(s for s in sizes if s > 1)
  assert large(f3eo['all-reduce']['sizes']) <= large(model['all-reduce']['sizes'])


def test_extra_communication_is_one_parameter_sized_all_reduce(cases):
  """AdamW all-reduces g; F3EO also all-reduces H·g, whichever way it is parallelised."""
  hlo, num_params = cases['hlo'], sum(cases['param_sizes'])
  assert hlo['jit_data_parallel_adamw']['all-reduce']['elements'] == num_params
  for mode in ('shard_map_local_grads_f3eo', 'shard_map_vma_f3eo'):
    assert set(hlo[mode]) == {'all-reduce'}
    assert hlo[mode]['all-reduce']['elements'] == 2 * num_params, mode
  gspmd = hlo['jit_data_parallel_f3eo_unchecked']['all-reduce']['elements']
  assert 2 * num_params <= gspmd <= 2.5 * num_params


def test_gradient_check_costs_one_more_parameter_sized_all_reduce_under_gspmd(cases):
  """Under jit + NamedSharding, obj_fn's gradient (to compare with g) is reduced on its own."""
  hlo, num_params = cases['hlo'], sum(cases['param_sizes'])
  for layout in ('jit_data_parallel', 'jit_fsdp'):
    checked = hlo[f'{layout}_f3eo']['all-reduce']['elements']
    unchecked = hlo[f'{layout}_f3eo_unchecked']['all-reduce']['elements']
    # num_params elements, plus the handful of scalars the comparison itself reduces.
    assert num_params <= checked - unchecked <= num_params + 32, layout


def _assert_hvp_is_global(result):
  assert result['grad_err'] < HVP_RTOL * 10, result
  assert result['hg_err'] < HVP_RTOL * result['hg_scale'], result


def test_hvp_under_jit_sharding_is_the_global_product(cases):
  _assert_hvp_is_global(cases['jit_data_parallel_hvp'])


def test_hvp_under_shard_map_with_local_grads_needs_pmean(cases):
  _assert_hvp_is_global(cases['shard_map_local_grads_hvp'])


def test_hvp_under_shard_map_vma_is_already_device_summed(cases):
  result = cases['shard_map_vma_hvp']
  _assert_hvp_is_global(result)
  assert result['vma_of_loss'] == ['data']  # the local loss varies over devices
  assert result['vma_of_g'] == [] and result['vma_of_hg'] == []  # g and H·g do not


@pytest.mark.parametrize('name', ['f3eo', 'f3eo_hvp_every_2'])
def test_shard_map_local_grads_with_axis_name_matches_single_device(cases, name):
  _assert_matches_single_device(cases['shard_map_local_grads'][name], name)


def test_shard_map_local_grads_without_axis_name_differs(cases):
  """Local H·g, not averaged: the run drifts from the single-device one."""
  assert cases['shard_map_local_grads_without_axis_name']['param_err'] > 100 * PARAM_TOL


def test_pmap_with_axis_name_matches_single_device(cases):
  _assert_matches_single_device(cases['pmap']['f3eo_reference'], 'f3eo_reference')


@pytest.mark.parametrize('name', OPTIMIZERS)
def test_shard_map_vma_without_axis_name_matches_single_device(cases, name):
  _assert_matches_single_device(cases['shard_map_vma'][name], name)


def test_shard_map_vma_with_axis_name_is_harmless(cases):
  _assert_matches_single_device(cases['shard_map_vma_with_axis_name'], 'f3eo')


# The gradient check under every single-process execution mode, on 4 devices.
#
# A mismatch must not raise inside the step (under jit, sharding or several processes an
# exception in the step loses the step, and with donated arguments the inputs too): it
# drops the meta term for that step, so the step is AdamW on g, and counts it;
# raise_on_mismatch raises on the host afterwards. Checked on one device under jit, under
# jit with NamedSharding (data parallel and FSDP), shard_map (with and without
# varying-axis typing) and jax.pmap; the two-process run is in test_multiprocess.py.

CONSISTENCY_CASES = CASES.with_name('_consistency_cases.py')
LOCAL_GRAD_MODES = ('shard_map_local_grads', 'pmap')
# What _consistency_cases.py runs: every optimizer on one device, two elsewhere.
CASE_IDS = [
  (m, n)
  for m in problem.MODES
  for n in problem.OPTIMIZERS
  if m == 'jit_one_device' or n != 'f3eo_reference'
]


@pytest.fixture(scope='module')
def consistency_cases(tmp_path_factory):
  """The consistency cases on 4 devices; they take 30-60 s."""
  return _cases_once(CONSISTENCY_CASES, tmp_path_factory, timeout_s=300)


@pytest.fixture(scope='module')
def reference(tmp_path_factory):
  """The same runs on one device, in this process."""
  return problem.shared_single_device_runs(tmp_path_factory)


@pytest.mark.parametrize('mode,name', CASE_IDS)
def test_correct_obj_fn_passes_and_matches_one_device(consistency_cases, reference, mode, name):
  run = consistency_cases[mode][name]
  problem.check_correct_run(run, reference[name])
  # shard_map and pmap return every device's params: the replicas must not part
  assert run['devices_agree'] is (None if mode.startswith('jit') else True)


@pytest.mark.parametrize('mode,name', CASE_IDS)
def test_wrong_obj_fn_drops_the_meta_term_and_raises_on_the_host(
  consistency_cases, reference, mode, name
):
  run = consistency_cases[mode][name]
  problem.check_wrong_obj_fn_run(run, reference[name])
  assert run['devices_agree_after'] is (None if mode.startswith('jit') else True)
  if mode == 'jit_fsdp':
    assert run['param_specs_after'] == {
      k: problem.spec_string(v) for k, v in problem.FSDP_SPECS.items()
    }


@pytest.mark.parametrize('mode', LOCAL_GRAD_MODES)
@pytest.mark.parametrize('name', ('f3eo', 'f3eo_hvp_every_2'))
def test_a_mismatch_on_one_device_drops_the_meta_term_on_all(
  consistency_cases, reference, mode, name
):
  """Local gradients, obj_fn wrong on the first device's slice only: the replicas agree."""
  run = consistency_cases[mode][name]['partly_wrong']
  reference = reference[name]
  assert run['devices_agree_after'] is True
  assert run['diagnostics_after']['mismatch_count'] == 1
  assert run['diagnostics_after']['grad_mismatch'] > problem.CHECK_RTOL
  assert run['raised_after'] is not None and 'GradientMismatchError' in run['raised_after']
  assert problem.max_abs_diff(run['params_after'], reference['adamw_on_g']) < problem.PARAM_TOL
