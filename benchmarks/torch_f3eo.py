"""F3EO in PyTorch, written from the algorithm's definition: the independent twin of f3eo_jax.

Nothing here imports ``f3eo_jax``. ``H·g`` comes from PyTorch's double backward: the
gradient ``g`` is taken with ``create_graph=True`` and differentiated again through
``½‖g‖²``, whose gradient is ``H·g``. Then, as in the library:

1. ``m = meta_coef · H·g``;
2. optional absolute clip: ``m ← m · min(1, τ/(‖m‖ + 1e-6))`` (global norm);
3. projection: ``m⊥ = m − (⟨m,g⟩/⟨g,g⟩) g``, over all parameters as one vector
   (``'global'``) or per tensor (``'per_leaf'``), skipped where ``⟨g,g⟩ = 0``;
4. optional relative cap: ``m⊥ ← m⊥ · min(1, ρ‖g‖/(‖m⊥‖ + tiny))``, global or per
   tensor like the projection;
5. ``e = g + m⊥``, then an AdamW step on ``e``.

Two rules are named: :data:`REFERENCE`, the published PyTorch code (``meta =
∇‖g‖² = 2·H·g``, clipped to 1, projected per tensor, ``e = g − meta⊥``), and
:data:`THEORY` (``e = g + (H·g)⊥``, global projection, no clip, no cap).

Used by ``tests/test_torch_parity.py`` (step-for-step parity with the library, in
float64) and by ``benchmarks/step_time.py`` (the PyTorch rows). Import it only where
torch is installed.

Example:
  >>> import torch
  >>> from benchmarks import torch_f3eo
  >>> w = torch.tensor([1.0, -2.0], dtype=torch.float64, requires_grad=True)
  >>> loss = (w[0] ** 2 + w[0] * w[1] + 3.0 * w[1] ** 2)
  >>> out = torch_f3eo.effective_gradient(loss, [w], rule=torch_f3eo.THEORY)
  >>> float(out.hg_norm) > 0 and abs(float((out.e[0] - out.grads[0]) @ out.grads[0])) < 1e-12
  True
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence

import torch
from torch.nn import functional as F

CLIP_EPS = 1e-6  # the absolute clip's epsilon: m · min(1, τ / (‖m‖ + 1e-6))
CAP_TINY = 1e-30  # the relative cap's guard against ‖m⊥‖ = 0


@dataclasses.dataclass(frozen=True)
class Rule:
  """One F3EO rule, in the library's terms.

  Attributes:
    meta_coef: ``m = meta_coef · H·g`` (+1: the theory; −2: the published code).
    projection: ``'global'`` or ``'per_leaf'``.
    clip_norm: the absolute clip ``τ`` on ``‖m‖``, or None.
    max_ratio: the relative cap ``ρ`` on ``‖m⊥‖ / ‖g‖``, or None.
  """

  meta_coef: float = 1.0
  projection: str = 'global'
  clip_norm: float | None = None
  max_ratio: float | None = None


REFERENCE = Rule(meta_coef=-2.0, projection='per_leaf', clip_norm=1.0)
THEORY = Rule()


@dataclasses.dataclass
class EffectiveGradient:
  """What one double-backward step gives, all detached.

  Attributes:
    e: the effective gradient, one tensor per parameter.
    grads: the plain gradient ``g``, one tensor per parameter.
    hg_norm: ``‖H·g‖`` over the meta group, before the coefficient and the clip
      (a 0-d tensor).
    cap_scale: the smallest factor the relative cap applied (1 where it did not bind).
  """

  e: list[torch.Tensor]
  grads: list[torch.Tensor]
  hg_norm: torch.Tensor
  cap_scale: torch.Tensor


def _sq(tensors) -> torch.Tensor:
  return sum((t * t).sum() for t in tensors)


def _groups(n: int, projection: str) -> list[list[int]]:
  if projection == 'global':
    return [list(range(n))]
  if projection == 'per_leaf':
    return [[i] for i in range(n)]
  raise ValueError(f'projection must be global or per_leaf, got {projection!r}')


def effective_gradient(
  loss: torch.Tensor,
  params: Sequence[torch.Tensor],
  in_meta: Sequence[bool] | None = None,
  *,
  rule: Rule = REFERENCE,
) -> EffectiveGradient:
  """The effective gradient ``e = g + m⊥`` of one F3EO step, by double backward.

  Args:
    loss: the scalar minibatch loss, built from ``params`` with autograd on.
    params: the leaf tensors (``requires_grad=True``).
    in_meta: one bool per parameter: whether it takes part in the meta term. The others
      get ``e = g`` and are left out of ``H·g``'s tangent, the clip, the projection and
      the cap: the meta objective is ``½‖g_M‖²`` over the meta group ``M``, differentiated
      with respect to ``M`` only, which gives ``H_MM·g_M``. Default: all.
    rule: the :class:`Rule`.

  Returns:
    An :class:`EffectiveGradient`.
  """
  params = list(params)
  in_meta = [True] * len(params) if in_meta is None else list(in_meta)
  grads = torch.autograd.grad(loss, params, create_graph=True)
  meta_params = [p for p, keep in zip(params, in_meta) if keep]
  meta_grads = [gr for gr, keep in zip(grads, in_meta) if keep]
  hg = torch.autograd.grad(0.5 * _sq(meta_grads), meta_params)  # ∇½‖g‖² = H·g
  g = [x.detach() for x in meta_grads]
  hg_norm = torch.sqrt(_sq(hg)).detach()
  m = [rule.meta_coef * h.detach() for h in hg]
  if rule.clip_norm is not None:
    scale = torch.clamp(rule.clip_norm / (torch.sqrt(_sq(m)) + CLIP_EPS), max=1.0)
    m = [x * scale for x in m]
  cap_scale = torch.ones((), dtype=hg_norm.dtype)
  for group in _groups(len(m), rule.projection):
    gg = _sq(g[i] for i in group)
    coef = torch.where(gg > 0, _sq_dot(m, g, group) / torch.where(gg > 0, gg, 1.0), 0.0)
    for i in group:
      m[i] = m[i] - coef * g[i]
    if rule.max_ratio is not None:
      scale = torch.clamp(
        rule.max_ratio * torch.sqrt(gg) / (torch.sqrt(_sq(m[i] for i in group)) + CAP_TINY),
        max=1.0,
      )
      cap_scale = torch.minimum(cap_scale, scale)
      for i in group:
        m[i] = m[i] * scale
  meta_e = iter([x + y for x, y in zip(g, m)])
  e = [next(meta_e) if keep else gr.detach() for gr, keep in zip(grads, in_meta)]
  return EffectiveGradient(
    e=e, grads=[gr.detach() for gr in grads], hg_norm=hg_norm, cap_scale=cap_scale
  )


def _sq_dot(m, g, group) -> torch.Tensor:
  return sum((m[i] * g[i]).sum() for i in group)


class AdamW:
  """AdamW by hand: decoupled decay, bias-corrected moments, optional AMSGrad.

  ``p ← p − lr·wd·p``, then ``p ← p − (lr/bc1)·m / (√v/√bc2 + eps)`` with ``v`` the
  running maximum of the second moment under AMSGrad; the same as
  ``torch.optim.AdamW`` (checked in ``tests/test_torch_parity.py``).
  """

  def __init__(self, params, lr, betas=(0.9, 0.999), eps=1e-8, weight_decay=1e-2, amsgrad=False):
    self.params = list(params)
    self.lr, (self.b1, self.b2), self.eps, self.wd = lr, betas, eps, weight_decay
    self.amsgrad = amsgrad
    self.t = 0
    self.m = [torch.zeros_like(p) for p in self.params]
    self.v = [torch.zeros_like(p) for p in self.params]
    self.vmax = [torch.zeros_like(p) for p in self.params]

  @torch.no_grad()
  def step(self, effective_grads):
    """One step along ``effective_grads`` (one tensor per parameter)."""
    self.t += 1
    bc1 = 1.0 - self.b1**self.t
    bc2 = 1.0 - self.b2**self.t
    for i, (p, e) in enumerate(zip(self.params, effective_grads)):
      p.sub_(self.lr * self.wd * p)
      self.m[i] = self.b1 * self.m[i] + (1.0 - self.b1) * e
      self.v[i] = self.b2 * self.v[i] + (1.0 - self.b2) * e * e
      if self.amsgrad:
        self.vmax[i] = torch.maximum(self.vmax[i], self.v[i])
        v = self.vmax[i]
      else:
        v = self.v[i]
      p.sub_((self.lr / bc1) * self.m[i] / (torch.sqrt(v) / math.sqrt(bc2) + self.eps))


def cross_entropy(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
  """Mean cross-entropy over every position (``(..., C)`` logits, ``(...)`` labels)."""
  return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1))


def f3eo_step(model, optimizer, x, y, rule: Rule = REFERENCE) -> torch.Tensor:
  """One F3EO training step of ``model`` with a ``torch.optim`` optimizer on ``e``.

  Args:
    model: a ``torch.nn.Module`` returning logits.
    optimizer: built on ``model``'s parameters (``torch.optim.AdamW`` for F3EO).
    x: the inputs.
    y: the integer labels.
    rule: the :class:`Rule` (default: the published one).

  Returns:
    The minibatch loss before the step.
  """
  params = [p for p in model.parameters() if p.requires_grad]
  loss = cross_entropy(model(x), y)
  out = effective_gradient(loss, params, rule=rule)
  for p, e in zip(params, out.e):
    p.grad = e
  optimizer.step()
  return loss.detach()


def plain_step(model, optimizer, x, y) -> torch.Tensor:
  """One ordinary training step (``loss.backward()``, ``optimizer.step()``)."""
  optimizer.zero_grad(set_to_none=True)
  loss = cross_entropy(model(x), y)
  loss.backward()
  optimizer.step()
  return loss.detach()
