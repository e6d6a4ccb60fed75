"""Flax glue: F3EO's ``obj_fn`` for Linen and NNX models, built the safe way.

F3EO takes ``H·g`` of the loss at update time, so ``tx.update`` needs ``obj_fn``, the
loss as a function of the parameters alone. It must be the very function whose
gradient is ``g``: same batch, same dropout key, batch norm in the same (train) mode
with the same pre-step statistics. With Flax it is easy to get this subtly wrong;
the helpers here build ``g`` and ``obj_fn`` from one function so they cannot differ:

- Linen: :func:`linen_value_grad_and_obj_fn` and :func:`apply_gradients` (Linen's own
  ``TrainState.apply_gradients`` does not forward ``obj_fn`` to ``tx.update``).
- NNX: :func:`nnx_value_grad_and_obj_fn`; ``nnx.Optimizer.update(model, grads,
  obj_fn=obj_fn)`` forwards the keyword to ``tx.update`` as it is.

This module imports ``flax``; install the ``flax`` extra (``pip install
f3eo-jax[flax]``). ``import f3eo_jax`` does not import it.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import optax
from flax import nnx
from flax.linen.fp8_ops import OVERWRITE_WITH_GRADIENT
from flax.training import train_state

from f3eo_jax._types import HvpFn, ObjFn, PyTree


def apply_gradients(
  state: train_state.TrainState,
  grads: PyTree,
  *,
  obj_fn: ObjFn | None = None,
  hvp_fn: HvpFn | None = None,
  **replace_kwargs: Any,
) -> train_state.TrainState:
  """``state.apply_gradients`` for a Linen ``TrainState`` whose ``tx`` is F3EO.

  Linen's ``TrainState.apply_gradients(grads=..., **kwargs)`` calls
  ``tx.update(grads, opt_state, params)`` without extra keywords, and treats its own
  keywords as fields to replace, so F3EO's ``obj_fn`` (or ``hvp_fn``) cannot reach
  ``tx.update`` through it. This function does the same step and forwards them:
  ``tx.update(grads, opt_state, params, obj_fn=..., hvp_fn=...)``, then
  ``optax.apply_updates``, ``step + 1``, and ``.replace(**replace_kwargs)``. It works
  with subclasses of ``TrainState`` (for example one with a ``batch_stats`` field).

  Args:
    state: a ``flax.training.train_state.TrainState`` or a subclass.
    grads: gradients like ``state.params``.
    obj_fn: the loss as a function of the params only, the one that produced
      ``grads`` (see :func:`linen_value_grad_and_obj_fn`).
    hvp_fn: alternatively, a function ``v ↦ H·v`` (see
      :func:`f3eo_jax.value_grad_and_hvp`). Only the ones given are passed on, so a
      ``tx`` that takes neither (plain ``optax.adam``) works too.
    **replace_kwargs: other fields to replace, for example ``batch_stats=...``.

  Returns:
    The new state: ``step + 1``, new ``params`` and ``opt_state``, and the replaced
    fields.

  Example:
    >>> import jax, jax.numpy as jnp, optax
    >>> import flax.linen as nn
    >>> from flax.training import train_state
    >>> import f3eo_jax, f3eo_jax.flax
    >>> model = nn.Dense(1)
    >>> x, y = jnp.ones((4, 2)), jnp.zeros((4, 1))
    >>> params = model.init(jax.random.key(0), x)['params']
    >>> state = train_state.TrainState.create(
    ...     apply_fn=model.apply, params=params, tx=f3eo_jax.f3eo(1e-2))
    >>> obj_fn = lambda p: jnp.mean((state.apply_fn({'params': p}, x) - y) ** 2)
    >>> state = f3eo_jax.flax.apply_gradients(
    ...     state, jax.grad(obj_fn)(state.params), obj_fn=obj_fn)
    >>> int(state.step)
    1
  """
  if isinstance(grads, Mapping) and OVERWRITE_WITH_GRADIENT in grads:
    raise NotImplementedError(
      f'f3eo_jax.flax.apply_gradients does not support the {OVERWRITE_WITH_GRADIENT!r}'
      ' collection (fp8 training); obj_fn would have to cover it as well.'
    )
  extra_args = {}
  if obj_fn is not None:
    extra_args['obj_fn'] = obj_fn
  if hvp_fn is not None:
    extra_args['hvp_fn'] = hvp_fn
  updates, opt_state = state.tx.update(grads, state.opt_state, state.params, **extra_args)
  return state.replace(
    step=state.step + 1,
    params=optax.apply_updates(state.params, updates),
    opt_state=opt_state,
    **replace_kwargs,
  )


def linen_value_grad_and_obj_fn(
  apply_fn: Callable[..., Any],
  variables: Mapping[str, PyTree],
  loss_fn: Callable[[Any], Any],
  *inputs: Any,
  rngs: Mapping[str, jax.Array] | None = None,
  mutable: bool | str | Sequence[str] | None = None,
  has_aux: bool = False,
  **apply_kwargs: Any,
) -> tuple[tuple[Any, PyTree], PyTree, ObjFn]:
  """Loss, gradient and F3EO's ``obj_fn`` of a Linen model, from one function.

  Both the gradient and ``obj_fn`` evaluate

  ``p ↦ loss_fn(apply_fn({'params': p, **others}, *inputs, rngs=rngs,
  mutable=mutable, **apply_kwargs))``

  with the same inputs, the same ``rngs`` (so the same dropout masks) and the
  collections ``others`` (for example ``batch_stats``) at their values before the
  step. The collections the model updates (the new batch statistics) come out once,
  with the loss, as from ``jax.value_and_grad(..., has_aux=True)``.

  Args:
    apply_fn: ``model.apply`` (or ``state.apply_fn``).
    variables: ``{'params': params, **other_collections}``; only ``'params'`` is
      differentiated.
    loss_fn: maps the model's output to a scalar loss, or to ``(loss, aux)`` when
      ``has_aux``; close over the labels, for example ``lambda logits: xent(logits,
      labels)``.
    *inputs: the model's positional inputs.
    rngs: PRNG keys for ``apply``, for example ``{'dropout': key}``. Use a new key per
      step (``jax.random.fold_in(key, state.step)``): the gradient and ``obj_fn`` share
      it.
    mutable: collections the model may update; by default every collection in
      ``variables`` other than ``'params'`` (none: not mutable).
    has_aux: whether ``loss_fn`` returns ``(loss, aux)``.
    **apply_kwargs: other keywords for ``apply_fn``, for example ``train=True``.

  Returns:
    ``((value, new_model_state), grads, obj_fn)``: ``value`` is what ``loss_fn``
    returned (``loss`` or ``(loss, aux)``), ``new_model_state`` the updated mutable
    collections (``{}`` if none), ``grads`` like ``variables['params']``, and
    ``obj_fn(params) -> loss`` for ``tx.update`` (or :func:`apply_gradients`).

  Example:
    >>> import jax, jax.numpy as jnp, optax
    >>> import flax.linen as nn
    >>> import f3eo_jax, f3eo_jax.flax
    >>> class Net(nn.Module):
    ...   @nn.compact
    ...   def __call__(self, x, train):
    ...     x = nn.BatchNorm(use_running_average=not train)(nn.Dense(8)(x))
    ...     return nn.Dense(2)(nn.Dropout(0.2, deterministic=not train)(x))
    >>> x, y = jnp.ones((4, 3)), jnp.array([0, 1, 0, 1])
    >>> variables = Net().init(jax.random.key(0), x, train=False)
    >>> def xent(logits):
    ...   return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()
    >>> (loss, model_state), grads, obj_fn = f3eo_jax.flax.linen_value_grad_and_obj_fn(
    ...     Net().apply, variables, xent, x, train=True,
    ...     rngs={'dropout': jax.random.key(1)})
    >>> sorted(model_state)
    ['batch_stats']
    >>> bool(jnp.allclose(obj_fn(variables['params']), loss))
    True
  """
  params = variables['params']
  others = {name: value for name, value in variables.items() if name != 'params'}
  if mutable is None:
    mutable = tuple(others) or False

  def objective(p):
    out = apply_fn({'params': p, **others}, *inputs, rngs=rngs, mutable=mutable, **apply_kwargs)
    outputs, new_model_state = out if mutable else (out, {})
    value = loss_fn(outputs)
    loss = value[0] if has_aux else value
    return loss, (value, new_model_state)

  (_, (value, new_model_state)), grads = jax.value_and_grad(objective, has_aux=True)(params)

  def obj_fn(p):
    return objective(p)[0]

  return (value, new_model_state), grads, obj_fn


def nnx_value_grad_and_obj_fn(
  model: nnx.Module,
  loss_fn: Callable[..., Any],
  *args: Any,
  wrt: Any = nnx.Param,
  has_aux: bool = False,
  **kwargs: Any,
) -> tuple[Any, nnx.State, ObjFn]:
  """Loss, gradient and F3EO's ``obj_fn`` of an NNX model, from one function.

  Like ``nnx.value_and_grad(loss_fn)(model, *args)``: the gradient is taken with
  respect to the ``wrt`` variables, and the model's other state that ``loss_fn``
  changes (batch statistics, RNG counts) is written back into ``model``. In addition
  it returns ``obj_fn(params) -> loss`` for ``nnx.Optimizer.update(model, grads,
  obj_fn=obj_fn)``: the same ``loss_fn`` on a copy of the model in which the ``wrt``
  variables are ``params`` and all the rest is as it was *before* this call. So
  ``obj_fn`` sees the same dropout masks (the RNG counts are not advanced for it),
  the same pre-step batch statistics, in the same mode, as the gradient did.

  It avoids three traps of the obvious ``lambda p: loss_fn(nnx.merge(graphdef, p,
  rest))``:

  - ``nnx.split`` returns the model's own ``Variable`` objects, so ``rest`` changes
    when the forward pass updates batch statistics or advances an ``nnx.Rngs``
    stream; here ``rest`` is a snapshot of plain arrays taken first;
  - merging those ``Variable`` objects inside F3EO's ``jax.jvp`` and letting
    ``BatchNorm`` write to them raises ``TraceContextError``; here every evaluation
    merges fresh copies (``copy=True``);
  - an ``nnx.Rngs`` stream advances on every call, so a second evaluation of the
    model draws another dropout mask; here both start from the same RNG state.

  Args:
    model: an NNX module; its non-``wrt`` state is updated in place, as
      ``nnx.value_and_grad`` would.
    loss_fn: ``loss_fn(model, *args, **kwargs)`` returning a scalar, or
      ``(loss, aux)`` when ``has_aux``.
    *args: further arguments of ``loss_fn`` (the batch).
    wrt: a filter for the differentiated variables; the same as the optimizer's
      ``wrt``.
    has_aux: whether ``loss_fn`` returns ``(loss, aux)``.
    **kwargs: further keyword arguments of ``loss_fn``.

  Returns:
    ``(value, grads, obj_fn)``: ``value`` is what ``loss_fn`` returned, ``grads`` an
    ``nnx.State`` of the ``wrt`` variables (as from ``nnx.grad``), and ``obj_fn`` a
    function of such a state (of ``Variable`` objects or of plain arrays, as
    ``nnx.Optimizer.update`` passes it) returning the loss.

  Example:
    >>> import jax, jax.numpy as jnp, optax
    >>> from flax import nnx
    >>> import f3eo_jax, f3eo_jax.flax
    >>> model = nnx.Sequential(nnx.Linear(3, 8, rngs=nnx.Rngs(0)),
    ...                        nnx.Dropout(0.2, rngs=nnx.Rngs(dropout=1)))
    >>> optimizer = nnx.Optimizer(model, f3eo_jax.f3eo(1e-2), wrt=nnx.Param)
    >>> loss_fn = lambda model, x: jnp.mean(model(x) ** 2)
    >>> loss, grads, obj_fn = f3eo_jax.flax.nnx_value_grad_and_obj_fn(
    ...     model, loss_fn, jnp.ones((4, 3)))
    >>> optimizer.update(model, grads, obj_fn=obj_fn)  # doctest: +ELLIPSIS
    State(...)
    >>> int(optimizer.step[...])
    1
  """
  graphdef, params, rest = nnx.split(model, wrt, ...)  # type: ignore[misc]
  rest = nnx.as_pure(rest)  # arrays, not the model's Variables: later updates cannot leak in

  def objective(p, rest_state):
    clone = nnx.merge(graphdef, p, rest_state, copy=True)
    value = loss_fn(clone, *args, **kwargs)
    loss = value[0] if has_aux else value
    _, _, new_rest = nnx.split(clone, wrt, ...)  # type: ignore[misc]
    return loss, (value, nnx.as_pure(new_rest))

  (_, (value, new_rest)), grads = jax.value_and_grad(objective, has_aux=True)(params, rest)
  nnx.update(model, new_rest)

  def obj_fn(p):
    return objective(p, rest)[0]

  return value, grads, obj_fn
