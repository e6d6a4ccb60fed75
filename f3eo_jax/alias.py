"""Complete F3EO optimizers: the meta-gradient followed by an AdamW step."""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from f3eo_jax.transform import MaskOrFn, Projection, add_meta_gradient

PyTree = Any


def f3eo(
    learning_rate: optax.ScalarOrSchedule,
    b1: float = 0.9,
    b2: float = 0.999,
    eps: float = 1e-8,
    weight_decay: float = 0.0,
    *,
    meta_coef: float = 1.0,
    orthogonalize: bool = True,
    projection: Projection = 'global',
    meta_clip_norm: float | None = None,
    hvp_every: int = 1,
    mask: MaskOrFn = None,
    axis_name: str | tuple[str, ...] | None = None,
    check_consistency: float | None = None,
) -> optax.GradientTransformationExtraArgs:
  """F3EO: AdamW on the gradient plus its orthogonalised meta-gradient ``H·g``.

  The effective gradient ``e = g + (meta_coef·H·g)⊥`` of
  :func:`f3eo_jax.add_meta_gradient` goes through ``scale_by_adam``, decoupled weight
  decay and the learning rate, exactly as ``optax.adamw`` treats a gradient. The
  defaults follow the theory note: ``+H·g`` (descend on the Fisher trace), global
  projection, no clipping. For the published PyTorch rule use :func:`f3eo_reference`.

  Args:
    learning_rate: a float or an ``optax`` schedule.
    b1: decay of the first moment.
    b2: decay of the second moment.
    eps: added to the denominator, outside the square root.
    weight_decay: decoupled weight decay, ``p ← p − lr·wd·p``.
    meta_coef: see :func:`f3eo_jax.add_meta_gradient`; so are the keywords below.
    orthogonalize: remove the component of the meta term along ``g``.
    projection: ``'global'`` or ``'per_leaf'``.
    meta_clip_norm: clip the meta term's global norm before projection.
    hvp_every: compute ``H·g`` every ``k`` steps and reuse it in between.
    mask: where the meta term applies (a bool pytree or a function of params).
    axis_name: mapped axis over which to average ``H·g`` (``shard_map``/``pmap``).
    check_consistency: relative tolerance for checking ``obj_fn`` against ``g``.

  Returns:
    An ``optax.GradientTransformationExtraArgs``; its ``update`` needs ``obj_fn=`` or
    ``hvp_fn=``.

  Example:
    >>> import jax, jax.numpy as jnp, optax
    >>> import f3eo_jax
    >>> loss = lambda p: jnp.sum((p - 1.0) ** 4)
    >>> params = jnp.zeros(3)
    >>> tx = f3eo_jax.f3eo(1e-1)
    >>> state = tx.init(params)
    >>> for _ in range(3):
    ...   grads = jax.grad(loss)(params)
    ...   updates, state = tx.update(grads, state, params, obj_fn=loss)
    ...   params = optax.apply_updates(params, updates)
    >>> bool(loss(params) < loss(jnp.zeros(3)))
    True
  """
  return optax.chain(
      add_meta_gradient(
          meta_coef,
          orthogonalize=orthogonalize,
          projection=projection,
          meta_clip_norm=meta_clip_norm,
          hvp_every=hvp_every,
          mask=mask,
          axis_name=axis_name,
          check_consistency=check_consistency,
      ),
      optax.scale_by_adam(b1=b1, b2=b2, eps=eps),
      optax.add_decayed_weights(weight_decay),
      optax.scale_by_learning_rate(learning_rate),
  )


class ScaleByAmsgradState(NamedTuple):
  """State of the PyTorch-style AMSGrad moment estimates."""

  count: jax.Array  # int32 scalar: steps taken.
  mu: optax.Updates  # first moment, like the params.
  nu: optax.Updates  # second moment, like the params.
  nu_max: optax.Updates  # running maximum of the raw (not bias-corrected) nu.


def scale_by_amsgrad_torch(
    b1: float = 0.9, b2: float = 0.999, eps: float = 1e-8
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

  Returns:
    An ``optax.GradientTransformation``.
  """

  def init_fn(params):
    zeros = optax.tree.zeros_like(params)
    return ScaleByAmsgradState(
        count=jnp.zeros((), jnp.int32), mu=zeros, nu=zeros, nu_max=zeros
    )

  def update_fn(updates, state, params=None):
    del params
    mu = optax.tree.update_moment(updates, state.mu, b1, 1)
    nu = optax.tree.update_moment_per_elem_norm(updates, state.nu, b2, 2)
    nu_max = jax.tree.map(jnp.maximum, state.nu_max, nu)
    count = optax.safe_int32_increment(state.count)
    # Default float dtype, as optax.tree.bias_correction: float32 would cap float64 runs at ~1e-6.
    bc1 = 1 - b1**count
    bc2 = 1 - b2**count
    new_updates = jax.tree.map(
        lambda m, v: (m / bc1.astype(m.dtype)) / (jnp.sqrt(v) / jnp.sqrt(bc2).astype(v.dtype) + eps),
        mu,
        nu_max,
    )
    return new_updates, ScaleByAmsgradState(count=count, mu=mu, nu=nu, nu_max=nu_max)

  return optax.GradientTransformation(init_fn, update_fn)


def f3eo_reference(
    learning_rate: optax.ScalarOrSchedule = 1e-3,
    b1: float = 0.9,
    b2: float = 0.999,
    eps: float = 1e-8,
    weight_decay: float = 0.0,
    amsgrad: bool = False,
    *,
    mask: MaskOrFn = None,
    axis_name: str | tuple[str, ...] | None = None,
) -> optax.GradientTransformationExtraArgs:
  """The published PyTorch F3EO rule, step for step.

  ``m = −2·H·g`` (the gradient of ``‖g‖²``, ascended), its global norm clipped to 1,
  projected per parameter tensor against that tensor's gradient, ``e = g + m⊥``
  (that is, ``g − (2·H·g)⊥``), then AdamW: decoupled weight decay, bias-corrected
  moments, ``ε`` outside the square root, and optionally PyTorch's AMSGrad.

  Args:
    learning_rate: a float or an ``optax`` schedule.
    b1: decay of the first moment.
    b2: decay of the second moment.
    eps: added to the denominator.
    weight_decay: decoupled weight decay.
    amsgrad: use the maximum of past second moments, as PyTorch does.
    mask: where the meta term applies (a bool pytree, or a function of params); the
      other leaves get plain AdamW on ``g``. See :func:`f3eo_jax.add_meta_gradient`.
    axis_name: mapped axis over which to average ``H·g`` (``shard_map``/``pmap``
      with local gradients); see :func:`f3eo_jax.add_meta_gradient`.

  Returns:
    An ``optax.GradientTransformationExtraArgs``; its ``update`` needs ``obj_fn=`` or
    ``hvp_fn=``.

  Example:
    >>> import f3eo_jax
    >>> tx = f3eo_jax.f3eo_reference(1e-3, weight_decay=5e-4)
  """
  scale_by_moments = (
      scale_by_amsgrad_torch(b1, b2, eps) if amsgrad else optax.scale_by_adam(b1=b1, b2=b2, eps=eps)
  )
  return optax.chain(
      add_meta_gradient(
          -2.0, projection='per_leaf', meta_clip_norm=1.0, mask=mask, axis_name=axis_name
      ),
      scale_by_moments,
      optax.add_decayed_weights(weight_decay),
      optax.scale_by_learning_rate(learning_rate),
  )
