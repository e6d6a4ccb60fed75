"""Matrix-free Hessian-vector products of a scalar objective.

Everything here is exact (no finite differences) and never forms the Hessian.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp

PyTree = Any
ObjFn = Callable[[PyTree], jax.Array]
HvpFn = Callable[[PyTree], PyTree]


def _checked_scalar(obj_fn: ObjFn) -> ObjFn:
  """Wraps ``obj_fn`` so that a non-scalar output fails at trace time."""

  def scalar_obj_fn(params):
    value = obj_fn(params)
    shape = jnp.shape(value)
    if shape != ():
      raise TypeError(
          'obj_fn must return a scalar loss (shape ()), got an output of shape'
          f' {shape}. Reduce it first, for example with jnp.mean(...).'
      )
    return value

  return scalar_obj_fn


def _tangent_like(tangent: PyTree, params: PyTree) -> PyTree:
  """Casts each tangent leaf to its parameter's dtype, as ``jax.jvp`` needs."""
  return jax.tree.map(lambda t, p: jnp.asarray(t, jnp.result_type(p)), tangent, params)


def grad_and_hvp(obj_fn: ObjFn, params: PyTree, tangent: PyTree) -> tuple[PyTree, PyTree]:
  """Returns ``(∇f(params), H·tangent)`` by forward-over-reverse autodiff.

  One ``jax.jvp`` of ``jax.grad(obj_fn)``: its primal output is the gradient and its
  tangent output the Hessian-vector product.

  Args:
    obj_fn: scalar function of ``params``.
    params: pytree of floating-point arrays.
    tangent: pytree with the structure and shapes of ``params``.

  Returns:
    The gradient and ``H·tangent``, both pytrees like ``params``.
  """
  return jax.jvp(
      jax.grad(_checked_scalar(obj_fn)), (params,), (_tangent_like(tangent, params),)
  )


def hvp(obj_fn: ObjFn, params: PyTree, tangent: PyTree) -> PyTree:
  """Hessian-vector product ``H·v`` of a scalar function, forward-over-reverse.

  For ``f = obj_fn`` and ``H = ∇²f(params)``, returns ``H·tangent`` as
  ``jax.jvp(jax.grad(f), (params,), (tangent,))[1]``: one forward-mode pass through
  the gradient computation, about the cost of two to three gradient evaluations,
  with memory of the order of one gradient's.

  Args:
    obj_fn: function of ``params`` returning a scalar (shape ``()``).
    params: pytree of floating-point arrays at which the Hessian is taken.
    tangent: pytree with the structure and shapes of ``params``; leaves are cast to
      the dtype of the matching parameter.

  Returns:
    ``H·tangent``, a pytree like ``params``.

  Raises:
    TypeError: at trace time, if ``obj_fn`` does not return a scalar.

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

  ``jax.linearize`` of ``jax.value_and_grad(obj_fn)`` evaluates the loss and its
  gradient once and returns the linear map ``v ↦ H·v`` at ``params``. Feeding that
  map to :func:`f3eo_jax.add_meta_gradient` as ``hvp_fn`` saves the second gradient
  evaluation that ``obj_fn=`` costs, in exchange for keeping the linearization's
  residuals alive until the product is taken.

  Args:
    obj_fn: function of ``params`` returning a scalar, or ``(scalar, aux)`` when
      ``has_aux``.
    params: pytree of floating-point arrays.
    has_aux: whether ``obj_fn`` returns an auxiliary output as well.

  Returns:
    ``(value, grads, hvp_fn)``; ``value`` is ``(loss, aux)`` when ``has_aux``.

  Example:
    >>> import jax.numpy as jnp
    >>> import f3eo_jax
    >>> f = lambda p: jnp.sum(p ** 3)
    >>> loss, g, hvp_fn = f3eo_jax.value_grad_and_hvp(f, jnp.array([1.0, 2.0]))
    >>> loss, g, hvp_fn(g)
    (Array(9., dtype=float32), Array([ 3., 12.], dtype=float32), Array([ 18., 144.], dtype=float32))
  """
  if has_aux:

    def grad_with_value(p):
      (loss, aux), grads = jax.value_and_grad(obj_fn, has_aux=True)(p)
      return grads, (loss, aux)

  else:
    checked = _checked_scalar(obj_fn)

    def grad_with_value(p):
      loss, grads = jax.value_and_grad(checked)(p)
      return grads, loss

  grads, linear_fn, value = jax.linearize(grad_with_value, params, has_aux=True)

  def hvp_fn(tangent: PyTree) -> PyTree:
    return linear_fn(_tangent_like(tangent, params))

  return value, grads, hvp_fn
