r"""The F3EO meta-gradient, and PyTorch's AMSGrad, as Optax gradient transformations.

:func:`add_meta_gradient` maps the gradient ``g`` to ``e = g + m⊥``. Its update is a
sequence of small pure steps, each a module-level function below:

1. :func:`_product`: compute ``H·g`` (from ``obj_fn`` or ``hvp_fn``), check that
   ``obj_fn``'s gradient is ``g``, or reuse the stored product;
2. :func:`_leaf_maxima` and :func:`_segment_sums`: two reductions over ``g`` and
   ``H·g`` give, per segment (the whole tree, or each leaf), ``⟨g, g⟩``, ``⟨g, H·g⟩``
   and ``⟨H·g, H·g⟩``, in a scaled form that neither overflows nor underflows;
3. :func:`_perp_sums`: when the relative cap is on, ``‖(H·g)⊥‖²`` in one more pass;
4. :func:`_coefficients`: scalar algebra only: the clip, the projection, the cap, and
   the guard against non-finite values;
5. :func:`_combine`: one elementwise pass, ``e = g + κ·(ŝ_h·H·g − r·ŝ_g·g)``.

Inner products of complex leaves are real, ``Re⟨a, b⟩``: a complex parameter is the
pair of real parameters ``(Re z, Im z)``.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from f3eo_jax import hvp as hvp_lib
from f3eo_jax._types import AxisName, HvpFn, MaskOrFn, ObjFn, Projection, PyTree, ScalarLike

__all__ = [
  'GradientMismatchError',
  'MetaGradientDiagnostics',
  'MetaGradientState',
  'ScaleByAmsgradState',
  'add_meta_gradient',
  'diagnostics',
  'raise_on_mismatch',
  'scale_by_amsgrad_torch',
]

_PROJECTIONS = ('global', 'per_leaf')
_CLIP_EPS = 1e-6  # m ← m · min(1, τ / (‖m‖ + 1e-6)), as the published code clips.
_MAX_HVP_EVERY = 2**31 - 1  # the step counter is an int32

_USAGE = (
  'Pass the loss that produced the gradients, for example '
  '`tx.update(grads, state, params, obj_fn=lambda p: loss(p, batch))`, '
  'or your own Hessian-vector product as `hvp_fn=`.'
)
_MISMATCH_CAUSES = (
  'obj_fn must be the very loss whose gradient was passed as `updates`: the same batch,'
  ' the same dropout key, batch norm in the same mode with the same statistics. Other'
  ' causes: a transform placed before add_meta_gradient in an optax.chain (for example'
  ' clip_by_global_norm) changes g, so put the meta-gradient first; optax.MultiSteps'
  " averages g over micro-batches but passes only the last micro-batch's obj_fn, so"
  ' accumulate with f3eo_jax.accumulated_value_grad_and_hvp instead.'
)


# ------------------------------------------------------------------- state


class MetaGradientDiagnostics(NamedTuple):
  """Scalars of the last update (float32 values, int32 counters, shape ())."""

  grad_sq_norm: jax.Array  # ‖g‖² over the meta-masked leaves: the Fisher-trace estimate.
  g_dot_hg: jax.Array  # ⟨g, H·g⟩: the curvature along g times ‖g‖².
  hg_norm: jax.Array  # ‖H·g‖, before meta_coef, clip, projection and cap.
  meta_norm: jax.Array  # ‖m⊥‖: the norm of the meta term actually added to g.
  cos_g_hg: jax.Array  # cos∠(g, H·g); 0 where either vector is zero.
  cap_scale: jax.Array  # ‖m⊥ capped‖ / ‖m⊥ uncapped‖: 1 when the relative cap did not bind.
  grad_mismatch: jax.Array  # last measured ‖∇obj_fn − g‖ / ‖g‖; NaN if never measured.
  cap_count: jax.Array  # updates on which the relative cap bound.
  nonfinite_count: jax.Array  # updates whose meta term was dropped as non-finite or invalid.
  mismatch_count: jax.Array  # updates whose meta term was dropped: obj_fn's gradient was not g.


class MetaGradientState(NamedTuple):
  """State of :func:`add_meta_gradient`."""

  step: jax.Array  # int32 scalar: updates taken; schedules the hvp_every refreshes.
  hvp: PyTree  # last H·g like the params when a product is stored (hvp_every > 1), else None.
  diagnostics: MetaGradientDiagnostics  # scalars of the last update.


class GradientMismatchError(ValueError):
  """The gradient of ``obj_fn`` differed from the gradients being updated."""


# ------------------------------------------------------------------- construction checks


def _is_scalar_array(x: Any) -> bool:
  return isinstance(x, (jax.Array, np.ndarray, np.generic)) and np.ndim(x) == 0


def _check_real(
  name: str,
  value: Any,
  *,
  minimum: float | None = None,
  strict: bool = False,
  integer: bool = False,
  allow_inf: bool = False,
) -> None:
  """Raises unless ``value`` is a real scalar (a Python number or a 0-d array) in range.

  Arrays (``optax.inject_hyperparams`` passes them, possibly traced) are only checked
  for shape and dtype here; their values are guarded when the update runs.
  """
  if _is_scalar_array(value):
    dtype = jnp.result_type(value)
    if jnp.issubdtype(dtype, jnp.complexfloating) and not integer:
      return  # inject_hyperparams on complex params casts floats to complex; the real part is used
    ok = (
      jnp.issubdtype(dtype, jnp.integer)
      if integer
      else (jnp.issubdtype(dtype, jnp.floating) or jnp.issubdtype(dtype, jnp.integer))
    )
    if integer and jnp.issubdtype(dtype, jnp.floating):
      ok = True  # inject_hyperparams(hyperparam_dtype=float) makes floats of ints
    if not ok:
      raise TypeError(f'{name} must be a real scalar, got an array of dtype {dtype}.')
    return
  kinds = (int, np.integer) if integer else (int, float, np.integer, np.floating)
  if isinstance(value, bool) or not isinstance(value, kinds):
    what = 'an int' if integer else 'a real number'
    raise TypeError(f'{name} must be {what}, got {value!r} of type {type(value).__name__}.')
  if np.isnan(value) or (np.isinf(value) and not (allow_inf and value > 0)):
    raise ValueError(f'{name} must be finite, got {value!r}.')
  if minimum is not None and (value <= minimum if strict else value < minimum):
    bound = f'> {minimum}' if strict else f'>= {minimum}'
    raise ValueError(f'{name} must be {bound}, got {value!r}.')


def _check_bool(name: str, value: Any) -> None:
  if not isinstance(value, (bool, np.bool_)):
    raise TypeError(f'{name} must be a bool, got {value!r} of type {type(value).__name__}.')


def _check_mask_spec(name: str, mask: MaskOrFn) -> None:
  if mask is None or callable(mask):
    return
  for leaf in jax.tree.leaves(mask):
    if not _is_mask_leaf(leaf):
      raise TypeError(
        f'{name} leaves must be bools, one per parameter array (or per subtree), got'
        f' {leaf!r}. Per-element masks are not supported.'
      )


def _is_mask_leaf(x: Any) -> bool:
  return isinstance(x, (bool, np.bool_)) or (
    _is_scalar_array(x) and jnp.result_type(x) == jnp.bool_
  )


def _check_not_masked_by_optax(tree: PyTree, what: str) -> None:
  masked = jax.tree.leaves(tree, is_leaf=lambda x: isinstance(x, optax.MaskedNode))
  if any(isinstance(x, optax.MaskedNode) for x in masked):
    raise TypeError(
      f'The F3EO meta-gradient got {what} with optax.MaskedNode leaves: it is inside'
      ' optax.masked, optax.multi_transform or optax.partition, which hand it only part'
      ' of the parameters, so the loss cannot be evaluated. Apply F3EO to the whole'
      ' tree and restrict the meta term with its own option instead:'
      ' add_meta_gradient(meta_mask=...) or f3eo(..., meta_mask=...).'
    )


# ------------------------------------------------------------------- leaves and segments


@dataclasses.dataclass(frozen=True)
class _Layout:
  """Which leaves get the meta term, and how they are grouped (static, per trace).

  Attributes:
    treedef: the structure of the params and updates.
    active: per leaf: differentiable and inside ``meta_mask``.
    differentiable: per leaf: floating-point or complex.
    segments: tuples of active leaf indices projected together: one segment of all
      active leaves for ``'global'``, one per active leaf for ``'per_leaf'``.
  """

  treedef: Any
  active: tuple[bool, ...]
  differentiable: tuple[bool, ...]
  segments: tuple[tuple[int, ...], ...]


def _layout(meta_mask: MaskOrFn, params: PyTree, updates: PyTree, projection: str) -> _Layout:
  leaves, treedef = jax.tree.flatten(updates)
  differentiable = tuple(hvp_lib.is_differentiable(u) for u in leaves)
  if meta_mask is None:
    in_mask = (True,) * len(leaves)
  else:
    if callable(meta_mask):
      if params is None:
        raise ValueError(
          'A callable meta_mask needs the params: call update(updates, state, params, ...).'
        )
      meta_mask = meta_mask(params)
      _check_mask_spec('meta_mask (as returned by the callable)', meta_mask)
    try:
      per_leaf = jax.tree.map(
        lambda m, u: jax.tree.map(lambda _: m, u), meta_mask, updates, is_leaf=_is_mask_leaf
      )
    except (ValueError, TypeError) as e:
      raise ValueError(
        'meta_mask must be a pytree of bools with the structure of the params (or a'
        f' prefix of it); got structure {jax.tree.structure(meta_mask)} for params of'
        f' structure {treedef}.'
      ) from e
    try:
      in_mask = tuple(bool(m) for m in jax.tree.leaves(per_leaf, is_leaf=_is_mask_leaf))
    except jax.errors.ConcretizationTypeError as e:
      raise TypeError('meta_mask must be known at trace time (Python bools).') from e
  active = tuple(d and m for d, m in zip(differentiable, in_mask))
  indices = tuple(i for i, a in enumerate(active) if a)
  if projection == 'global':
    segments = (indices,) if indices else ()
  else:
    segments = tuple((i,) for i in indices)  # type: ignore[assignment]
  return _Layout(treedef, active, differentiable, segments)


# ------------------------------------------------------------------- arithmetic helpers


def _acc_dtype(x: jax.Array) -> Any:
  """The real dtype reductions of ``x`` accumulate in: at least float32."""
  return jnp.promote_types(jnp.finfo(jnp.result_type(x)).dtype, jnp.float32)


def _real_parts(x: jax.Array, scale: jax.Array) -> tuple[jax.Array, ...]:
  """``x · scale`` as real arrays in the accumulation dtype: ``(x,)`` or ``(Re x, Im x)``."""
  parts = (jnp.real(x), jnp.imag(x)) if jnp.iscomplexobj(x) else (x,)
  return tuple(p.astype(scale.dtype) * scale for p in parts)


# Platforms on which a pass's reductions are one variadic ``lax.reduce`` over short rows of
# the last axis (then a sum of the row results): :func:`_variadic`.
_VARIADIC_REDUCTION_PLATFORMS: tuple[str, ...] = ('cpu',)
# The length of the rows that :func:`_variadic` reduces first, where the last axis divides.
_CHUNK = 8


def _separate(reduce: Callable[..., jax.Array], *terms: jax.Array) -> jax.Array:
  return jnp.stack([reduce(t) for t in terms])


def _variadic(reduce: Callable[..., jax.Array], *terms: jax.Array) -> jax.Array:
  """One variadic ``lax.reduce`` over short rows, then a reduction of each row result.

  The rows are the last axis, split into rows of ``_CHUNK`` elements where it divides.
  The first stage reads every input once and materialises only its row results. On
  XLA:CPU, a row is a serial chain of additions: short rows let the loop overlap many
  chains. On an MLP's 512-wide kernels, rows of 8 made a pass 1.6 (sums) to 2.5
  (maxima with sums) times as fast as whole rows. Reducing rows first also keeps
  float32 sums accurate (a single pass over a whole leaf accumulates serially), and
  leaves the leading axes, where FSDP shards a leaf, to separate reductions: a scalar
  all-reduce each under SPMD.
  """
  dtype = terms[0].dtype
  last = terms[0].shape[-1] if terms[0].ndim else 0
  if last > _CHUNK and last % _CHUNK == 0:
    terms = tuple(t.reshape(*t.shape[:-1], last // _CHUNK, _CHUNK) for t in terms)
  if reduce is jnp.sum:
    init, op = jnp.zeros((), dtype), jnp.add
  else:
    init, op = jnp.full((), -jnp.inf, dtype), jnp.maximum
  rows = jax.lax.reduce(
    terms,
    (init,) * len(terms),
    lambda xs, ys: tuple(op(x, y) for x, y in zip(xs, ys)),
    (terms[0].ndim - 1,) if terms[0].ndim else (),
  )
  return _separate(reduce, *rows)


def _stacked(terms: Sequence[jax.Array], reduce: Callable[..., jax.Array]) -> jax.Array:
  """Reduces each of several same-shaped arrays over all their axes: a vector of results.

  How depends on the platform the step is compiled for (``lax.platform_dependent``):

  - XLA:CPU gives each separate reduction to its YNNPACK library, which takes
    materialised inputs: the scaled ``g``, a re-laid-out ``H·g`` and the pass-3
    difference would each become a parameter-sized temporary. A variadic
    ``lax.reduce`` over short rows stays in XLA's own loop (:func:`_variadic`).
    Under SPMD, a leaf sharded along its last axis adds scalar all-reduces too where
    each device holds whole rows; otherwise it gathers the row results.
  - Elsewhere, separate reductions: XLA:GPU and TPU can fuse sibling reductions into
    one multi-output loop, and under SPMD each is a scalar all-reduce.
  """
  terms = tuple(terms)
  branches = {p: functools.partial(_variadic, reduce) for p in _VARIADIC_REDUCTION_PLATFORMS}
  return jax.lax.platform_dependent(
    *terms, default=functools.partial(_separate, reduce), **branches
  )


def _real_sums(a: Sequence[tuple[jax.Array, ...]], b: Sequence[tuple[jax.Array, ...]]) -> jax.Array:
  """``[Re⟨a_k, b_k⟩ for k]`` of real-part tuples."""
  terms = [functools.reduce(jnp.add, [x * y for x, y in zip(a_k, b_k)]) for a_k, b_k in zip(a, b)]
  return _stacked(terms, jnp.sum)


def _max_abs(*xs: jax.Array) -> jax.Array:
  """``[max |x| per real component for x in xs]`` (arrays of the same shape)."""
  acc = functools.reduce(jnp.promote_types, [_acc_dtype(x) for x in xs])
  terms = []
  for x in xs:
    parts = (jnp.real(x), jnp.imag(x)) if jnp.iscomplexobj(x) else (x,)
    terms.append(functools.reduce(jnp.maximum, [jnp.abs(p).astype(acc) for p in parts]))
  if not terms[0].size:
    return jnp.zeros(len(terms), acc)
  return _stacked(terms, jnp.max)


def _pow2_scale(max_abs: jax.Array) -> jax.Array:
  """A power of two ``s`` with ``s · max_abs`` in [0.5, 1); 1 if ``max_abs`` is 0 or not finite.

  Reductions of ``x · s`` then neither overflow (the squares are at most 1 each) nor
  lose the small values to underflow, whatever the magnitude of ``x``.
  """
  info = jnp.finfo(max_abs.dtype)
  _, exponent = jnp.frexp(max_abs)
  exponent = jnp.clip(exponent, info.minexp + 2, info.maxexp - 2)  # keep s a normal number
  usable = jnp.isfinite(max_abs) & (max_abs > 0)
  return jnp.where(usable, jnp.ldexp(jnp.ones_like(max_abs), -exponent), jnp.ones_like(max_abs))


def _hypot(norms: Sequence[jax.Array]) -> jax.Array:
  """``sqrt(Σ tᵢ²)`` of non-negative ``tᵢ``, scaled by the largest: no over- or underflow."""
  largest = jnp.max(jnp.stack(norms))
  unit = jnp.where(jnp.isfinite(largest) & (largest > 0), largest, 1)
  return unit * jnp.sqrt(sum((t / unit) ** 2 for t in norms))


def _safe_div(num: jax.Array, den: jax.Array) -> jax.Array:
  """``num / den`` where ``den > 0``, else 0; never evaluates a division by zero."""
  positive = den > 0
  return jnp.where(positive, num / jnp.where(positive, den, 1), 0)


# ------------------------------------------------------------------- step 1: the product


class _Product(NamedTuple):
  hg: list[Any]  # H·g per leaf: arrays on active leaves, None on the others.
  mismatch: jax.Array  # measured relative mismatch, or NaN where not measured.
  finite: jax.Array  # False if a stored product had to be zeroed as non-finite.


def _tangent(layout: _Layout, leaves: Sequence[jax.Array]) -> list[jax.Array]:
  """The tangent of the product: ``g`` on active leaves, zeros elsewhere."""
  return [u if a else jnp.zeros_like(u) for u, a in zip(leaves, layout.active)]


def _compute_product(
  layout: _Layout,
  updates: Sequence[jax.Array],
  params: PyTree,
  *,
  obj_fn: ObjFn | None,
  hvp_fn: HvpFn | None,
  axis_name: AxisName | None,
  check_consistency: ScalarLike | None,
) -> _Product:
  """``H·g`` at the params, and the gradient check when ``obj_fn`` is given."""
  tangent = layout.treedef.unflatten(_tangent(layout, updates))
  mismatch = jnp.full((), jnp.nan, jnp.float32)
  if obj_fn is not None:
    grad_obj, hg = hvp_lib.grad_and_hvp(obj_fn, params, tangent)
    _check_like('the gradient of obj_fn', grad_obj, layout, updates)
    if check_consistency is not None:
      if axis_name is not None:
        grad_obj = jax.lax.pmean(grad_obj, axis_name)
      mismatch = _relative_mismatch(layout, jax.tree.leaves(grad_obj), updates)
  else:
    assert hvp_fn is not None
    hg = hvp_fn(tangent)
    _check_like('hvp_fn', hg, layout, updates)
  if axis_name is not None:
    hg = jax.lax.pmean(hg, axis_name)
  hg_leaves = [h if a else None for h, a in zip(jax.tree.leaves(hg), layout.active)]
  return _Product(hg_leaves, mismatch, jnp.ones((), bool))


def _check_like(name: str, tree: PyTree, layout: _Layout, updates: Sequence[jax.Array]) -> None:
  """Raises at trace time unless ``tree`` has the structure and shapes of the gradients."""
  leaves, treedef = jax.tree.flatten(tree)
  if treedef != layout.treedef:
    raise ValueError(
      f'{name} returned a pytree of structure {treedef}; expected {layout.treedef}, like'
      ' the gradients.'
    )
  for leaf, u in zip(leaves, updates):
    if jnp.shape(leaf) != jnp.shape(u):
      raise ValueError(
        f'{name} returned a leaf of shape {jnp.shape(leaf)} where the gradient has shape'
        f' {jnp.shape(u)}.'
      )


def _relative_mismatch(
  layout: _Layout, grad_obj: Sequence[jax.Array], updates: Sequence[jax.Array]
) -> jax.Array:
  """``‖∇obj_fn − g‖ / ‖g‖`` over the differentiable leaves, in float32."""
  pairs = [(o, u) for o, u, d in zip(grad_obj, updates, layout.differentiable) if d]
  if not pairs:
    return jnp.zeros((), jnp.float32)
  scale = _pow2_scale(jnp.max(jnp.concatenate([_max_abs(u) for _, u in pairs])))
  diff_sq, grad_sq = functools.reduce(
    jnp.add,
    [
      _real_sums(
        [_real_parts(o - u, scale), _real_parts(u, scale)],
        [_real_parts(o - u, scale), _real_parts(u, scale)],
      )
      for o, u in pairs
    ],
  )
  mismatch = jnp.where(
    grad_sq > 0,
    jnp.sqrt(diff_sq / jnp.where(grad_sq > 0, grad_sq, 1)),
    jnp.where(diff_sq > 0, jnp.inf, 0.0),
  )
  return mismatch.astype(jnp.float32)


def _stored(layout: _Layout, buffer: PyTree) -> _Product:
  """The product kept in the state (finite by construction)."""
  leaves = jax.tree.leaves(buffer)
  return _Product(
    [h if a else None for h, a in zip(leaves, layout.active)],
    jnp.full((), jnp.nan, jnp.float32),
    jnp.ones((), bool),
  )


def _for_storage(
  layout: _Layout, product: _Product, buffer: PyTree, rtol: ScalarLike | None
) -> _Product:
  """The product in the buffer's dtypes, zeroed unless finite and consistent.

  A product that later updates reuse must not carry a NaN, nor come from an
  objective whose gradient was not ``g``.
  """
  old = jax.tree.leaves(buffer)
  hg = [None if h is None else h.astype(b.dtype) for h, b in zip(product.hg, old)]
  finite = jnp.all(
    jnp.stack([jnp.all(jnp.isfinite(h)) for h in hg if h is not None] or [jnp.ones((), bool)])
  )
  keep = finite & ~_mismatched(product.mismatch, rtol)
  hg = [None if h is None else jnp.where(keep, h, jnp.zeros_like(h)) for h in hg]
  return _Product(hg, product.mismatch, finite)


def _buffer_leaves(product: _Product, buffer: PyTree) -> list[jax.Array]:
  """The buffer's leaves: the product where there is one, zeros elsewhere."""
  return [
    jnp.zeros_like(b) if h is None else h for h, b in zip(product.hg, jax.tree.leaves(buffer))
  ]


def _mismatched(mismatch: jax.Array, rtol: ScalarLike | None) -> jax.Array:
  """Whether a measured mismatch exceeds ``rtol`` (a NaN mismatch was not measured)."""
  if rtol is None:
    return jnp.zeros((), bool)
  return ~jnp.isnan(mismatch) & ~(mismatch <= jnp.real(jnp.asarray(rtol)).astype(jnp.float32))


# ------------------------------------------------------------------- steps 2-3: reductions


class _Sums(NamedTuple):
  """Per segment, sums of the scaled vectors ``ĝ = ŝ_g·g`` and ``ĥ = ŝ_h·H·g``."""

  scale_g: jax.Array  # ŝ_g, a power of two
  scale_h: jax.Array  # ŝ_h
  gg: jax.Array  # ‖ĝ‖²
  gh: jax.Array  # ⟨ĝ, ĥ⟩
  hh: jax.Array  # ‖ĥ‖²
  max_g: jax.Array  # max |g| (unscaled)
  max_h: jax.Array  # max |H·g| (unscaled)


def _leaf_maxima(
  layout: _Layout, g: Sequence[jax.Array], hg: Sequence[Any]
) -> dict[int, jax.Array]:
  """Pass 1: ``[max |g|, max |H·g|]`` of every active leaf."""
  return {i: _max_abs(g[i], hg[i]) for seg in layout.segments for i in seg}


def _segment_sums(
  layout: _Layout,
  g: Sequence[jax.Array],
  hg: Sequence[Any],
  maxima: dict[int, jax.Array],
  acc: Any,
) -> list[_Sums]:
  """Pass 2: the three inner products of every segment, on scaled vectors."""
  sums = []
  for seg in layout.segments:
    segment_max = jnp.max(jnp.stack([maxima[i].astype(acc) for i in seg]), axis=0)
    scale_g, scale_h = _pow2_scale(segment_max[0]), _pow2_scale(segment_max[1])
    total = jnp.zeros(3, acc)
    for i in seg:
      g_i, h_i = _real_parts(g[i], scale_g), _real_parts(hg[i], scale_h)
      total = total + _real_sums([g_i, g_i, h_i], [g_i, h_i, h_i])
    sums.append(_Sums(scale_g, scale_h, *total, *segment_max))
  return sums


def _projection_ratios(sums: Sequence[_Sums], orthogonalize: bool) -> list[jax.Array]:
  """``r = ⟨ĝ, ĥ⟩ / ‖ĝ‖²`` per segment, so that ``(H·g)⊥ = (ĥ − r·ĝ) / ŝ_h``; 0 if unprojected."""
  if not orthogonalize:
    return [jnp.zeros_like(s.gg) for s in sums]
  return [_safe_div(s.gh, s.gg) for s in sums]


def _perp_sums(
  layout: _Layout,
  g: Sequence[jax.Array],
  hg: Sequence[Any],
  sums: Sequence[_Sums],
  ratios: Sequence[jax.Array],
) -> tuple[list[jax.Array], list[jax.Array]]:
  """Pass 3: ``‖ĥ − r·ĝ‖²`` per segment, computed directly (no cancellation).

  The same pass measures what is left of ``ĝ`` in ``d = ĥ − r·ĝ``, ``⟨d, ĝ⟩``, which
  refines ``r`` by one more Gram-Schmidt step: the rounding of the first inner
  products no longer shows in ``⟨m⊥, g⟩``.

  Returns:
    ``‖ĥ − r'·ĝ‖²`` and the refined ``r'`` of every segment.
  """
  perp, refined = [], []
  for seg, s, r in zip(layout.segments, sums, ratios):
    total = jnp.zeros(2, s.gg.dtype)
    for i in seg:
      g_i = _real_parts(g[i], s.scale_g)
      diff = tuple(h - r * x for h, x in zip(_real_parts(hg[i], s.scale_h), g_i))
      total = total + _real_sums([diff, diff], [diff, g_i])
    correction = _safe_div(total[1], s.gg)
    refined.append(r + correction)
    perp.append(jnp.maximum(total[0] - correction * total[1], 0))
  return perp, refined


# ------------------------------------------------------------------- step 4: coefficients


class _Coefficients(NamedTuple):
  kappa: list[jax.Array]  # per segment: m⊥ = κ·(ĥ − r·ĝ)
  ratios: list[jax.Array]  # per segment: r
  ok: jax.Array  # whether the meta term is applied at all (finite, valid, consistent)
  finite: jax.Array  # whether the product and hyperparameters were usable
  meta_norm: jax.Array  # ‖m⊥‖ applied
  cap_scale: jax.Array  # ‖m⊥ capped‖ / ‖m⊥ uncapped‖
  cap_bound: jax.Array  # whether the cap bound in some segment


def _coefficients(
  sums: Sequence[_Sums],
  ratios: Sequence[jax.Array],
  perp: Sequence[jax.Array] | None,
  *,
  meta_coef: ScalarLike,
  meta_clip_norm: ScalarLike | None,
  meta_max_ratio: ScalarLike | None,
  usable: jax.Array,
  consistent: jax.Array,
  acc: Any,
  largest: Sequence[float],
) -> _Coefficients:
  """Scalar algebra: clip, projection, cap and guard, from the segment sums alone.

  In the scaled units, ``m⊥ = c·s_clip·s_cap·(H·g)⊥ = κ·(ĥ − r·ĝ)`` with
  ``κ = c·s_clip·s_cap / ŝ_h``. Every quantity below stays representable whenever the
  result does, so huge or tiny gradients are handled exactly.
  """
  c = jnp.real(jnp.asarray(meta_coef)).astype(acc)
  valid = jnp.isfinite(c) & usable
  # ‖H·g‖ in a unit common to all segments: the largest scale's.
  scale_h = jnp.min(jnp.stack([s.scale_h for s in sums]))
  hg_scaled_norm = jnp.sqrt(sum(s.hh * (scale_h / s.scale_h) ** 2 for s in sums))
  perp_sq = (
    list(perp)
    if perp is not None
    else [jnp.maximum(s.hh - r * s.gh, 0) for s, r in zip(sums, ratios)]
  )  # diagnostics only
  kappa, uncapped_kappa, capped = [], [], []
  for s, p, r in zip(sums, perp_sq, ratios):
    # s_clip / ŝ_h, written so that neither factor overflows on its own.
    clip_over_scale = 1 / s.scale_h
    if meta_clip_norm is not None:
      tau = jnp.real(jnp.asarray(meta_clip_norm)).astype(acc)
      valid &= tau > 0
      clip_over_scale = jnp.minimum(
        clip_over_scale,
        tau / (jnp.abs(c) * hg_scaled_norm * (s.scale_h / scale_h) + _CLIP_EPS * s.scale_h),
      )
    k = c * clip_over_scale
    uncapped_kappa.append(k)
    if meta_max_ratio is not None:
      rho = jnp.real(jnp.asarray(meta_max_ratio)).astype(acc)
      valid &= rho >= 0
      # ĥ − r·ĝ, rounded elementwise, is a few ulps of ‖ĥ‖ + |r|‖ĝ‖ even where (H·g)⊥
      # is zero (a one-element leaf, or H·g parallel to g). Scaled up to ρ‖g‖, that
      # rounding would be the whole meta term: below 16× its level, κ is 0.
      rounding = (4 * jnp.finfo(acc).eps) ** 2 * (s.hh + r**2 * s.gg)
      resolved = p > 16 * rounding
      denominator = s.scale_g * jnp.sqrt(jnp.where(resolved, p, 1))
      # ρ‖g‖ / ‖(H·g)⊥‖ in the same units: the largest |κ| the cap allows.
      limit = rho * jnp.sqrt(s.gg) / denominator
      capped.append(resolved & (limit < jnp.abs(k)))
      k = jnp.where(resolved, jnp.sign(k) * jnp.minimum(jnp.abs(k), limit), 0)
    kappa.append(k)
  finite = valid
  for s, k, r, top in zip(sums, kappa, ratios, largest):
    finite &= jnp.isfinite(s.hh) & jnp.isfinite(s.gg) & jnp.isfinite(k) & jnp.isfinite(r)
    # Elementwise |g + κ·(ĥ − r·ĝ)| ≤ max|g| + |κ|·(max|ĥ| + |r|·max|ĝ|): a meta term that
    # could overflow the output dtype is as unusable as a NaN.
    bound = s.max_g + jnp.abs(k) * (s.max_h * s.scale_h + jnp.abs(r) * s.max_g * s.scale_g)
    finite &= bound < top
  ok = finite & consistent
  # ‖m⊥‖ = sqrt(Σ κ²·p) over segments; κ² alone over- or underflows (κ ~ 1/ŝ_h).
  capped_norm = _hypot([jnp.abs(k) * jnp.sqrt(p) for k, p in zip(kappa, perp_sq)])
  uncapped_norm = _hypot([jnp.abs(k) * jnp.sqrt(p) for k, p in zip(uncapped_kappa, perp_sq)])
  applied_norm = jnp.where(ok, capped_norm, 0)
  # The factor the cap applied: 1 where it did not bind, or where no meta term was applied.
  cap_scale = jnp.where(ok & (uncapped_norm > 0), _safe_div(capped_norm, uncapped_norm), 1)
  cap_bound = functools.reduce(jnp.logical_or, capped, jnp.zeros((), bool))
  return _Coefficients(
    kappa, list(ratios), ok, finite, applied_norm, jnp.minimum(cap_scale, 1), ok & cap_bound
  )


# ------------------------------------------------------------------- step 5: combine


def _combine(
  layout: _Layout,
  updates: Sequence[jax.Array],
  hg: Sequence[Any],
  sums: Sequence[_Sums],
  coefs: _Coefficients,
) -> list[jax.Array]:
  """``e = g + κ·(ŝ_h·H·g − r·ŝ_g·g)`` on active leaves; ``g`` elsewhere or if not ok."""
  out = list(updates)
  for seg, s, k, r in zip(layout.segments, sums, coefs.kappa, coefs.ratios):
    for i in seg:
      u, h = updates[i], hg[i]
      acc = s.gg.dtype
      meta = k * (
        h.astype(jnp.promote_types(h.dtype, acc)) * s.scale_h
        - r * s.scale_g * u.astype(jnp.promote_types(u.dtype, acc))
      )
      out[i] = jnp.where(coefs.ok, (u + meta).astype(u.dtype), u)
  return out


def _diagnostics(
  sums: Sequence[_Sums],
  coefs: _Coefficients,
  product: _Product,
  previous: MetaGradientDiagnostics,
  mismatched: jax.Array,
) -> MetaGradientDiagnostics:
  """The scalars of this update, in float32; counters carried over and incremented."""
  f32 = lambda x: jnp.asarray(x, jnp.float32)
  if sums:
    scale_g = jnp.min(jnp.stack([s.scale_g for s in sums]))
    scale_h = jnp.min(jnp.stack([s.scale_h for s in sums]))
    total = lambda terms: functools.reduce(jnp.add, terms)
    gg = total([s.gg * (scale_g / s.scale_g) ** 2 for s in sums])
    gh = total([s.gh * (scale_g / s.scale_g) * (scale_h / s.scale_h) for s in sums])
    hh = total([s.hh * (scale_h / s.scale_h) ** 2 for s in sums])
    grad_sq_norm, g_dot_hg = gg / scale_g**2, gh / (scale_g * scale_h)
    hg_norm, cos = jnp.sqrt(hh) / scale_h, _safe_div(gh, jnp.sqrt(gg * hh))
  else:
    grad_sq_norm = g_dot_hg = hg_norm = cos = jnp.zeros(())
  measured = ~jnp.isnan(product.mismatch)
  count = lambda c, flag: c + flag.astype(jnp.int32)
  return MetaGradientDiagnostics(
    grad_sq_norm=f32(grad_sq_norm),
    g_dot_hg=f32(g_dot_hg),
    hg_norm=f32(hg_norm),
    meta_norm=f32(coefs.meta_norm),
    cos_g_hg=f32(cos),
    cap_scale=f32(coefs.cap_scale),
    grad_mismatch=jnp.where(measured, product.mismatch, previous.grad_mismatch),
    cap_count=count(previous.cap_count, coefs.cap_bound),
    nonfinite_count=count(previous.nonfinite_count, ~coefs.finite),
    mismatch_count=count(previous.mismatch_count, mismatched),
  )


def _initial_diagnostics() -> MetaGradientDiagnostics:
  # A separate array per field: a donated state must not hold one buffer twice.
  initial = {'cap_scale': 1.0, 'grad_mismatch': jnp.nan}
  return MetaGradientDiagnostics(
    **{
      name: jnp.full(
        (), initial.get(name, 0), jnp.int32 if name.endswith('_count') else jnp.float32
      )
      for name in MetaGradientDiagnostics._fields
    }
  )


# ------------------------------------------------------------------- the update's steps


def _check_update_call(
  updates: PyTree,
  params: PyTree,
  obj_fn: ObjFn | None,
  hvp_fn: HvpFn | None,
  refresh_hvp: Any,
  keeps_product: bool,
) -> None:
  """Raises at trace time for a misused ``update``, naming the fix."""
  _check_not_masked_by_optax(updates, 'updates')
  if refresh_hvp is not None and not isinstance(refresh_hvp, (bool, np.bool_)):
    raise TypeError(
      'refresh_hvp must be a Python bool (or None), known when the step is traced; got'
      f' {refresh_hvp!r}. To schedule refreshes inside one compiled step, use hvp_every'
      ' alone.'
    )
  if refresh_hvp is not None and not keeps_product:
    raise ValueError(
      'refresh_hvp needs a stored product: construct the transform with hvp_every > 1.'
    )
  if refresh_hvp is not False and (obj_fn is None) == (hvp_fn is None):
    which = 'neither' if obj_fn is None else 'both'
    hint = (
      ' If you called flax.training.train_state.TrainState.apply_gradients(...,'
      ' obj_fn=...): it does not pass keywords on to tx.update; use'
      ' f3eo_jax.flax.apply_gradients(state, grads, obj_fn=...).'
      if obj_fn is None
      else ''
    )
    raise TypeError(
      f'add_meta_gradient.update needs exactly one of obj_fn= and hvp_fn=, got {which}. '
      + _USAGE
      + hint
    )
  if obj_fn is not None and params is None:
    raise ValueError(
      'add_meta_gradient.update got obj_fn but no params; the Hessian is taken at the'
      ' params: call tx.update(grads, state, params, obj_fn=...).'
    )


def _scheduled_product(
  layout: _Layout,
  state: MetaGradientState,
  refresh: Callable[[], _Product],
  refresh_hvp: bool | None,
  keeps_product: bool,
  hvp_every: Any,
) -> _Product:
  """This update's ``H·g``: computed now, reused from the state, or chosen by ``lax.cond``."""
  if not keeps_product or refresh_hvp is True:
    return refresh()
  stored = _stored(layout, state.hvp)
  if refresh_hvp is False:
    return stored
  every = jnp.maximum(jnp.asarray(hvp_every).astype(jnp.int32), 1)

  def refreshed():
    product = refresh()
    return _buffer_leaves(product, state.hvp), product.mismatch, product.finite

  # Both branches return the buffer's leaves, so lax.cond sees one structure.
  leaves, mismatch, finite = jax.lax.cond(
    state.step % every == 0,
    refreshed,
    lambda: (jax.tree.leaves(state.hvp), stored.mismatch, stored.finite),
  )
  return _Product([h if a else None for h, a in zip(leaves, layout.active)], mismatch, finite)


def _effective_gradient(
  layout: _Layout,
  leaves: Sequence[jax.Array],
  product: _Product,
  mismatched: jax.Array,
  *,
  orthogonalize: bool,
  meta_coef: ScalarLike,
  meta_clip_norm: ScalarLike | None,
  meta_max_ratio: ScalarLike | None,
) -> tuple[list[jax.Array], list[_Sums], _Coefficients]:
  """``e = g + m⊥`` leaf by leaf: reductions, scalar algebra, one elementwise pass."""
  if not layout.segments:  # no leaf gets a meta term
    yes = jnp.ones((), bool)
    return list(leaves), [], _Coefficients([], [], yes, yes, jnp.zeros(()), jnp.ones(()), ~yes)
  g, hg = leaves, product.hg
  acc = functools.reduce(jnp.promote_types, [_acc_dtype(g[i]) for s in layout.segments for i in s])
  sums = _segment_sums(layout, g, hg, _leaf_maxima(layout, g, hg), acc)
  ratios = _projection_ratios(sums, orthogonalize)
  perp = None
  if meta_max_ratio is not None and orthogonalize:
    perp, ratios = _perp_sums(layout, g, hg, sums, ratios)
  coefs = _coefficients(
    sums,
    ratios,
    perp,
    meta_coef=meta_coef,
    meta_clip_norm=meta_clip_norm,
    meta_max_ratio=meta_max_ratio,
    usable=product.finite,
    consistent=~mismatched,
    acc=acc,
    largest=[min(float(jnp.finfo(g[i].dtype).max) for i in seg) for seg in layout.segments],
  )
  return _combine(layout, leaves, hg, sums, coefs), sums, coefs


# ------------------------------------------------------------------- the transform


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
    m = c\,H g,\qquad
    m \leftarrow m \min\!\Big(1, \frac{\tau}{\|m\| + 10^{-6}}\Big),\qquad
    m_\perp = m - \frac{\langle m, g\rangle}{\langle g, g\rangle}\, g,\qquad
    m_\perp \leftarrow m_\perp \min\!\Big(1, \frac{\rho \|g\|}{\|m_\perp\|}\Big),

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
      schedule runs inside the compiled step under ``jax.lax.cond``; pass
      ``refresh_hvp=`` to ``update`` to decide at Python level instead. An array
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
  _check_real('meta_coef', meta_coef)
  _check_bool('orthogonalize', orthogonalize)
  if projection not in _PROJECTIONS:
    raise ValueError(f'projection must be one of {_PROJECTIONS}, got {projection!r}.')
  if meta_clip_norm is not None:
    _check_real('meta_clip_norm', meta_clip_norm, minimum=0, strict=True)
  if meta_max_ratio is not None:
    _check_real('meta_max_ratio', meta_max_ratio, minimum=0)
  _check_real('hvp_every', hvp_every, minimum=1, integer=True)
  if not _is_scalar_array(hvp_every) and hvp_every > _MAX_HVP_EVERY:
    raise ValueError(f'hvp_every must be < 2**31 (the step counter is int32), got {hvp_every}.')
  if check_consistency is not None:
    # inf measures the mismatch without ever dropping the meta term.
    _check_real('check_consistency', check_consistency, minimum=0, allow_inf=True)
  _check_mask_spec('meta_mask', meta_mask)
  try:
    hash(axis_name)
  except TypeError as e:
    raise TypeError(f'axis_name must be a name (hashable), got {axis_name!r}.') from e
  # An array hvp_every may be traced, so its state always has room for a stored H·g.
  keeps_product = _is_scalar_array(hvp_every) or bool(hvp_every > 1)

  def init_fn(params: PyTree) -> MetaGradientState:
    _check_not_masked_by_optax(params, 'params')
    _layout(meta_mask, params, params, projection)  # fail early on a mask that does not fit
    buffer = optax.tree.zeros_like(params) if keeps_product else None
    return MetaGradientState(
      step=jnp.zeros((), jnp.int32), hvp=buffer, diagnostics=_initial_diagnostics()
    )

  def update_fn(
    updates, state, params=None, *, obj_fn=None, hvp_fn=None, refresh_hvp=None, **extra_args
  ):
    del extra_args
    _check_update_call(updates, params, obj_fn, hvp_fn, refresh_hvp, keeps_product)
    layout = _layout(meta_mask, params, updates, projection)
    leaves = jax.tree.leaves(updates)
    check = check_consistency if obj_fn is not None else None

    def refresh() -> _Product:
      product = _compute_product(
        layout, leaves, params, obj_fn=obj_fn, hvp_fn=hvp_fn, axis_name=axis_name,
        check_consistency=check,
      )  # fmt: skip
      return _for_storage(layout, product, state.hvp, check) if keeps_product else product

    product = _scheduled_product(layout, state, refresh, refresh_hvp, keeps_product, hvp_every)
    mismatched = _mismatched(product.mismatch, check)
    new_leaves, sums, coefs = _effective_gradient(
      layout, leaves, product, mismatched, orthogonalize=orthogonalize, meta_coef=meta_coef,
      meta_clip_norm=meta_clip_norm, meta_max_ratio=meta_max_ratio,
    )  # fmt: skip
    stores = keeps_product and refresh_hvp is not False
    new_state = MetaGradientState(
      step=optax.safe_int32_increment(state.step),
      hvp=(layout.treedef.unflatten(_buffer_leaves(product, state.hvp)) if stores else state.hvp),
      diagnostics=_diagnostics(sums, coefs, product, state.diagnostics, mismatched),
    )
    return layout.treedef.unflatten(new_leaves), new_state

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)


# ------------------------------------------------------------------- PyTorch's AMSGrad


class ScaleByAmsgradState(NamedTuple):
  """State of :func:`scale_by_amsgrad_torch`."""

  count: jax.Array  # type: ignore[assignment]  # int32 scalar: steps taken (as Adam's).
  mu: optax.Updates  # first moment, like the params (dtype mu_dtype if given).
  nu: optax.Updates  # second moment, like the params.
  nu_max: optax.Updates  # running maximum of the raw (not bias-corrected) nu.


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
    An ``optax.GradientTransformation``.

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
    return ScaleByAmsgradState(
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
    return new_updates, ScaleByAmsgradState(count=count, mu=mu, nu=nu, nu_max=nu_max)

  return optax.GradientTransformation(init_fn, update_fn)


# ------------------------------------------------------------------- reading the state


def _unwrap(x: Any) -> Any:
  """Reads an array out of a Flax NNX ``Variable`` (or returns it unchanged)."""
  return x.get_value() if hasattr(x, 'get_value') else getattr(x, 'value', x)


def _meta_states(opt_state: PyTree) -> list[MetaGradientState]:
  return [
    node
    for node in jax.tree.leaves(opt_state, is_leaf=lambda x: isinstance(x, MetaGradientState))
    if isinstance(node, MetaGradientState)
  ]


def diagnostics(opt_state: PyTree) -> dict[str, jax.Array]:
  """The last update's F3EO scalars, found anywhere inside an optimizer state.

  Looks through chains, ``inject_hyperparams``, ``apply_if_finite``, Flax train
  states and NNX optimizer state for the one :class:`MetaGradientState`.

  Args:
    opt_state: an optimizer state containing exactly one ``MetaGradientState``.

  Returns:
    The fields of :class:`MetaGradientDiagnostics` by name: ``grad_sq_norm``,
    ``g_dot_hg``, ``hg_norm``, ``meta_norm``, ``cos_g_hg``, ``cap_scale``,
    ``grad_mismatch`` (float32) and ``cap_count``, ``nonfinite_count``,
    ``mismatch_count`` (int32).

  Example:
    >>> import jax.numpy as jnp
    >>> import f3eo_jax
    >>> tx = f3eo_jax.f3eo(1e-3)
    >>> sorted(f3eo_jax.diagnostics(tx.init({'w': jnp.ones(2)})))[:3]
    ['cap_count', 'cap_scale', 'cos_g_hg']
  """
  found = _meta_states(opt_state)
  if len(found) != 1:
    raise ValueError(
      f'diagnostics expects exactly one MetaGradientState in the optimizer state, found'
      f' {len(found)}. Pass the part of the state that holds the F3EO transform.'
    )
  return {k: _unwrap(v) for k, v in found[0].diagnostics._asdict().items()}


def raise_on_mismatch(opt_state: PyTree) -> None:
  """Raises :class:`GradientMismatchError` if an update dropped its meta term for a mismatch.

  The check itself runs inside the compiled step (``check_consistency``); this reads
  its counter on the host, so it works the same on one device, under sharding and on
  every process of a multi-host run, and the state stays valid: call it after a step
  (or every few steps) and decide there. It blocks until the state is computed.

  Args:
    opt_state: an optimizer state containing F3EO's :class:`MetaGradientState`.

  Raises:
    GradientMismatchError: if ``mismatch_count`` is positive; the message gives the
      count, the last measured mismatch and the usual causes.
    ValueError: if the state holds no ``MetaGradientState``.

  Example:
    >>> import jax, jax.numpy as jnp
    >>> import f3eo_jax
    >>> loss = lambda p, x: jnp.sum((p - x) ** 2)
    >>> tx, p = f3eo_jax.f3eo(1e-2), jnp.zeros(3)
    >>> g = jax.grad(loss)(p, 1.0)
    >>> _, state = tx.update(g, tx.init(p), p, obj_fn=lambda q: loss(q, 2.0))  # wrong batch
    >>> f3eo_jax.raise_on_mismatch(state)
    Traceback (most recent call last):
    ...
    f3eo_jax.transform.GradientMismatchError: 1 update(s) dropped the F3EO meta term ...
  """
  found = _meta_states(opt_state)
  if not found:
    raise ValueError('raise_on_mismatch found no MetaGradientState in the optimizer state.')
  for state in found:
    count = int(np.max(np.asarray(jax.device_get(_unwrap(state.diagnostics.mismatch_count)))))
    if count > 0:
      last = np.asarray(jax.device_get(_unwrap(state.diagnostics.grad_mismatch)))
      raise GradientMismatchError(
        f'{count} update(s) dropped the F3EO meta term because the gradient of obj_fn'
        ' differed from the gradients passed to update by more than check_consistency'
        f' (relative; the latest measured mismatch is {float(np.max(last)):.3g}). '
        + _MISMATCH_CAUSES
      )
