"""Matrix-free Hessian-vector products of a scalar objective.

Everything here is exact (no finite differences) and never forms the Hessian.

Conventions shared by every function of this module:

- Only floating-point and complex leaves are differentiated. Integer and bool leaves
  (a step counter kept among the parameters) are held fixed: their gradient and
  Hessian-vector product are zeros of their own dtype.
- A complex leaf ``z = x + iy`` is the pair of real parameters ``(x, y)``. Gradients,
  tangents and products are packed the same way, ``a_x + i·a_y``: the gradient is
  ``∂f/∂x + i·∂f/∂y``, which is the conjugate of ``jax.grad`` and what Optax expects
  as the update direction of a complex parameter.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp

from f3eo_jax._types import HvpFn, ObjFn, PyTree

__all__ = ['accumulated_value_grad_and_hvp', 'grad_and_hvp', 'hvp', 'value_grad_and_hvp']


def is_differentiable(x: Any) -> bool:
  """Whether a leaf is differentiated: a floating-point or complex array."""
  return jnp.issubdtype(jnp.result_type(x), jnp.inexact)


def _checked_loss(value: Any, *, has_aux: bool) -> jax.Array:
  """The scalar loss out of ``obj_fn``'s output; fails at trace time otherwise."""
  if has_aux:
    if not (isinstance(value, tuple) and len(value) == 2):
      raise TypeError(
        'With has_aux=True the objective must return a pair (loss, aux); got'
        f' {type(value).__name__}.'
      )
    value = value[0]
  elif isinstance(value, (tuple, list)):
    raise TypeError(
      f'obj_fn returned a {type(value).__name__} of {len(value)} items; it must return'
      ' the scalar loss alone. If your loss function returns (loss, aux), pass'
      ' obj_fn=lambda p: loss_fn(p)[0].'
    )
  shape = jnp.shape(value)
  if shape != ():
    raise TypeError(
      'obj_fn must return a scalar loss (shape ()), got an output of shape'
      f' {shape}. Reduce it first, for example with jnp.mean(...).'
    )
  if not jnp.issubdtype(jnp.result_type(value), jnp.floating):
    raise TypeError(
      f'obj_fn must return a real floating-point loss, got dtype {jnp.result_type(value)}.'
    )
  return value


class _Differentiable:
  """The differentiable part of a parameter pytree, and the way back.

  Non-differentiable leaves become ``None`` (an empty subtree) so that ``jax.jvp``
  and ``jax.linearize`` never see them; :meth:`full` puts zeros back in their place.
  """

  def __init__(self, params: PyTree):
    self.params = params
    self.part = jax.tree.map(lambda p: p if is_differentiable(p) else None, params)

  def merge(self, part: PyTree) -> PyTree:
    """The parameters with their differentiable leaves taken from ``part``."""
    return jax.tree.map(
      lambda d, p: p if d is None else d, part, self.params, is_leaf=lambda x: x is None
    )

  def select(self, tree: PyTree) -> PyTree:
    """``tree``'s leaves at the differentiable positions, cast to the params' dtypes."""
    return jax.tree.map(
      lambda d, t: None if d is None else jnp.asarray(t, jnp.result_type(d)),
      self.part,
      tree,
      is_leaf=lambda x: x is None,
    )

  def full(self, part: PyTree) -> PyTree:
    """``part`` with zeros (of the params' dtypes) at the non-differentiable leaves."""
    return jax.tree.map(
      lambda d, p: jnp.zeros_like(p) if d is None else d,
      part,
      self.params,
      is_leaf=lambda x: x is None,
    )


def _conj(tree: PyTree) -> PyTree:
  """Conjugates complex leaves (``jax.grad``'s packing ↔ the real-pair packing)."""
  return jax.tree.map(lambda x: jnp.conj(x) if jnp.iscomplexobj(x) else x, tree)


def _grad_fn(obj_fn: Callable[..., Any], split: _Differentiable, *, has_aux: bool = False):
  """``part ↦ (grad, value)`` of ``obj_fn`` over the differentiable leaves, real-pair packed."""

  def grad_with_value(part):
    def loss_of_part(q):
      value = obj_fn(split.merge(q))
      return _checked_loss(value, has_aux=has_aux), value

    grads, value = jax.grad(loss_of_part, has_aux=True)(part)
    return _conj(grads), value

  return grad_with_value


def grad_and_hvp(obj_fn: ObjFn, params: PyTree, tangent: PyTree) -> tuple[PyTree, PyTree]:
  """Returns ``(∇f(params), H·tangent)`` by forward-over-reverse autodiff.

  One ``jax.jvp`` of the gradient: its primal output is the gradient and its tangent
  output the Hessian-vector product. Integer and bool leaves are held fixed (zero
  gradient and product); a complex leaf ``z = x + iy`` counts as the real pair
  ``(x, y)``, packed as ``a_x + i·a_y``.

  Args:
    obj_fn: scalar function of ``params``.
    params: pytree of arrays.
    tangent: pytree with the structure and shapes of ``params``.

  Returns:
    The gradient and ``H·tangent``, both pytrees like ``params``.

  Raises:
    TypeError: at trace time, if ``obj_fn`` does not return a real scalar.

  Example:
    >>> import jax.numpy as jnp
    >>> import f3eo_jax
    >>> f = lambda p: jnp.sum(p ** 3)
    >>> f3eo_jax.grad_and_hvp(f, jnp.array([1.0, 2.0]), jnp.array([1.0, 0.0]))
    (Array([ 3., 12.], dtype=float32), Array([6., 0.], dtype=float32))
  """
  split = _Differentiable(params)
  grad_fn = _grad_fn(obj_fn, split)
  # The tangent is given in the real-pair packing; jax.jvp wants the same packing.
  (grads, _), (product, _) = jax.jvp(grad_fn, (split.part,), (split.select(tangent),))
  return split.full(grads), split.full(product)


def hvp(obj_fn: ObjFn, params: PyTree, tangent: PyTree) -> PyTree:
  """Hessian-vector product ``H·v`` of a scalar function, forward-over-reverse.

  For ``f = obj_fn`` and ``H = ∇²f(params)``, returns ``H·tangent`` as the tangent
  output of ``jax.jvp(jax.grad(f), (params,), (tangent,))``: one forward-mode pass
  through the gradient computation, about the cost of two to three gradient
  evaluations, with memory of the order of one gradient's.

  Args:
    obj_fn: function of ``params`` returning a real scalar (shape ``()``).
    params: pytree of arrays at which the Hessian is taken.
    tangent: pytree with the structure and shapes of ``params``; leaves are cast to
      the dtype of the matching parameter.

  Returns:
    ``H·tangent``, a pytree like ``params``.

  Raises:
    TypeError: at trace time, if ``obj_fn`` does not return a real scalar.

  Example:
    >>> import jax.numpy as jnp
    >>> import f3eo_jax
    >>> f = lambda p: jnp.sum(p['w'] ** 3)
    >>> f3eo_jax.hvp(f, {'w': jnp.array([1.0, 2.0])}, {'w': jnp.array([1.0, 1.0])})
    {'w': Array([ 6., 12.], dtype=float32)}
  """
  return grad_and_hvp(obj_fn, params, tangent)[1]


def value_grad_and_hvp(
  obj_fn: Callable[..., Any], params: PyTree, *, has_aux: bool = False
) -> tuple[Any, PyTree, HvpFn]:
  """Loss, gradient and a Hessian-vector product function from one linearization.

  ``jax.linearize`` of the gradient evaluates the loss and its gradient once and
  returns the linear map ``v ↦ H·v`` at ``params``. Feeding that map to
  :func:`f3eo_jax.add_meta_gradient` as ``hvp_fn`` saves the second gradient
  evaluation that ``obj_fn=`` costs, in exchange for keeping the linearization's
  residuals alive until the product is taken.

  Args:
    obj_fn: function of ``params`` returning a scalar, or ``(scalar, aux)`` when
      ``has_aux``.
    params: pytree of arrays.
    has_aux: whether ``obj_fn`` returns an auxiliary output as well.

  Returns:
    ``(value, grads, hvp_fn)``; ``value`` is what ``obj_fn`` returned.

  Example:
    >>> import jax.numpy as jnp
    >>> import f3eo_jax
    >>> f = lambda p: jnp.sum(p ** 3)
    >>> loss, g, hvp_fn = f3eo_jax.value_grad_and_hvp(f, jnp.array([1.0, 2.0]))
    >>> loss, g
    (Array(9., dtype=float32), Array([ 3., 12.], dtype=float32))
    >>> hvp_fn(g)
    Array([ 18., 144.], dtype=float32)
  """
  split = _Differentiable(params)
  grads, linear_fn, value = jax.linearize(
    _grad_fn(obj_fn, split, has_aux=has_aux), split.part, has_aux=True
  )

  def hvp_fn(tangent: PyTree) -> PyTree:
    return split.full(linear_fn(split.select(tangent)))

  return value, split.full(grads), hvp_fn


def accumulated_value_grad_and_hvp(
  loss_fn: Callable[[PyTree, Any], Any],
  params: PyTree,
  microbatches: PyTree,
  *,
  has_aux: bool = False,
) -> tuple[Any, PyTree, HvpFn]:
  """Gradient accumulation for F3EO: the mean loss, its gradient and ``v ↦ H̄·v``.

  With micro-batches ``b_1 … b_n`` (the leading axis of every leaf of
  ``microbatches``) and ``L_i(θ) = loss_fn(θ, b_i)``, the objective is the mean
  ``L̄ = (1/n) Σ L_i``. This returns ``L̄``, ``ḡ = ∇L̄`` and a function
  ``hvp_fn(v) = H̄·v = (1/n) Σ H_i·v``, each a ``jax.lax.scan`` over the
  micro-batches, so only one micro-batch's activations live at a time. Pass
  ``tx.update(grads, state, params, hvp_fn=hvp_fn)``: F3EO then uses ``H̄·ḡ``, the
  product of the accumulated objective, exactly as one step on the whole batch would.

  ``optax.MultiSteps`` cannot do this: it hands the inner transform the averaged
  gradient but only the last micro-batch's ``obj_fn``, whose Hessian is not ``H̄``.
  (F3EO's consistency check notices, and drops the meta term for such steps.)

  Args:
    loss_fn: ``loss_fn(params, microbatch)`` returning a scalar, or ``(scalar, aux)``
      when ``has_aux``.
    params: pytree of arrays.
    microbatches: pytree whose leaves share a leading axis of length ``n``.
    has_aux: whether ``loss_fn`` returns an auxiliary output; the auxiliary outputs
      come back stacked along a leading axis.

  Returns:
    ``(value, grads, hvp_fn)``: ``value`` is the mean loss (with ``has_aux``:
    ``(mean loss, stacked aux)``), ``grads`` the mean gradient.

  Example:
    >>> import jax, jax.numpy as jnp
    >>> import f3eo_jax
    >>> loss_fn = lambda w, b: jnp.mean((b['x'] @ w) ** 2)
    >>> x = jnp.arange(12.0).reshape(4, 3) / 10
    >>> w = jnp.ones(3)
    >>> loss, g, hvp_fn = f3eo_jax.accumulated_value_grad_and_hvp(
    ...     loss_fn, w, {'x': x.reshape(2, 2, 3)})
    >>> full = lambda w: loss_fn(w, {'x': x})
    >>> bool(jnp.allclose(hvp_fn(g), f3eo_jax.hvp(full, w, g)))
    True
  """
  split = _Differentiable(params)
  num = jax.tree.leaves(microbatches)[0].shape[0]
  zeros = jax.tree.map(jnp.zeros_like, split.part)

  def grad_fn(batch):
    return _grad_fn(lambda p: loss_fn(p, batch), split, has_aux=has_aux)

  def accumulate_grads(total, batch):
    grads, value = grad_fn(batch)(split.part)
    return jax.tree.map(jnp.add, total, grads), value

  grads, values = jax.lax.scan(accumulate_grads, zeros, microbatches)
  grads = jax.tree.map(lambda g: g / num, grads)
  value: Any
  if has_aux:
    value = (jnp.mean(values[0]), values[1])
  else:
    value = jnp.mean(values)

  def hvp_fn(tangent: PyTree) -> PyTree:
    tangent = split.select(tangent)

    def accumulate_products(total, batch):
      _, (product, _) = jax.jvp(grad_fn(batch), (split.part,), (tangent,))
      return jax.tree.map(jnp.add, total, product), None

    total, _ = jax.lax.scan(accumulate_products, zeros, microbatches)
    return split.full(jax.tree.map(lambda h: h / num, total))

  return value, split.full(grads), hvp_fn
