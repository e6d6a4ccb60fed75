"""The optimizer variants of every benchmark, as plain data.

A :class:`Variant` names an optimizer (``kind``), the keyword arguments that define it, and
where ``hvp_every`` refreshes are scheduled: in the compiled step (``'graph'``) or on the host
(``'python'``, ``f3eo_jax.jit_amortized``). The study grid is ``f3eo_{sign}_{cap}_{projection}``:
``theory`` (``meta_coef=+1``) or ``published`` (``-2``); ``uncapped``, ``clip1``
(``meta_clip_norm=1``) or ``rho{ρ}`` (``meta_max_ratio=ρ``); ``global`` or ``per_leaf``.

Example:
  >>> from benchmarks import config
  >>> v = config.get('f3eo').with_options('python', hvp_every=10)
  >>> v.name, v.hvp_every, v.uses_obj_fn
  ('f3eo+hvp_every=10+python', 10, True)
"""

from __future__ import annotations

import dataclasses
import inspect
from typing import Any

import optax

import f3eo_jax

WEIGHT_DECAY = 1e-4  # the Adam family's, when a run gives none; SGD has none
ADAM_LR, ADAM_SWEEP = 3e-3, (1e-3, 3e-3, 1e-2)
SGD_LR, SGD_SWEEP = 3e-2, (1e-2, 3e-2, 1e-1)
WEIGHT_DECAY_SWEEP = (1e-4, 1e-2, 1e-1)  # adamw_wd sweeps lr x weight decay

BUILDERS = {
  'f3eo': f3eo_jax.f3eo,
  'f3eo_reference': f3eo_jax.f3eo_reference,
  'adamw': optax.adamw,
  'sgd': lambda learning_rate, **kw: optax.sgd(learning_rate, momentum=0.9, **kw),
}
SIGNS = {'theory': 1.0, 'published': -2.0}
CAPS = {
  'uncapped': dict(meta_clip_norm=None, meta_max_ratio=None),
  'clip1': dict(meta_clip_norm=1.0, meta_max_ratio=None),
  **{f'rho{r:g}': dict(meta_clip_norm=None, meta_max_ratio=r) for r in (0.03, 0.1, 0.3, 1.0)},
}
PROJECTIONS = ('global', 'per_leaf')


@dataclasses.dataclass(frozen=True)
class Variant:
  """One optimizer: a builder, the options that define it and the refresh schedule."""

  name: str
  label: str
  kind: str
  options: tuple[tuple[str, Any], ...] = ()
  schedule: str = 'graph'  # 'python': refreshes picked on the host by f3eo_jax.jit_amortized
  tune_weight_decay: bool = False

  uses_obj_fn = property(lambda self: self.kind.startswith('f3eo'))
  has_weight_decay = property(lambda self: self.kind != 'sgd')
  hvp_every = property(lambda self: dict(self.options).get('hvp_every', 1))

  def with_options(self, schedule: str = 'graph', **options: Any) -> Variant:
    """A derived variant named ``'<name>+key=value[+python]'``."""
    suffix = ','.join(f'{k}={v}' for k, v in sorted(options.items()))
    suffix += '+python' if schedule == 'python' else ''
    merged = tuple(sorted({**dict(self.options), **options}.items()))
    label = f'{self.label}, {suffix.replace("+", ", ")}'
    name = f'{self.name}+{suffix}'
    return dataclasses.replace(self, name=name, label=label, options=merged, schedule=schedule)

  def candidates(self, lr_scale: float = 1.0) -> list[tuple[float, float | None]]:
    """The sweep's (learning rate, weight decay or None) pairs."""
    lrs = [lr * lr_scale for lr in (SGD_SWEEP if self.kind == 'sgd' else ADAM_SWEEP)]
    wds = WEIGHT_DECAY_SWEEP if self.tune_weight_decay else (None,)
    return [(lr, wd) for lr in lrs for wd in wds]

  def default_lr(self) -> float:
    return SGD_LR if self.kind == 'sgd' else ADAM_LR


def make_tx(variant: Variant, learning_rate: Any, weight_decay: Any = None):
  """The variant's Optax transformation (``learning_rate`` may be a schedule or traced)."""
  builder = BUILDERS[variant.kind]
  options = dict(variant.options)
  accepted = inspect.signature(builder).parameters
  if not set(options) <= set(accepted) and 'kw' not in accepted:  # sgd's and tests' **kw
    raise ValueError(f'{variant.name}: options {sorted(options)} not all accepted by {builder}')
  if variant.has_weight_decay:
    options['weight_decay'] = WEIGHT_DECAY if weight_decay is None else weight_decay
  elif weight_decay is not None:
    raise ValueError(f'{variant.name} has no weight decay; got {weight_decay}.')
  if variant.schedule == 'python' and variant.hvp_every == 1:
    raise ValueError(f'{variant.name}: the python schedule needs hvp_every > 1.')
  return builder(learning_rate, **options)


def _grid_variant(sign: str, cap: str, proj: str) -> Variant:
  options = dict(meta_coef=SIGNS[sign], projection=proj, **CAPS[cap])
  ratio = options['meta_max_ratio']
  label = f'F3EO {sign}, {cap if ratio is None else f"ρ={ratio:g}"}, {proj.replace("_", "-")}'
  return Variant(f'f3eo_{sign}_{cap}_{proj}', label, 'f3eo', tuple(sorted(options.items())))


_GRID = [_grid_variant(s, c, p) for s in SIGNS for c in CAPS for p in PROJECTIONS]
GRID = tuple(v.name for v in _GRID)
BASELINES = ('adamw', 'adamw_wd', 'sgd')
_DEFAULT = Variant('f3eo', 'F3EO (library default)', 'f3eo')
VARIANTS = {
  v.name: v
  for v in (
    _DEFAULT,
    dataclasses.replace(_DEFAULT.with_options(hvp_every=10), name='f3eo_hvp10'),
    dataclasses.replace(_DEFAULT.with_options('python', hvp_every=10), name='f3eo_hvp10_python'),
    Variant('f3eo_reference', 'F3EO (published rule)', 'f3eo_reference'),
    *_GRID,
    Variant('adamw', 'AdamW', 'adamw'),
    Variant('adamw_wd', 'AdamW (tuned weight decay)', 'adamw', tune_weight_decay=True),
    Variant('sgd', 'SGD, momentum 0.9', 'sgd'),
  )
}


def get(name: str | Variant) -> Variant:
  """The variant named ``name`` (a :class:`Variant` is returned as is)."""
  if isinstance(name, Variant) or name in VARIANTS:
    return VARIANTS.get(name, name)
  raise KeyError(f'unknown optimizer variant {name!r}; known: {sorted(VARIANTS)}')
