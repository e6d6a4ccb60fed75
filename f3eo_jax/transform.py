r"""The F3EO meta-gradient as an Optax transformation: :func:`add_meta_gradient`.

Its update is the algorithm, step by step, each step a function of another module:

1. the product ``H·g`` (:mod:`f3eo_jax.product`): computed from ``obj_fn`` or ``hvp_fn``
   and checked against ``g``, or reused from the state;
2. two passes of scaled sums over ``g`` and ``H·g`` (:func:`f3eo_jax.meta_term.segment_sums`);
3. the optional clip, the projection, the optional cap and the guard against non-finite
   values (:mod:`f3eo_jax.meta_term`): scalar algebra on those sums;
4. the combination ``e = g + m⊥``, one elementwise pass;
5. the new state: the stored product and the diagnostics (:mod:`f3eo_jax.state`).
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp
import optax

from f3eo_jax import checks, meta_term
from f3eo_jax import product as product_lib
from f3eo_jax._types import AxisName, MaskOrFn, Projection, ScalarLike
from f3eo_jax.layout import Layout, make_layout
from f3eo_jax.state import (
  MetaGradientDiagnostics,
  MetaGradientState,
  accumulate,
  initial_diagnostics,
)

__all__ = ['add_meta_gradient']

_PROJECTIONS = ('global', 'per_leaf')
_MAX_HVP_EVERY = 2**31 - 1  # the step counter is an int32


def add_meta_gradient(
  meta_coef: ScalarLike = 1.0,
  *,
  orthogonalize: bool = True,
  projection: Projection = 'global',
  meta_clip_norm: ScalarLike | None = None,
  meta_max_ratio: ScalarLike | None = None,
  hvp_every: int | jax.Array = 1,
  meta_mask: MaskOrFn = None,
  axis_name: AxisName | None = None,
  check_consistency: ScalarLike | None = 1e-2,
) -> optax.GradientTransformationExtraArgs:
  r"""Adds the F3EO meta-gradient ``H·g``, orthogonal to ``g``, to the gradient ``g``.

  With ``H`` the Hessian of the loss and ``g`` its gradient, ``H·g = ∇½‖g‖²`` is the
  gradient of the Fisher-trace estimate ``½‖g‖²``. This transform maps ``g`` to
  ``e = g + m⊥``:

  .. math::

    \begin{aligned}
    m &= c\,H g, \\
    m &\leftarrow m \min\!\Big(1, \frac{\tau}{\|m\| + 10^{-6}}\Big), \\
    m_\perp &= m - \frac{\langle m, g\rangle}{\langle g, g\rangle}\, g, \\
    m_\perp &\leftarrow m_\perp \min\!\Big(1, \frac{\rho \|g\|}{\|m_\perp\|}\Big), \\
    e &= g + m_\perp,
    \end{aligned}

  with ``c = meta_coef``, ``τ = meta_clip_norm`` (optional absolute clip),
  ``ρ = meta_max_ratio`` (optional relative cap) and the projection optional; it is
  skipped where ``⟨g, g⟩ = 0``. The relative cap keeps ``‖m⊥‖ ≤ ρ‖g‖``, so
  ``⟨e, g⟩ = ‖g‖²`` and the angle between ``e`` and ``g`` is at most ``atan ρ``: the step
  descends the loss however large the curvature is. Follow the transform with an Adam
  step, as :func:`f3eo_jax.f3eo` does.

  ``H·g`` is computed at update time, from ``obj_fn`` by forward-over-reverse autodiff
  (``jax.jvp`` of ``jax.grad(obj_fn)`` with tangent ``g``), or by the caller's
  ``hvp_fn``.

  Safety, without exceptions inside the step (so nothing is lost under ``jit``,
  sharding or several processes):

  - With ``check_consistency=rtol``, on updates that evaluate ``obj_fn`` the gradient
    of ``obj_fn`` (a by-product of the jvp) is compared with ``g``; if they differ by
    more than ``rtol`` (relative), the meta term is dropped for that update
    (``e = g``), ``mismatch_count`` grows and :func:`f3eo_jax.raise_on_mismatch` raises
    afterwards, on the host.
  - A non-finite product (or an injected hyperparameter out of range) never reaches
    the update or the stored product: that update uses ``e = g`` and
    ``nonfinite_count`` grows. Compose with ``optax.apply_if_finite`` for non-finite
    gradients themselves.

  Args:
    meta_coef: the signed coefficient ``c``. ``+1`` descends on the Fisher trace (the
      theory's rule); ``-2`` ascends on ``‖g‖²`` as the published PyTorch code does.
    orthogonalize: whether to remove from ``m`` its component along ``g``.
    projection: ``'global'`` treats the whole pytree as one vector; ``'per_leaf'``
      projects (and caps) each parameter array against its own gradient array.
    meta_clip_norm: if set, ``τ > 0``: the global norm of ``m`` is clipped to it
      before the projection.
    meta_max_ratio: if set, ``ρ ≥ 0``: ``‖m⊥‖`` is capped at ``ρ‖g‖`` after the
      projection (over the tree, or per leaf with ``'per_leaf'``). ``None`` is the
      exact uncapped rule.
    hvp_every: refresh ``H·g`` on updates ``0, k, 2k, …`` only and reuse the stored
      product (projected against the current ``g``) in between. By default the
      schedule runs inside the compiled step under ``jax.lax.cond``;
      :func:`f3eo_jax.jit_amortized` runs it as two compiled steps instead (faster,
      most of all on CPU), passing ``refresh_hvp=`` to ``update``. An array
      (``optax.inject_hyperparams`` makes one) works too; the state then always
      stores a product.
    meta_mask: a pytree of bools like the params (or a prefix of it), or a function
      of the params returning one: the parameter arrays that get the meta term. The
      others get plain ``g`` and a zero tangent in the Hessian-vector product.
      Integer and bool leaves never get one.
    axis_name: a mapped axis name (``shard_map``/``pmap`` with local gradients):
      ``H·g`` (and, for the check, ``obj_fn``'s gradient) is averaged over it with
      ``jax.lax.pmean``, as ``g`` must have been.
    check_consistency: relative tolerance of the gradient check, or ``None`` for no
      check; ``float('inf')`` measures the mismatch without ever acting on it. Under
      ``jit`` data parallelism, FSDP and ``axis_name``, the check costs one more
      parameter-sized all-reduce on the updates that evaluate ``obj_fn``.

  Returns:
    An ``optax.GradientTransformationExtraArgs``. Its ``update(updates, state,
    params, *, obj_fn=None, hvp_fn=None, refresh_hvp=None, **extra_args)`` ignores
    other keywords, so it composes in ``optax.chain``. ``refresh_hvp`` is a Python
    bool or ``None``: ``True`` computes and stores the product, ``False`` reuses the
    stored one and needs neither ``obj_fn`` nor ``hvp_fn`` (both need
    ``hvp_every > 1``); ``None`` follows ``hvp_every``.

  Raises:
    TypeError, ValueError: at construction, for hyperparameters of the wrong type or
      out of range; at trace time, for misuse of ``update`` (see the messages).

  References:
    The F3EO theory note and the published PyTorch F3EO,
    https://github.com/dmf-archive/F3EO.

  Example:
    >>> import jax, jax.numpy as jnp, optax
    >>> import f3eo_jax
    >>> loss = lambda p, x: jnp.mean((x @ p['w']) ** 2)
    >>> params, x = {'w': jnp.ones(3)}, jnp.eye(3)
    >>> tx = optax.chain(f3eo_jax.add_meta_gradient(meta_max_ratio=0.1), optax.adam(1e-2))
    >>> state = tx.init(params)
    >>> grads = jax.grad(loss)(params, x)
    >>> updates, state = tx.update(grads, state, params, obj_fn=lambda p: loss(p, x))
    >>> params = optax.apply_updates(params, updates)
  """
  checks.check_real('meta_coef', meta_coef)
  checks.check_bool('orthogonalize', orthogonalize)
  if projection not in _PROJECTIONS:
    raise ValueError(f'projection must be one of {_PROJECTIONS}, got {projection!r}.')
  if meta_clip_norm is not None:
    checks.check_real('meta_clip_norm', meta_clip_norm, minimum=0, strict=True)
  if meta_max_ratio is not None:
    checks.check_real('meta_max_ratio', meta_max_ratio, minimum=0)
  checks.check_real('hvp_every', hvp_every, minimum=1, integer=True)
  if not checks.is_scalar_array(hvp_every) and hvp_every > _MAX_HVP_EVERY:
    raise ValueError(f'hvp_every must be < 2**31 (the step counter is int32), got {hvp_every}.')
  if check_consistency is not None:
    # inf measures the mismatch without ever dropping the meta term.
    checks.check_real('check_consistency', check_consistency, minimum=0, allow_inf=True)
  checks.check_mask_spec('meta_mask', meta_mask)
  try:
    hash(axis_name)
  except TypeError as e:
    raise TypeError(f'axis_name must be a name (hashable), got {axis_name!r}.') from e
  # An array hvp_every may be traced, so its state always has room for a stored H·g.
  keeps_product = checks.is_scalar_array(hvp_every) or bool(hvp_every > 1)

  def add_meta_term(
    layout: Layout, g: Sequence[jax.Array], product: product_lib.Product, mismatched: jax.Array
  ) -> tuple[list[jax.Array], MetaGradientDiagnostics]:
    """``e = g + m⊥``, and this update's diagnostics."""
    if not layout.segments:  # no leaf gets a meta term
      zero, no = jnp.zeros(()), jnp.zeros((), bool)
      return list(g), MetaGradientDiagnostics(
        zero, zero, zero, zero, zero, jnp.ones(()), product.mismatch, no, no, mismatched
      )
    hg = product.hg
    sums = meta_term.segment_sums(layout, g, hg)
    kappa, coef_ok = meta_term.clip(sums, meta_coef, meta_clip_norm)
    perp = meta_term.project(
      layout, g, hg, sums, orthogonalize=orthogonalize, exact=meta_max_ratio is not None
    )
    capped, cap_bound, cap_ok = meta_term.cap(sums, perp, kappa, meta_max_ratio)
    finite = meta_term.guard(sums, perp, capped) & coef_ok & cap_ok & product.finite
    ok = finite & ~mismatched
    e = meta_term.combine(layout, g, hg, sums, perp, capped, ok)
    meta_norm, cap_scale = meta_term.applied_norm(perp, capped, kappa, ok)
    grad_sq_norm, g_dot_hg, hg_norm, cos = meta_term.curvature(sums)
    return e, MetaGradientDiagnostics(
      grad_sq_norm=grad_sq_norm,
      g_dot_hg=g_dot_hg,
      hg_norm=hg_norm,
      meta_norm=meta_norm,
      cos_g_hg=cos,
      cap_scale=cap_scale,
      grad_mismatch=product.mismatch,
      cap_count=ok & cap_bound,
      nonfinite_count=~finite,
      mismatch_count=mismatched,
    )

  def init_fn(params):
    checks.check_not_masked_by_optax(params, 'params')
    make_layout(meta_mask, params, params, projection)  # fail early on a mask that does not fit
    return MetaGradientState(
      step=jnp.zeros((), jnp.int32),
      hvp=optax.tree.zeros_like(params) if keeps_product else None,
      diagnostics=initial_diagnostics(),
    )

  def update_fn(
    updates, state, params=None, *, obj_fn=None, hvp_fn=None, refresh_hvp=None, **extra_args
  ):
    del extra_args
    checks.check_update_call(updates, params, obj_fn, hvp_fn, refresh_hvp, keeps_product)
    layout = make_layout(meta_mask, params, updates, projection)
    g = jax.tree.leaves(updates)
    rtol = check_consistency if obj_fn is not None else None

    def compute_product() -> product_lib.Product:
      product = product_lib.compute(
        layout, g, params, obj_fn=obj_fn, hvp_fn=hvp_fn, axis_name=axis_name,
        check_consistency=rtol,
      )  # fmt: skip
      return product_lib.for_storage(layout, product, state.hvp, rtol) if keeps_product else product

    if keeps_product:
      product = product_lib.scheduled(
        layout, state.step, state.hvp, compute_product, refresh_hvp=refresh_hvp,
        hvp_every=hvp_every,
      )  # fmt: skip
    else:
      product = compute_product()
    mismatched = product_lib.is_mismatched(product.mismatch, rtol)
    e, measured = add_meta_term(layout, g, product, mismatched)
    stores = keeps_product and refresh_hvp is not False
    new_state = MetaGradientState(
      step=optax.safe_int32_increment(state.step),
      hvp=(
        layout.treedef.unflatten(product_lib.buffer_leaves(product, state.hvp))
        if stores
        else state.hvp
      ),
      diagnostics=accumulate(state.diagnostics, measured),
    )
    return layout.treedef.unflatten(e), new_state

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)
