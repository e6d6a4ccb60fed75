"""F3EO for JAX: the Fisher-trace meta-gradient as an Optax transformation.

Public API:

- :func:`hvp`, :func:`grad_and_hvp`, :func:`value_grad_and_hvp`: matrix-free
  Hessian-vector products.
- :func:`add_meta_gradient`: the transform ``g ↦ g + (c·H·g)⊥``.
- :func:`f3eo`: the theory's rule followed by AdamW; :func:`f3eo_reference`: the
  published PyTorch rule, step for step.
- :func:`diagnostics`: the last step's ``‖g‖²``, ``⟨g, H·g⟩``, ``‖H·g‖``, ``‖m⊥‖`` and
  ``cos(g, H·g)``.

Flax helpers live in :mod:`f3eo_jax.flax` (needs the ``flax`` extra).
"""

from f3eo_jax.alias import ScaleByAmsgradState, f3eo, f3eo_reference, scale_by_amsgrad_torch
from f3eo_jax.hvp import grad_and_hvp, hvp, value_grad_and_hvp
from f3eo_jax.transform import (
    GradientMismatchError,
    MetaGradientDiagnostics,
    MetaGradientState,
    add_meta_gradient,
    diagnostics,
)

__version__ = '0.1.0'

__all__ = [
    'GradientMismatchError',
    'MetaGradientDiagnostics',
    'MetaGradientState',
    'ScaleByAmsgradState',
    'add_meta_gradient',
    'diagnostics',
    'f3eo',
    'f3eo_reference',
    'grad_and_hvp',
    'hvp',
    'scale_by_amsgrad_torch',
    'value_grad_and_hvp',
]
