"""The amortised schedule as two compiled steps: refresh ``H·g`` on one update in ``k``.

``add_meta_gradient(hvp_every=k)`` can schedule its refreshes inside one compiled step
(``jax.lax.cond`` on the step counter) or leave the choice to the caller
(``update(..., refresh_hvp=True/False)``). :func:`jit_amortized` is the second way
written once: it compiles the caller's step twice and picks one per call.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from typing import Any

import jax
import numpy as np

from f3eo_jax import checks
from f3eo_jax.state import find_meta_states, read_value


class AmortizedStep:
  """A training step compiled twice: with and without a fresh ``H·g``.

  Built by :func:`jit_amortized`. Calling it runs :attr:`refresh_step` on updates
  ``0, k, 2k, …`` and :attr:`reuse_step` in between, counting updates on the host.

  Attributes:
    hvp_every: ``k``.
    refresh_step: the step jitted with ``refresh_hvp=True``.
    reuse_step: the step jitted with ``refresh_hvp=False``.
    count: the index of the next update, or ``None`` before the first call (it is then
      read from the first :class:`~f3eo_jax.MetaGradientState` in the arguments).
  """

  def __init__(self, refresh_step: Any, reuse_step: Any, hvp_every: int):
    self.refresh_step = refresh_step
    self.reuse_step = reuse_step
    self.hvp_every = hvp_every
    self.count: int | None = None

  def __call__(self, *args: Any, **kwargs: Any) -> Any:
    """Runs the refresh or the reuse step on these arguments, and counts the update."""
    if self.count is None:
      self.count = _stored_step((args, kwargs))
    step = self.refresh_step if self.count % self.hvp_every == 0 else self.reuse_step
    out = step(*args, **kwargs)
    self.count += 1
    return out


def _stored_step(tree: Any) -> int:
  """The update counter of the first ``MetaGradientState`` in ``tree``; 0 if there is none."""
  found = find_meta_states(tree)
  if not found:
    return 0
  step = read_value(found[0].step)
  if isinstance(step, jax.Array) and not step.is_fully_addressable:
    step = step.addressable_data(0)  # replicated on every process: any local copy will do
  return int(np.asarray(jax.device_get(step)))


def jit_amortized(
  step_fn: Callable[..., Any],
  hvp_every: int,
  *,
  donate_argnums: int | Sequence[int] = (),
  **jit_kwargs: Any,
) -> AmortizedStep:
  """Compiles a training step twice, with and without ``H·g``, and picks one per call.

  The fast way to refresh the product on one update in ``k`` (``hvp_every=k``): no
  ``jax.lax.cond`` in the compiled step, so each update runs only what it needs. On
  XLA:CPU this matters most: XLA:CPU moves convolutions into the layout of its fast
  kernels only outside conditionals, so inside a ``lax.cond`` branch the convolutions of
  a gradient or a Hessian-vector product run through a slow fallback (10 to 50 times
  slower on small CNNs).

  ``step_fn`` is your training step. It takes a keyword argument ``refresh_hvp`` and
  passes it on to the F3EO transform's update,
  ``tx.update(grads, opt_state, params, obj_fn=..., refresh_hvp=refresh_hvp)``, where
  ``tx`` was built with the same ``hvp_every``. Both versions are jitted with
  ``keep_unused=True``: the refresh step never reads the stored product, and a donated
  argument that ``jit`` dropped would pair its buffer with the wrong output.

  Updates are counted on the host, from the step stored in the first
  :class:`~f3eo_jax.MetaGradientState` found in the arguments of the first call, so a
  restored checkpoint continues the schedule where it stopped. The results equal those of
  ``hvp_every=k`` scheduled inside the step, bit for bit where both compile the product
  alike (on XLA:CPU, the fallback for convolutions inside a conditional sums in another
  order, so a CNN's results then agree to float rounding).

  Args:
    step_fn: the training step; it must accept the keyword ``refresh_hvp: bool``.
    hvp_every: ``k ≥ 1``: the product is refreshed on updates ``0, k, 2k, …``.
    donate_argnums: arguments to donate (typically the params and the optimizer
      state), as in ``jax.jit``.
    **jit_kwargs: passed on to ``jax.jit`` (``static_argnames``, shardings, ...).

  Returns:
    An :class:`AmortizedStep`: call it as you would call ``step_fn``, without
    ``refresh_hvp``.

  Raises:
    TypeError, ValueError: for an ``hvp_every`` that is not an int ``≥ 1``, or
      ``jit_kwargs`` that set ``keep_unused``.

  Example:
    >>> import jax, jax.numpy as jnp, optax
    >>> import f3eo_jax
    >>> loss_fn = lambda p, x: jnp.mean(jnp.tanh(x @ p) ** 2)
    >>> params, x = jnp.ones((4, 3)), jnp.arange(8.0).reshape(2, 4) / 8
    >>> tx = f3eo_jax.f3eo(1e-2, hvp_every=10)
    >>> def train_step(params, opt_state, x, *, refresh_hvp):
    ...   obj_fn = lambda p: loss_fn(p, x)
    ...   loss, grads = jax.value_and_grad(obj_fn)(params)
    ...   updates, opt_state = tx.update(
    ...       grads, opt_state, params, obj_fn=obj_fn, refresh_hvp=refresh_hvp)
    ...   return optax.apply_updates(params, updates), opt_state, loss
    >>> step = f3eo_jax.jit_amortized(train_step, hvp_every=10, donate_argnums=(0, 1))
    >>> opt_state = tx.init(params)
    >>> for _ in range(30):
    ...   params, opt_state, loss = step(params, opt_state, x)
    >>> step.count
    30
  """
  checks.check_real('hvp_every', hvp_every, minimum=1, integer=True)
  if checks.is_scalar_array(hvp_every):
    raise TypeError(f'hvp_every must be a Python int, got an array: {hvp_every!r}.')
  if 'keep_unused' in jit_kwargs:
    raise ValueError('jit_amortized sets keep_unused=True itself; do not pass it.')
  jit = functools.partial(jax.jit, donate_argnums=donate_argnums, keep_unused=True, **jit_kwargs)
  return AmortizedStep(
    refresh_step=jit(functools.partial(step_fn, refresh_hvp=True)),
    reuse_step=jit(functools.partial(step_fn, refresh_hvp=False)),
    hvp_every=int(hvp_every),
  )
