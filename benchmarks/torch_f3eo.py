"""F3EO in PyTorch, written from the algorithm's definition: the independent twin of f3eo_jax.

Nothing here imports ``f3eo_jax``. ``H·g`` comes from double backward (the gradient of
``½‖g‖²``); then ``m = meta_coef·H·g``, an optional absolute clip of ``‖m‖``, the projection
``m⊥ = m − (⟨m,g⟩/⟨g,g⟩) g`` (``'global'`` or ``'per_leaf'``), an optional relative cap
``‖m⊥‖ ≤ ρ‖g‖``, ``e = g + m⊥``, then an AdamW step on ``e``. :data:`REFERENCE` is the
published rule, :data:`THEORY` the uncapped theory rule. Used by
``tests/test_torch_parity.py`` and the PyTorch rows of ``benchmarks/step_time.py``.

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

import torch
from torch.nn import functional as F

CLIP_EPS = 1e-6  # the absolute clip's epsilon: m · min(1, τ / (‖m‖ + 1e-6))
CAP_TINY = 1e-30  # the relative cap's guard against ‖m⊥‖ = 0


@dataclasses.dataclass(frozen=True)
class Rule:
  """One F3EO rule, in the library's terms."""

  meta_coef: float = 1.0  # m = meta_coef · H·g (+1: the theory; −2: the published code)
  projection: str = 'global'  # or 'per_leaf'
  clip_norm: float | None = None  # the absolute clip τ on ‖m‖
  max_ratio: float | None = None  # the relative cap ρ on ‖m⊥‖ / ‖g‖


REFERENCE = Rule(meta_coef=-2.0, projection='per_leaf', clip_norm=1.0)
THEORY = Rule()


@dataclasses.dataclass
class EffectiveGradient:
  """What one double-backward step gives, all detached."""

  e: list[torch.Tensor]  # the effective gradient, one tensor per parameter
  grads: list[torch.Tensor]  # the plain gradient g
  hg_norm: torch.Tensor  # ‖H·g‖ over the meta group, before the coefficient and the clip
  cap_scale: torch.Tensor  # the smallest factor the relative cap applied


def _sq(tensors) -> torch.Tensor:
  return sum((t * t).sum() for t in tensors)


def _groups(n: int, projection: str) -> list[list[int]]:
  if projection == 'global':
    return [list(range(n))]
  if projection == 'per_leaf':
    return [[i] for i in range(n)]
  raise ValueError(f'projection must be global or per_leaf, got {projection!r}')


def effective_gradient(loss, params, in_meta=None, *, rule: Rule = REFERENCE) -> EffectiveGradient:
  """The effective gradient ``e = g + m⊥`` of one F3EO step, by double backward.

  ``in_meta``: one bool per parameter (default all): the others get ``e = g`` and are left
  out of ``H·g``, the clip, the projection and the cap (``H_MM·g_M`` over the meta group M).
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
  return EffectiveGradient(e, [gr.detach() for gr in grads], hg_norm, cap_scale)


def _sq_dot(m, g, group) -> torch.Tensor:
  return sum((m[i] * g[i]).sum() for i in group)


class AdamW:
  """AdamW by hand (decoupled decay, bias correction, optional AMSGrad), as torch.optim.AdamW."""

  def __init__(self, params, lr, betas=(0.9, 0.999), eps=1e-8, weight_decay=1e-2, amsgrad=False):
    self.params = list(params)
    self.lr, (self.b1, self.b2), self.eps, self.wd = lr, betas, eps, weight_decay
    self.amsgrad, self.t = amsgrad, 0
    self.m, self.v, self.vmax = ([torch.zeros_like(p) for p in self.params] for _ in range(3))

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
      v = self.vmax[i] if self.amsgrad else self.v[i]
      p.sub_((self.lr / bc1) * self.m[i] / (torch.sqrt(v) / math.sqrt(bc2) + self.eps))


def cross_entropy(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
  """Mean cross-entropy over every position (``(..., C)`` logits, ``(...)`` labels)."""
  return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1))


def f3eo_step(model, optimizer, x, y, rule: Rule = REFERENCE) -> torch.Tensor:
  """One F3EO step of ``model``: ``e`` by double backward, then ``optimizer`` on ``e``."""
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
