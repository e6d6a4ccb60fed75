"""The transform's state, its per-update diagnostics, and reading them on the host."""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from f3eo_jax._types import PyTree

_MISMATCH_CAUSES = (
  'obj_fn must be the very loss whose gradient was passed as `updates`: the same batch,'
  ' the same dropout key, batch norm in the same mode with the same statistics. Other'
  ' causes: a transform placed before add_meta_gradient in an optax.chain (for example'
  ' clip_by_global_norm) changes g, so put the meta-gradient first; optax.MultiSteps'
  " averages g over micro-batches but passes only the last micro-batch's obj_fn, so"
  ' accumulate with f3eo_jax.accumulated_value_grad_and_hvp instead.'
)


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
  """State of :func:`f3eo_jax.add_meta_gradient`."""

  step: jax.Array  # int32 scalar: updates taken; schedules the hvp_every refreshes.
  hvp: PyTree  # last H·g like the params when a product is stored (hvp_every > 1), else None.
  diagnostics: MetaGradientDiagnostics  # scalars of the last update.


class GradientMismatchError(ValueError):
  """The gradient of ``obj_fn`` differed from the gradients being updated."""


def initial_diagnostics() -> MetaGradientDiagnostics:
  """The diagnostics before any update: zeros, ``cap_scale`` 1, ``grad_mismatch`` NaN."""
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


def accumulate(
  previous: MetaGradientDiagnostics, update: MetaGradientDiagnostics
) -> MetaGradientDiagnostics:
  """The diagnostics after an update.

  Args:
    previous: the state's diagnostics before the update.
    update: this update's scalars, with flags (bools) in place of the counters and a
      NaN ``grad_mismatch`` where it was not measured.

  Returns:
    ``update``'s values in float32, the counters incremented by its flags, and the last
    measured ``grad_mismatch``.
  """
  values = {
    name: jnp.asarray(v, jnp.float32)
    for name, v in update._asdict().items()
    if not name.endswith('_count') and name != 'grad_mismatch'
  }
  measured = ~jnp.isnan(update.grad_mismatch)
  count = lambda c, flag: c + flag.astype(jnp.int32)
  return MetaGradientDiagnostics(
    **values,
    grad_mismatch=jnp.where(measured, update.grad_mismatch, previous.grad_mismatch),
    cap_count=count(previous.cap_count, update.cap_count),
    nonfinite_count=count(previous.nonfinite_count, update.nonfinite_count),
    mismatch_count=count(previous.mismatch_count, update.mismatch_count),
  )


def read_value(x: Any) -> Any:
  """An array out of a Flax NNX ``Variable``, or ``x`` unchanged."""
  return x.get_value() if hasattr(x, 'get_value') else getattr(x, 'value', x)


def find_meta_states(opt_state: PyTree) -> list[MetaGradientState]:
  """Every :class:`MetaGradientState` inside an optimizer state, in tree order."""
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
  found = find_meta_states(opt_state)
  if len(found) != 1:
    raise ValueError(
      f'diagnostics expects exactly one MetaGradientState in the optimizer state, found'
      f' {len(found)}. Pass the part of the state that holds the F3EO transform.'
    )
  return {k: read_value(v) for k, v in found[0].diagnostics._asdict().items()}


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
    >>> wrong_obj_fn = lambda q: loss(q, 2.0)  # the loss of another batch
    >>> _, state = tx.update(g, tx.init(p), p, obj_fn=wrong_obj_fn)
    >>> f3eo_jax.raise_on_mismatch(state)
    Traceback (most recent call last):
    ...
    f3eo_jax.state.GradientMismatchError: 1 update(s) dropped the F3EO meta term ...
  """
  found = find_meta_states(opt_state)
  if not found:
    raise ValueError('raise_on_mismatch found no MetaGradientState in the optimizer state.')
  for state in found:
    count = int(np.max(np.asarray(jax.device_get(read_value(state.diagnostics.mismatch_count)))))
    if count > 0:
      last = np.asarray(jax.device_get(read_value(state.diagnostics.grad_mismatch)))
      raise GradientMismatchError(
        f'{count} update(s) dropped the F3EO meta term because the gradient of obj_fn'
        ' differed from the gradients passed to update by more than check_consistency'
        f' (relative; the latest measured mismatch is {float(np.max(last)):.3g}). '
        + _MISMATCH_CAUSES
      )
