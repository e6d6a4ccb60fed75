"""PyTorch's AMSGrad, for exact parity with the published F3EO."""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from f3eo_jax._types import ScalarLike


class TorchAmsgradState(NamedTuple):
  """State of :func:`scale_by_amsgrad_torch`."""

  count: jax.Array  # type: ignore[assignment]
  """int32 scalar: the steps taken, as in Adam."""
  mu: optax.Updates
  """The first moment, like the params (dtype ``mu_dtype`` if given)."""
  nu: optax.Updates
  """The second moment, like the params."""
  nu_max: optax.Updates
  """The running maximum of the raw (not bias-corrected) second moment."""


def scale_by_amsgrad_torch(
  b1: ScalarLike = 0.9,
  b2: ScalarLike = 0.999,
  eps: ScalarLike = 1e-8,
  mu_dtype: Any | None = None,
) -> optax.GradientTransformation:
  """AMSGrad as ``torch.optim.Adam(W)(amsgrad=True)`` computes it.

  PyTorch keeps the maximum of the raw second moment ``v`` and bias-corrects that
  maximum with the current step: ``m̂ / (√max(v) / √(1−β2ᵗ) + ε)``. This differs from
  ``optax.scale_by_amsgrad``, which takes the maximum of the bias-corrected ``v̂``;
  exact parity with the published F3EO needs PyTorch's order.

  Args:
    b1: decay of the first moment.
    b2: decay of the second moment.
    eps: added to the denominator.
    mu_dtype: dtype of the first moment, as in ``optax.scale_by_adam``; ``None``
      keeps the params' dtypes.

  Returns:
    An ``optax.GradientTransformation`` whose state is a :class:`TorchAmsgradState`.

  Example:
    >>> import jax.numpy as jnp, optax
    >>> import f3eo_jax
    >>> tx = f3eo_jax.scale_by_amsgrad_torch()
    >>> updates, state = tx.update({'w': jnp.ones(2)}, tx.init({'w': jnp.zeros(2)}))
    >>> updates['w']
    Array([0.99999..., 0.99999...], dtype=float32)
  """
  mu_dtype = None if mu_dtype is None else jax.dtypes.canonicalize_dtype(mu_dtype)

  def init_fn(params):
    # Three separate trees: donating a state whose moments share one buffer fails.
    return TorchAmsgradState(
      count=jnp.zeros((), jnp.int32),
      mu=optax.tree.zeros_like(params, dtype=mu_dtype),
      nu=optax.tree.zeros_like(params),
      nu_max=optax.tree.zeros_like(params),
    )

  def update_fn(updates, state, params=None):
    del params
    mu = optax.tree.update_moment(updates, state.mu, b1, 1)
    nu = optax.tree.update_moment_per_elem_norm(updates, state.nu, b2, 2)
    nu_max = jax.tree.map(jnp.maximum, state.nu_max, nu)
    count = optax.safe_int32_increment(state.count)
    # Default float dtype, as optax.tree.bias_correction: float32 would cap float64 runs at ~1e-6.
    bc1 = 1 - jnp.asarray(b1) ** count
    bc2 = 1 - jnp.asarray(b2) ** count
    new_updates = jax.tree.map(
      lambda m, v: (m / bc1.astype(m.dtype)) / (jnp.sqrt(v) / jnp.sqrt(bc2).astype(v.dtype) + eps),
      mu,
      nu_max,
    )
    new_updates = optax.tree.cast_like(new_updates, updates)
    mu = optax.tree.cast(mu, mu_dtype) if mu_dtype is not None else mu
    return new_updates, TorchAmsgradState(count=count, mu=mu, nu=nu, nu_max=nu_max)

  return optax.GradientTransformation(init_fn, update_fn)
