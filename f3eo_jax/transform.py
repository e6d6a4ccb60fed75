"""The F3EO meta-gradient as an Optax gradient transformation."""

from __future__ import annotations

from collections.abc import Callable
import functools
from typing import Any, Literal, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from f3eo_jax import hvp as hvp_lib

PyTree = Any
MaskOrFn = PyTree | Callable[[PyTree], PyTree] | None
Projection = Literal['global', 'per_leaf']

_PROJECTIONS = ('global', 'per_leaf')
_CLIP_EPS = 1e-6  # SPEC §2: m ← m · min(1, τ / (‖m‖ + 1e-6)).

_USAGE = (
    'Pass the loss that produced the gradients, for example '
    '`tx.update(grads, state, params, obj_fn=lambda p: loss(p, batch))`, '
    'or your own Hessian-vector product as `hvp_fn=`.'
)


class MetaGradientDiagnostics(NamedTuple):
  """Scalars of the last step that computed or reused ``H·g`` (float32, shape ())."""

  grad_sq_norm: jax.Array  # ‖g‖² over masked leaves: the Fisher-trace estimate.
  g_dot_hg: jax.Array  # ⟨g, H·g⟩, the curvature along g times ‖g‖².
  hg_norm: jax.Array  # ‖H·g‖, before meta_coef, clipping and projection.
  meta_norm: jax.Array  # ‖m⊥‖, the meta term actually added to g.
  cos_g_hg: jax.Array  # cos∠(g, H·g); 0 where either vector is zero.
  grad_mismatch: jax.Array  # ‖g_obj − g‖ / ‖g‖ if check_consistency is set, else 0.


class MetaGradientState(NamedTuple):
  """State of :func:`add_meta_gradient`."""

  count: jax.Array  # int32 scalar: number of updates taken so far.
  hvp: PyTree  # last H·g, like the params, kept when hvp_every > 1 (or an array); else None.
  diagnostics: MetaGradientDiagnostics  # scalars of the last step.


class GradientMismatchError(ValueError):
  """Raised when ``obj_fn``'s gradient differs from the gradients being updated."""


def _is_python_number(x: Any) -> bool:
  return isinstance(x, (int, float, np.number)) and not isinstance(x, bool)


def _is_integer_scalar_array(x: Any) -> bool:
  return (
      isinstance(x, (jax.Array, np.ndarray))
      and np.ndim(x) == 0
      and jnp.issubdtype(x.dtype, jnp.integer)
  )


def _acc_dtype(dtype: Any) -> Any:
  """At least float32, for sums and products of any parameter dtype."""
  return jnp.promote_types(dtype, jnp.float32)


def _upcast(x: jax.Array) -> jax.Array:
  return x.astype(_acc_dtype(x.dtype))


def _vdot(a: jax.Array, b: jax.Array) -> jax.Array:
  # A reduction, not jnp.vdot: under explicit sharding a dot over a sharded axis is a type error.
  return jnp.sum(jnp.conj(_upcast(a)) * _upcast(b))


def _tree_vdot(a: PyTree, b: PyTree) -> jax.Array:
  """⟨a, b⟩ as a scalar: per-leaf vdots in at least float32, then summed.

  Summing per-leaf products (rather than raveling) keeps each leaf's sharding.
  """
  return sum(jax.tree.leaves(jax.tree.map(_vdot, a, b)), jnp.zeros((), jnp.float32))


def _safe_div(num: jax.Array, den: jax.Array) -> jax.Array:
  """``num / den`` where ``den > 0``, else 0; never evaluates a division by zero."""
  positive = den > 0
  return jnp.where(positive, num / jnp.where(positive, den, 1.0), 0.0)


def _resolve_mask(mask: MaskOrFn, params: PyTree, updates: PyTree) -> PyTree | None:
  """Expands ``mask`` (a tree, a prefix tree or a callable) to a bool per leaf."""
  if mask is None:
    return None
  if callable(mask):
    if params is None:
      raise ValueError('A callable mask needs `params`: call update(updates, state, params, ...).')
    mask = mask(params)
  try:
    return jax.tree.map(
        lambda m, u: jax.tree.map(lambda _: m, u), mask, updates,
        is_leaf=lambda x: isinstance(x, (bool, np.bool_)),
    )
  except (ValueError, TypeError) as e:
    raise ValueError(
        'mask must be a pytree of bools with the structure of the params (or a prefix of'
        f' it); got mask structure {jax.tree.structure(mask)} for updates of structure'
        f' {jax.tree.structure(updates)}.'
    ) from e


def _zero_outside(leaf_mask: PyTree | None, tree: PyTree) -> PyTree:
  """Zeroes the leaves of ``tree`` where ``leaf_mask`` is False (no mask: unchanged)."""
  if leaf_mask is None:
    return tree
  return jax.tree.map(lambda m, x: jnp.where(m, x, jnp.zeros_like(x)), leaf_mask, tree)


def _check_like(name: str, tree: PyTree, reference: PyTree) -> None:
  """Raises at trace time unless ``tree`` has the structure and shapes of ``reference``."""
  ts, rs = jax.tree.structure(tree), jax.tree.structure(reference)
  if ts != rs:
    raise ValueError(f'{name} returned a pytree of structure {ts}; expected {rs}, like the gradients.')
  for t, r in zip(jax.tree.leaves(tree), jax.tree.leaves(reference)):
    if jnp.shape(t) != jnp.shape(r):
      raise ValueError(
          f'{name} returned a leaf of shape {jnp.shape(t)} where the gradient has shape'
          f' {jnp.shape(r)}.'
      )


def _raise_on_mismatch(mismatch: np.ndarray, rtol: float) -> None:
  if not mismatch <= rtol:  # also catches NaN
    raise GradientMismatchError(
        f'The gradient of obj_fn differs from the gradients passed to update by'
        f' {float(mismatch):.3g} (relative), above check_consistency={rtol}. obj_fn must be'
        ' the loss that produced the gradients: same batch, same dropout key, same'
        ' batch-norm mode.'
    )


def _zero_diagnostics() -> MetaGradientDiagnostics:
  return MetaGradientDiagnostics(*(jnp.zeros((), jnp.float32) for _ in MetaGradientDiagnostics._fields))


def add_meta_gradient(
    meta_coef: float | jax.Array = 1.0,
    *,
    orthogonalize: bool = True,
    projection: Projection = 'global',
    meta_clip_norm: float | jax.Array | None = None,
    hvp_every: int = 1,
    mask: MaskOrFn = None,
    axis_name: str | tuple[str, ...] | None = None,
    check_consistency: float | None = None,
) -> optax.GradientTransformationExtraArgs:
  r"""Adds the F3EO meta-gradient ``H·g``, orthogonal to ``g``, to the gradient ``g``.

  With ``H`` the Hessian of the loss and ``g`` its gradient, ``H·g = ∇½‖g‖²`` is the
  gradient of the Fisher-trace estimate ``½‖g‖²``. This transform maps ``g`` to

  .. math::
    m = c\,H g,\quad m \leftarrow m\min(1, \tau / (\|m\| + 10^{-6})),\quad
    m_\perp = m - \frac{\langle m, g\rangle}{\langle g, g\rangle} g,\quad e = g + m_\perp,

  with ``c = meta_coef`` and ``τ = meta_clip_norm``; clipping and projection are
  optional, and the projection is skipped where ``⟨g, g⟩ = 0``. Follow it with an
  Adam step, as :func:`f3eo_jax.f3eo` does.

  ``H·g`` is computed at update time, from ``obj_fn`` by forward-over-reverse autodiff
  (``jax.jvp`` of ``jax.grad(obj_fn)`` with tangent ``g``), or by the caller's
  ``hvp_fn``. Exactly one of the two must be passed to ``update``.

  Args:
    meta_coef: the signed coefficient ``c``. ``+1`` descends on the Fisher trace (the
      theory note); ``-2`` ascends on ``‖g‖²`` as the published PyTorch code does.
    orthogonalize: whether to remove from ``m`` its component along ``g``.
    projection: ``'global'`` treats the whole pytree as one vector; ``'per_leaf'``
      projects each parameter array against its own gradient array.
    meta_clip_norm: if set, the global norm of ``m`` is clipped to it before the
      projection.
    hvp_every: compute ``H·g`` on steps ``0, k, 2k, …`` only, under ``jax.lax.cond``,
      and reuse the last product (projected against the current ``g``) in between.
      An integer array (``optax.inject_hyperparams`` makes one) also works; the state
      then always keeps room for the stored product.
    mask: a pytree of bools like the params (or a prefix of it), or a function of
      the params returning one. Leaves where it is ``False`` get plain ``g`` and a zero
      tangent in the Hessian-vector product.
    axis_name: a mapped axis name (``shard_map``/``pmap`` with local gradients): the
      Hessian-vector product is averaged over it with ``jax.lax.pmean``, as ``g``
      must have been.
    check_consistency: if set, a relative tolerance: on steps that evaluate
      ``obj_fn``, the gradient of ``obj_fn`` (a free by-product of the jvp) is compared
      with the incoming ``g``, and a :class:`GradientMismatchError` is raised from the
      host when they differ by more. The mismatch is also in the diagnostics.

  Returns:
    An ``optax.GradientTransformationExtraArgs``. Its ``update(updates, state,
    params, *, obj_fn=None, hvp_fn=None, **extra_args)`` ignores other keywords, so
    it composes in ``optax.chain``.

  References:
    F3EO theory note, and the published PyTorch F3EO; see SPEC.md in the project.

  Example:
    >>> import jax, jax.numpy as jnp, optax
    >>> import f3eo_jax
    >>> loss = lambda p, x: jnp.mean((x @ p['w']) ** 2)
    >>> params, x = {'w': jnp.ones(3)}, jnp.eye(3)
    >>> tx = optax.chain(f3eo_jax.add_meta_gradient(), optax.adam(1e-2))
    >>> state = tx.init(params)
    >>> grads = jax.grad(loss)(params, x)
    >>> updates, state = tx.update(grads, state, params, obj_fn=lambda p: loss(p, x))
    >>> params = optax.apply_updates(params, updates)
  """
  if projection not in _PROJECTIONS:
    raise ValueError(f"projection must be one of {_PROJECTIONS}, got {projection!r}.")
  # optax.inject_hyperparams turns every int argument, the default hvp_every=1 included,
  # into an int array that is traced in update: accept integer scalars, not just ints.
  static_every = isinstance(hvp_every, (int, np.integer)) and not isinstance(hvp_every, bool)
  if not (static_every or _is_integer_scalar_array(hvp_every)):
    raise ValueError(f'hvp_every must be an int >= 1, got {hvp_every!r}.')
  if not isinstance(hvp_every, jax.core.Tracer) and int(hvp_every) < 1:
    raise ValueError(f'hvp_every must be >= 1, got {hvp_every}.')
  if meta_clip_norm is not None and _is_python_number(meta_clip_norm) and not meta_clip_norm > 0:
    raise ValueError(f'meta_clip_norm must be positive or None, got {meta_clip_norm}.')
  if _is_python_number(meta_coef) and not np.isfinite(meta_coef):
    raise ValueError(f'meta_coef must be finite, got {meta_coef}.')
  if check_consistency is not None and not (
      _is_python_number(check_consistency) and check_consistency >= 0
  ):
    raise ValueError(f'check_consistency must be a tolerance >= 0 or None, got {check_consistency!r}.')
  if not (mask is None or callable(mask)):
    leaves = jax.tree.leaves(mask)
    if not all(isinstance(m, (bool, np.bool_)) or jnp.result_type(m) == jnp.bool_ for m in leaves):
      raise ValueError(f'mask leaves must be bools, got {mask!r}.')
  # An array hvp_every may be traced, so its state always has room for a stored H·g.
  keep_buffer = not static_every or hvp_every > 1

  def init_fn(params: PyTree) -> MetaGradientState:
    _resolve_mask(mask, params, params)  # fail early on a mask that does not fit
    buffer = optax.tree.zeros_like(params) if keep_buffer else None
    return MetaGradientState(
        count=jnp.zeros((), jnp.int32), hvp=buffer, diagnostics=_zero_diagnostics()
    )

  def update_fn(updates, state, params=None, *, obj_fn=None, hvp_fn=None, **extra_args):
    del extra_args
    if (obj_fn is None) == (hvp_fn is None):
      which = 'neither' if obj_fn is None else 'both'
      raise TypeError(
          f'add_meta_gradient.update needs exactly one of obj_fn= and hvp_fn=, got {which}. '
          + _USAGE
      )
    if obj_fn is not None and params is None:
      raise ValueError(
          'add_meta_gradient.update got obj_fn but no params; the Hessian is taken at the'
          ' params: call tx.update(grads, state, params, obj_fn=...).'
      )
    grads = updates
    leaf_mask = _resolve_mask(mask, params, grads)
    g = _zero_outside(leaf_mask, grads)

    def compute_hvp() -> tuple[PyTree, jax.Array]:
      mismatch = jnp.zeros((), jnp.float32)
      if obj_fn is not None:
        grad_obj, hg = hvp_lib.grad_and_hvp(obj_fn, params, g)
        _check_like('the gradient of obj_fn', grad_obj, grads)
        if check_consistency is not None:
          if axis_name is not None:
            grad_obj = jax.lax.pmean(grad_obj, axis_name)
          diff = jax.tree.map(lambda a, b: _upcast(a) - _upcast(b), grad_obj, grads)
          mismatch = _safe_div(
              jnp.sqrt(_tree_vdot(diff, diff)), jnp.sqrt(_tree_vdot(grads, grads))
          ).astype(jnp.float32)
          # rtol bound by partial stays a Python float, so the message shows it as given.
          jax.debug.callback(
              functools.partial(_raise_on_mismatch, rtol=check_consistency), mismatch
          )
      else:
        hg = hvp_fn(g)
        _check_like('hvp_fn', hg, grads)
      if axis_name is not None:
        hg = jax.lax.pmean(hg, axis_name)
      if keep_buffer:  # lax.cond needs the buffer's dtypes in both branches
        hg = optax.tree.cast_like(hg, state.hvp)
      return hg, mismatch

    if keep_buffer:
      hg, mismatch = jax.lax.cond(
          state.count % hvp_every == 0,
          compute_hvp,
          lambda: (state.hvp, state.diagnostics.grad_mismatch),
      )
    else:
      hg, mismatch = compute_hvp()

    hg = _zero_outside(leaf_mask, hg)
    meta = jax.tree.map(lambda h: meta_coef * _upcast(h), hg)
    if meta_clip_norm is not None:
      meta_norm = jnp.sqrt(_tree_vdot(meta, meta))
      scale = jnp.minimum(1.0, meta_clip_norm / (meta_norm + _CLIP_EPS))
      meta = jax.tree.map(lambda m: m * scale.astype(m.dtype), meta)
    if orthogonalize:
      if projection == 'global':
        coef = _safe_div(_tree_vdot(meta, g), _tree_vdot(g, g))
        meta = jax.tree.map(lambda m, x: m - coef.astype(m.dtype) * _upcast(x), meta, g)
      else:
        def project_leaf(m, x):
          c = _safe_div(_vdot(m, x), _vdot(x, x))
          return m - c.astype(m.dtype) * _upcast(x)

        meta = jax.tree.map(project_leaf, meta, g)
    new_updates = jax.tree.map(
        lambda u, m: (_upcast(u) + m).astype(u.dtype), grads, meta
    )

    grad_sq_norm = _tree_vdot(g, g)
    g_dot_hg = _tree_vdot(g, hg)
    hg_norm = jnp.sqrt(_tree_vdot(hg, hg))
    diagnostics = MetaGradientDiagnostics(
        grad_sq_norm=grad_sq_norm,
        g_dot_hg=g_dot_hg,
        hg_norm=hg_norm,
        meta_norm=jnp.sqrt(_tree_vdot(meta, meta)),
        cos_g_hg=_safe_div(g_dot_hg, jnp.sqrt(grad_sq_norm) * hg_norm),
        grad_mismatch=mismatch,
    )
    diagnostics = MetaGradientDiagnostics(*(d.astype(jnp.float32) for d in diagnostics))
    new_state = MetaGradientState(
        count=optax.safe_int32_increment(state.count),
        hvp=hg if keep_buffer else None,
        diagnostics=diagnostics,
    )
    return new_updates, new_state

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def _unwrap(x: Any) -> Any:
  """Reads an array out of a Flax NNX ``Variable`` (or returns it unchanged)."""
  return x.get_value() if hasattr(x, 'get_value') else getattr(x, 'value', x)


def diagnostics(opt_state: PyTree) -> dict[str, jax.Array]:
  """The last step's F3EO scalars, found anywhere inside an optimizer state.

  Looks through chains, ``inject_hyperparams``, ``MultiSteps``, ``apply_if_finite``,
  Flax train states and NNX optimizer state for the one :class:`MetaGradientState`.

  Args:
    opt_state: an optimizer state containing exactly one ``MetaGradientState``.

  Returns:
    ``{'grad_sq_norm', 'g_dot_hg', 'hg_norm', 'meta_norm', 'cos_g_hg',
    'grad_mismatch'}`` as float32 scalars; see :class:`MetaGradientDiagnostics`.

  Example:
    >>> import jax.numpy as jnp
    >>> import f3eo_jax
    >>> tx = f3eo_jax.f3eo(1e-3)
    >>> sorted(f3eo_jax.diagnostics(tx.init({'w': jnp.ones(2)})))[:2]
    ['cos_g_hg', 'g_dot_hg']
  """
  found = [
      node
      for node in jax.tree.leaves(opt_state, is_leaf=lambda x: isinstance(x, MetaGradientState))
      if isinstance(node, MetaGradientState)
  ]
  if len(found) != 1:
    raise ValueError(
        f'diagnostics expects exactly one MetaGradientState in the optimizer state, found'
        f' {len(found)}. Pass the part of the state that holds the F3EO transform.'
    )
  return {k: _unwrap(v) for k, v in found[0].diagnostics._asdict().items()}
