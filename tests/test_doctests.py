"""The ``Example:`` sections of the library's docstrings run and print what they show."""

from __future__ import annotations

import doctest
import importlib

import pytest

MODULES = ['f3eo_jax', 'f3eo_jax.alias', 'f3eo_jax.hvp', 'f3eo_jax.transform', 'f3eo_jax.flax']
MUST_HAVE_EXAMPLES = {'f3eo_jax.hvp', 'f3eo_jax.transform', 'f3eo_jax.alias', 'f3eo_jax.flax'}


@pytest.mark.parametrize('module_name', MODULES)
def test_docstring_examples_pass(module_name):
  module = importlib.import_module(module_name)

  result = doctest.testmod(
    module, optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE, verbose=False
  )

  assert result.failed == 0, f'{result.failed} docstring example(s) failed in {module_name}'
  if module_name in MUST_HAVE_EXAMPLES:
    assert result.attempted > 0, f'{module_name} has no docstring examples'
