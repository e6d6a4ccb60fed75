"""XLA helpers shared by the benchmarks and the tests.

- :func:`use_host_devices`: simulated CPU devices (``--xla_force_host_platform_device_count``),
  set before JAX starts its backend.
- :func:`collectives`: the collectives of a compiled, SPMD-partitioned module, counted from
  its HLO text, optionally split by whether they sit inside a ``conditional`` branch.
- :func:`memory_bytes` and :func:`flops`: what XLA's ``memory_analysis()`` and
  ``cost_analysis()`` say a compiled step needs.

This module imports JAX only inside functions, so a script can import it, call
:func:`use_host_devices`, and import JAX afterwards.

Example:
  >>> from benchmarks import xla_utils
  >>> hlo = '''ENTRY %main {
  ...   %ar = f32[4,8]{1,0} all-reduce(f32[4,8]{1,0} %x), to_apply=%add
  ... }'''
  >>> xla_utils.collectives(hlo)
  {'all-reduce': {'count': 1, 'elements': 32, 'sizes': [32]}}
"""

from __future__ import annotations

import importlib.metadata
import os
import re
from typing import Any

import numpy as np

# `%name = SHAPE op(` where SHAPE is one array (`f32[4,8]{1,0}`) or a tuple of them.
_COLLECTIVE = re.compile(
  r'=\s*(?P<shape>\([^=]*?\)|[a-z0-9]+\[[0-9,]*\](?:\{[^}]*\})?)\s+'
  r'(?P<op>all-reduce|all-gather|reduce-scatter|all-to-all|collective-permute)(?:-start)?\('
)
_ARRAY = re.compile(r'[a-z]+[0-9]*\[([0-9,]*)\]')
_BRANCHES = re.compile(
  r'(?:branch_computations=\{(?P<list>[^}]*)\}|'
  r'(?:true|false)_computation=%?(?P<one>[\w.\-]+))'
)


def host_device_flags(num_devices: int, *, fast_compile: bool = False) -> str:
  """``XLA_FLAGS`` for ``num_devices`` simulated CPU devices, appended to the current ones.

  Args:
    num_devices: the device count.
    fast_compile: also turn off XLA:CPU's expensive optimisation passes (same HLO, same
      math, less compile time; for tests, not for timings).

  Returns:
    The flag string.
  """
  flags = [f'--xla_force_host_platform_device_count={num_devices}']
  if fast_compile:
    flags += ['--xla_backend_optimization_level=0', '--xla_llvm_disable_expensive_passes=true']
  jaxlib = tuple(int(v) for v in importlib.metadata.version('jaxlib').split('.')[:2])
  if jaxlib >= (0, 9):  # a busy host can starve a device thread past the 40 s rendezvous default
    flags += [
      '--xla_cpu_collective_call_terminate_timeout_seconds=600',
      '--xla_cpu_collective_timeout_seconds=600',
    ]
  return ' '.join([os.environ.get('XLA_FLAGS', ''), *flags]).strip()


def use_host_devices(num_devices: int, *, fast_compile: bool = False) -> None:
  """Sets ``XLA_FLAGS`` and ``JAX_PLATFORMS=cpu`` for ``num_devices`` simulated devices.

  Call it before JAX creates its backend (before the first ``jax.devices()`` or
  computation); afterwards the flags have no effect.
  """
  os.environ['XLA_FLAGS'] = host_device_flags(num_devices, fast_compile=fast_compile)
  os.environ['JAX_PLATFORMS'] = 'cpu'


def _branch_computations(hlo_text: str) -> set[str]:
  names = set()
  for m in _BRANCHES.finditer(hlo_text):
    found = m.group('list').split(',') if m.group('list') else [m.group('one')]
    names.update(name.strip().lstrip('%') for name in found)
  return names


def collectives(hlo_text: str, *, by_branch: bool = False) -> dict[str, dict[str, Any]]:
  """The collectives of a compiled module: op count, result elements and array sizes.

  Args:
    hlo_text: ``compiled.as_text()`` of a jitted function (SPMD-partitioned HLO).
    by_branch: key the counts by ``'<op> (always)'`` for ops outside any ``conditional``
      branch and ``'<op> (in_cond)'`` for those inside one (with ``hvp_every=k`` these
      run on one step in ``k``), instead of by ``'<op>'``.

  Returns:
    ``{key: {'count': ops, 'elements': total result elements, 'sizes': the result arrays'
    element counts, largest first}}``; elements are per device.
  """
  branch_names = _branch_computations(hlo_text) if by_branch else set()
  out: dict[str, dict[str, Any]] = {}
  current = ''
  hlo_text = re.sub(r'/\*.*?\*/', '', hlo_text)  # tuple shapes carry /*index=5*/ comments
  for line in hlo_text.splitlines():
    if line[:1] not in ('', ' ') and line.rstrip().endswith('{'):  # a computation's header
      current = line.removeprefix('ENTRY ').split(' ', 1)[0].lstrip('%')
      continue
    for m in _COLLECTIVE.finditer(line):
      sizes = [
        int(np.prod([int(d) for d in dims.split(',') if d], dtype=np.int64))
        for dims in _ARRAY.findall(m.group('shape'))
      ]
      key = m.group('op')
      if by_branch:
        key += ' (in_cond)' if current in branch_names else ' (always)'
      entry = out.setdefault(key, {'count': 0, 'elements': 0, 'sizes': []})
      entry['count'] += 1
      entry['elements'] += int(sum(sizes))
      entry['sizes'] = sorted(entry['sizes'] + sizes, reverse=True)
  return out


def memory_bytes(compiled) -> dict[str, int]:
  """XLA's ``memory_analysis()`` of a compiled function, and the step's peak.

  ``peak = argument + output + temp − alias``: the whole footprint of one call, inputs
  included, where ``alias`` is what donated inputs share with the outputs (zero without
  ``donate_argnums``).

  Returns:
    ``{'argument', 'output', 'temp', 'alias', 'peak'}`` in bytes.
  """
  mem = compiled.memory_analysis()
  out = {
    'argument': int(mem.argument_size_in_bytes),
    'output': int(mem.output_size_in_bytes),
    'temp': int(mem.temp_size_in_bytes),
    'alias': int(mem.alias_size_in_bytes),
  }
  out['peak'] = out['argument'] + out['output'] + out['temp'] - out['alias']
  return out


def flops(compiled) -> float:
  """XLA's ``cost_analysis()`` FLOP count of a compiled function (NaN if it has none).

  Both branches of a ``lax.cond`` are counted, so for a step with ``hvp_every=k`` this is
  not the per-step average.
  """
  cost = compiled.cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  return float(cost.get('flops', float('nan'))) if cost else float('nan')
