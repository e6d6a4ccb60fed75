"""Argument checks: hyperparameters at construction, the ``update`` call at trace time.

Each check raises ``TypeError`` or ``ValueError`` with the bad value and the fix in the
message; none runs inside a compiled step.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from f3eo_jax._types import HvpFn, MaskOrFn, ObjFn, PyTree

_USAGE = (
  'Pass the loss that produced the gradients, for example '
  '`tx.update(grads, state, params, obj_fn=lambda p: loss(p, batch))`, '
  'or your own Hessian-vector product as `hvp_fn=`.'
)


def is_scalar_array(x: Any) -> bool:
  """Whether ``x`` is a 0-d array (JAX or NumPy), as ``optax.inject_hyperparams`` passes."""
  return isinstance(x, (jax.Array, np.ndarray, np.generic)) and np.ndim(x) == 0


def check_real(
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
  if is_scalar_array(value):
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


def check_bool(name: str, value: Any) -> None:
  """Raises unless ``value`` is a Python (or NumPy) bool."""
  if not isinstance(value, (bool, np.bool_)):
    raise TypeError(f'{name} must be a bool, got {value!r} of type {type(value).__name__}.')


def is_mask_leaf(x: Any) -> bool:
  """Whether ``x`` is one leaf of a ``meta_mask``: a bool, or a 0-d bool array."""
  return isinstance(x, (bool, np.bool_)) or (is_scalar_array(x) and jnp.result_type(x) == jnp.bool_)


def check_mask_spec(name: str, mask: MaskOrFn) -> None:
  """Raises unless ``mask`` is ``None``, a callable, or a pytree of bools."""
  if mask is None or callable(mask):
    return
  for leaf in jax.tree.leaves(mask):
    if not is_mask_leaf(leaf):
      raise TypeError(
        f'{name} leaves must be bools, one per parameter array (or per subtree), got'
        f' {leaf!r}. Per-element masks are not supported.'
      )


def check_not_masked_by_optax(tree: PyTree, what: str) -> None:
  """Raises if ``tree`` holds ``optax.MaskedNode`` leaves: F3EO needs the whole params."""
  masked = jax.tree.leaves(tree, is_leaf=lambda x: isinstance(x, optax.MaskedNode))
  if any(isinstance(x, optax.MaskedNode) for x in masked):
    raise TypeError(
      f'The F3EO meta-gradient got {what} with optax.MaskedNode leaves: it is inside'
      ' optax.masked, optax.multi_transform or optax.partition, which hand it only part'
      ' of the parameters, so the loss cannot be evaluated. Apply F3EO to the whole'
      ' tree and restrict the meta term with its own option instead:'
      ' add_meta_gradient(meta_mask=...) or f3eo(..., meta_mask=...).'
    )


def check_update_call(
  updates: PyTree,
  params: PyTree,
  obj_fn: ObjFn | None,
  hvp_fn: HvpFn | None,
  refresh_hvp: Any,
  keeps_product: bool,
) -> None:
  """Raises at trace time for a misused ``update``, naming the fix."""
  check_not_masked_by_optax(updates, 'updates')
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
