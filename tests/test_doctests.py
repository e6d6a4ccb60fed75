"""The ``Example:`` sections of the library's docstrings run and print what they show."""

from __future__ import annotations

import doctest
import importlib

import pytest

# Every module of the library; a public function or class there carries an example.
MODULES = sorted(
  {'f3eo_jax', 'f3eo_jax.flax'}
  | {f'f3eo_jax.{name}' for name in ('alias', 'amortize', 'amsgrad', 'hvp', 'state', 'transform')}
)
MUST_HAVE_EXAMPLES = set(MODULES) - {'f3eo_jax'}


@pytest.mark.parametrize('module_name', MODULES)
def test_docstring_examples_pass(module_name):
  module = importlib.import_module(module_name)

  result = doctest.testmod(
    module, optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE, verbose=False
  )

  assert result.failed == 0, f'{result.failed} docstring example(s) failed in {module_name}'
  if module_name in MUST_HAVE_EXAMPLES:
    assert result.attempted > 0, f'{module_name} has no docstring examples'
