"""F3EO for JAX: the Fisher-trace meta-gradient as an Optax transformation.

Public API:

- :func:`f3eo`: the theory's rule, capped so that it trains, followed by AdamW;
  :func:`f3eo_reference`: the published PyTorch rule, step for step.
- :func:`add_meta_gradient`: the transform ``g ↦ g + (c·H·g)⊥``, for your own chains.
- :func:`jit_amortized`: a training step compiled twice, refreshing ``H·g`` on one
  update in ``k`` (``hvp_every=k``) without a ``lax.cond``.
- :func:`hvp`, :func:`grad_and_hvp`, :func:`value_grad_and_hvp`,
  :func:`accumulated_value_grad_and_hvp`: matrix-free Hessian-vector products.
- :func:`diagnostics`: the last update's ``‖g‖²``, ``⟨g, H·g⟩``, ``‖H·g‖``, ``‖m⊥‖``,
  ``cos(g, H·g)``, the cap's scale and the safety counters;
  :func:`raise_on_mismatch`: the gradient check, turned into an exception on the host.
- :func:`scale_by_amsgrad_torch`: AMSGrad in PyTorch's order.

Flax helpers live in :mod:`f3eo_jax.flax` (needs the ``flax`` extra).
"""

import warnings as _warnings
from typing import Any as _Any

from f3eo_jax.alias import DEFAULT_META_MAX_RATIO, f3eo, f3eo_reference
from f3eo_jax.amortize import AmortizedStep, jit_amortized
from f3eo_jax.amsgrad import TorchAmsgradState, scale_by_amsgrad_torch
from f3eo_jax.hvp import accumulated_value_grad_and_hvp, grad_and_hvp, hvp, value_grad_and_hvp
from f3eo_jax.state import (
  GradientMismatchError,
  MetaGradientDiagnostics,
  MetaGradientState,
  diagnostics,
  raise_on_mismatch,
)
from f3eo_jax.transform import add_meta_gradient

__version__ = '0.3.0.dev0'

__all__ = [
  'DEFAULT_META_MAX_RATIO',
  'AmortizedStep',
  'GradientMismatchError',
  'MetaGradientDiagnostics',
  'MetaGradientState',
  'TorchAmsgradState',
  'accumulated_value_grad_and_hvp',
  'add_meta_gradient',
  'diagnostics',
  'f3eo',
  'f3eo_reference',
  'grad_and_hvp',
  'hvp',
  'jit_amortized',
  'raise_on_mismatch',
  'scale_by_amsgrad_torch',
  'value_grad_and_hvp',
]

_DEPRECATED = {
  'ScaleByAmsgradState': (
    TorchAmsgradState,
    'f3eo_jax.ScaleByAmsgradState is deprecated: it is not optax.ScaleByAmsgradState.'
    ' Use f3eo_jax.TorchAmsgradState.',
  ),
}


def __getattr__(name: str) -> _Any:
  if name in _DEPRECATED:
    value, message = _DEPRECATED[name]
    _warnings.warn(message, DeprecationWarning, stacklevel=2)
    return value
  raise AttributeError(f'module {__name__!r} has no attribute {name!r}')
