"""F3EO under JAX SPMD on 8 simulated CPU devices: same numbers, no gathers, known traffic.

The cases run once, in a subprocess (``tests/_sharding_cases.py``), because the device
count must be set before JAX initialises; these tests read what it measured. Every
layout trains 4 steps and is compared with the same optimizer on one device; products
``H·g`` are compared with a dense Hessian of the global loss.
"""

from __future__ import annotations

import os
import pathlib
import subprocess
import sys

import _distributed_problem as problem
import pytest

pytestmark = pytest.mark.slow

CASES = pathlib.Path(__file__).with_name('_sharding_cases.py')
PARAM_TOL = 1e-5  # max |Δθ| after 4 steps; float32 reductions in another order give ~1e-6
DIAG_RTOL = 1e-4
HVP_RTOL = 1e-5
OPTIMIZERS = ('f3eo', 'f3eo_reference', 'f3eo_hvp_every_2')


@pytest.fixture(scope='module')
def cases(tmp_path_factory):
  """Runs the multi-device cases once per test session, shared by pytest-xdist workers."""

  def produce(out):
    env = {k: v for k, v in os.environ.items() if k != 'XLA_FLAGS'}
    # the cases import benchmarks.xla_utils from the repository root
    repo = str(CASES.parents[1])
    env['PYTHONPATH'] = os.pathsep.join(filter(None, [repo, env.get('PYTHONPATH')]))
    cmd = [sys.executable, str(CASES), str(out)]
    result = subprocess.run(cmd, cwd=repo, env=env, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, f'multi-device cases failed:\n{result.stderr[-6000:]}'

  return problem.once_per_session(
    problem.session_dir(tmp_path_factory) / 'sharding_cases.json', produce
  )


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
