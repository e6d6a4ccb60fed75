"""XLA helpers shared by the benchmarks and the tests: simulated CPU devices, the
collectives of a compiled module (from its HLO text), XLA's memory and FLOP counts. JAX is
imported only inside functions, so a script can call :func:`use_host_devices` first.

Example:
  >>> from benchmarks import xla_utils
  >>> hlo = 'ENTRY %main {\\n  %ar = f32[4,8]{1,0} all-reduce(f32[4,8]{1,0} %x), to_apply=%add\\n}'
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

  ``fast_compile`` also turns off XLA:CPU's expensive passes (same math; for tests).
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
  """Sets ``XLA_FLAGS`` and ``JAX_PLATFORMS=cpu`` for ``num_devices`` simulated devices
  (before JAX creates its backend: afterwards the flags have no effect)."""
  os.environ['XLA_FLAGS'] = host_device_flags(num_devices, fast_compile=fast_compile)
  os.environ['JAX_PLATFORMS'] = 'cpu'


def _branch_computations(hlo_text: str) -> set[str]:
  names = set()
  for m in _BRANCHES.finditer(hlo_text):
    found = m.group('list').split(',') if m.group('list') else [m.group('one')]
    names.update(name.strip().lstrip('%') for name in found)
  return names


def collectives(hlo_text: str, *, by_branch: bool = False) -> dict[str, dict[str, Any]]:
  """The collectives of ``compiled.as_text()``: op count, result elements (per device), sizes.

  ``by_branch`` keys them ``'<op> (always)'`` or ``'<op> (in_cond)'`` (inside a
  ``conditional`` branch: with ``hvp_every=k``, one step in ``k``) instead of ``'<op>'``.
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
  """XLA's ``memory_analysis()`` in bytes, and ``peak = argument + output + temp − alias``
  (the whole footprint of one call; ``alias``: what donated inputs share with outputs)."""
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
  """XLA's ``cost_analysis()`` FLOP count (NaN if none); a ``lax.cond`` counts both branches."""
  cost = compiled.cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  return float(cost.get('flops', float('nan'))) if cost else float('nan')
