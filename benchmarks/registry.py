"""The optimizer variants of every benchmark, in one registry.

Each :class:`Variant` is plain data: a name, a label for tables and plots, a ``build``
function, a default learning rate and the learning-rate sweep, whether it needs F3EO's
``obj_fn`` at update time, and the F3EO keyword arguments that define it. Every script in
``benchmarks/`` builds its optimizers through :func:`make`, which rejects any option the
variant would ignore, so a configuration can never silently mean something else.

The entries:

- ``f3eo``: the library's default, ``f3eo_jax.f3eo(lr, weight_decay=wd)`` with no meta
  options, so it follows whatever default the library ships.
- ``f3eo_reference``: the published PyTorch rule, ``f3eo_jax.f3eo_reference``.
- The study grid ``f3eo_{sign}_{cap}_{projection}``: sign ``theory`` (``meta_coef=+1``,
  descend on the Fisher-trace estimate) or ``published`` (``meta_coef=-2``, ascend);
  cap ``uncapped`` (no clip, no relative cap), ``clip1`` (``meta_clip_norm=1``) or
  ``rho{ρ}`` (``meta_max_ratio=ρ``, ``‖m⊥‖ ≤ ρ‖g‖``) for ρ in 0.03, 0.1, 0.3, 1;
  projection ``global`` or ``per_leaf``. Every grid entry passes ``meta_max_ratio``
  explicitly (``None`` or ρ), so none inherits the library's default cap.
- Baselines: ``adamw``; ``adamw_wd``, AdamW whose sweep also tunes the weight decay;
  ``sgd``, SGD with momentum 0.9 and no weight decay.

Example:
  >>> from benchmarks import registry
  >>> tx = registry.make('f3eo_theory_rho0.1_global', 3e-3, hvp_every=10)
  >>> registry.get('adamw').uses_obj_fn
  False
  >>> registry.make('adamw', 3e-3, hvp_every=10)
  Traceback (most recent call last):
  ...
  ValueError: variant 'adamw' does not accept option 'hvp_every' ...
"""

from __future__ import annotations

import dataclasses
import inspect
from collections.abc import Callable, Mapping
from typing import Any

import optax

import f3eo_jax

# The Adam family's weight decay when a caller gives none (SGD has no weight decay).
DEFAULT_WEIGHT_DECAY = 1e-4
ADAM_LEARNING_RATE, ADAM_SWEEP = 3e-3, (1e-3, 3e-3, 1e-2)
SGD_LEARNING_RATE, SGD_SWEEP = 3e-2, (1e-2, 3e-2, 1e-1)
# adamw_wd: its sweep is learning rate × weight decay.
WEIGHT_DECAY_SWEEP = (1e-4, 1e-2, 1e-1)

# The study grid's axes, in the order of the names.
SIGNS = {'theory': 1.0, 'published': -2.0}
CAPS = {
  'uncapped': dict(meta_clip_norm=None, meta_max_ratio=None),
  'clip1': dict(meta_clip_norm=1.0, meta_max_ratio=None),
  **{f'rho{rho:g}': dict(meta_clip_norm=None, meta_max_ratio=rho) for rho in (0.03, 0.1, 0.3, 1.0)},
}
PROJECTIONS = ('global', 'per_leaf')


@dataclasses.dataclass(frozen=True)
class Hyperparams:
  """One candidate of a sweep.

  Attributes:
    learning_rate: the peak learning rate.
    weight_decay: the weight decay, or ``None`` for the run's own (only the ``adamw_wd``
      sweep sets it).
  """

  learning_rate: float
  weight_decay: float | None = None

  def label(self) -> str:
    """``'lr=0.003'`` or ``'lr=0.003, wd=0.01'``."""
    wd = '' if self.weight_decay is None else f', wd={self.weight_decay:g}'
    return f'lr={self.learning_rate:g}{wd}'


@dataclasses.dataclass(frozen=True)
class Variant:
  """One optimizer, as data.

  Attributes:
    name: the registry key (derived variants: ``'<base>+hvp_every=10'``).
    label: a short human-readable name for tables and legends.
    build: ``build(learning_rate, weight_decay, **overrides) -> optax transform``; the
      learning rate may be a float, a schedule or a traced scalar, and so may the weight
      decay (``None`` for variants without weight decay).
    learning_rate: the default peak learning rate.
    sweep: the sweep's candidates: learning rates, or :class:`Hyperparams` that also carry
      a weight decay.
    uses_obj_fn: whether ``update`` needs ``obj_fn=`` (the F3EO family).
    options: the F3EO keyword arguments that define the variant (for labels and reports).
    accepts: the names of the overrides ``build`` understands (see :func:`make`).
    has_weight_decay: whether the variant has a (decoupled) weight decay.
  """

  name: str
  label: str
  build: Callable[..., optax.GradientTransformation]
  learning_rate: float
  sweep: tuple[float | Hyperparams, ...]
  uses_obj_fn: bool
  options: Mapping[str, Any] = dataclasses.field(default_factory=dict)
  accepts: frozenset[str] = frozenset()
  has_weight_decay: bool = True

  def __hash__(self) -> int:
    return hash((self.name, tuple(sorted((k, repr(v)) for k, v in self.options.items()))))

  def candidates(self, lr_scale: float = 1.0) -> tuple[Hyperparams, ...]:
    """The sweep as :class:`Hyperparams`, learning rates multiplied by ``lr_scale``."""
    out = []
    for c in self.sweep:
      c = c if isinstance(c, Hyperparams) else Hyperparams(float(c))
      out.append(dataclasses.replace(c, learning_rate=c.learning_rate * lr_scale))
    return tuple(out)

  def with_overrides(self, **overrides: Any) -> Variant:
    """A derived variant with ``overrides`` bound, named ``'<name>+key=value'``.

    Args:
      **overrides: options :func:`make` would accept for this variant.

    Returns:
      A :class:`Variant` (not registered) whose ``options`` include the overrides.
    """
    if not overrides:
      return self
    _check_overrides(self, overrides)
    suffix = ','.join(f'{k}={v}' for k, v in sorted(overrides.items()))
    return dataclasses.replace(
      self,
      name=f'{self.name}+{suffix}',
      label=f'{self.label}, {suffix}',
      build=_Bound(self.build, tuple(sorted(overrides.items()))),
      options={**self.options, **overrides},
      accepts=self.accepts - set(overrides),
    )


@dataclasses.dataclass(frozen=True)
class _Bound:
  """``build`` with ``overrides`` bound; equal (and hashed) by value, so two derivations of
  one variant share compiled steps."""

  build: Callable[..., optax.GradientTransformation]
  overrides: tuple[tuple[str, Any], ...]

  def __call__(self, learning_rate, weight_decay, **more):
    return self.build(learning_rate, weight_decay, **dict(self.overrides), **more)


def _keywords(fn: Callable[..., Any], *exclude: str) -> frozenset[str]:
  """The keyword-capable parameters of ``fn`` minus ``exclude``."""
  params = inspect.signature(fn).parameters.values()
  kinds = (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)
  return frozenset(p.name for p in params if p.kind in kinds) - set(exclude)


def _f3eo_build(**options: Any) -> Callable[..., optax.GradientTransformation]:
  """``f3eo_jax.f3eo`` with ``options`` fixed (an option the library lacks: ``TypeError``)."""

  def build(learning_rate, weight_decay, **overrides):
    return f3eo_jax.f3eo(learning_rate, weight_decay=weight_decay, **options, **overrides)

  return build


def _f3eo_variant(name: str, label: str, **options: Any) -> Variant:
  return Variant(
    name=name,
    label=label,
    build=_f3eo_build(**options),
    learning_rate=ADAM_LEARNING_RATE,
    sweep=ADAM_SWEEP,
    uses_obj_fn=True,
    options=options,
    accepts=_keywords(f3eo_jax.f3eo, 'learning_rate', 'weight_decay', *options),
  )


def _grid() -> list[Variant]:
  out = []
  for sign, meta_coef in SIGNS.items():
    for cap, cap_options in CAPS.items():
      for projection in PROJECTIONS:
        ratio = cap_options['meta_max_ratio']
        cap_label = cap if ratio is None else f'ρ={ratio:g}'
        out.append(
          _f3eo_variant(
            f'f3eo_{sign}_{cap}_{projection}',
            f'F3EO {sign}, {cap_label}, {projection.replace("_", "-")}',
            meta_coef=meta_coef,
            projection=projection,
            **cap_options,
          )
        )
  return out


def _reference(learning_rate, weight_decay, **overrides):
  return f3eo_jax.f3eo_reference(learning_rate, weight_decay=weight_decay, **overrides)


def _adamw(learning_rate, weight_decay, **overrides):
  return optax.adamw(learning_rate, weight_decay=weight_decay, **overrides)


def _sgd(learning_rate, weight_decay, **overrides):
  del weight_decay  # always None: make() rejects a weight decay for SGD
  return optax.sgd(learning_rate, momentum=0.9, **overrides)


def _all_variants() -> dict[str, Variant]:
  variants = [
    Variant(
      'f3eo',
      'F3EO (library default)',
      _f3eo_build(),
      ADAM_LEARNING_RATE,
      ADAM_SWEEP,
      True,
      accepts=_keywords(f3eo_jax.f3eo, 'learning_rate', 'weight_decay'),
    ),
    Variant(
      'f3eo_reference',
      'F3EO (published rule)',
      _reference,
      ADAM_LEARNING_RATE,
      ADAM_SWEEP,
      True,
      options=dict(meta_coef=-2.0, projection='per_leaf', meta_clip_norm=1.0),
      accepts=_keywords(f3eo_jax.f3eo_reference, 'learning_rate', 'weight_decay'),
    ),
    *_grid(),
    Variant(
      'adamw',
      'AdamW',
      _adamw,
      ADAM_LEARNING_RATE,
      ADAM_SWEEP,
      False,
      accepts=_keywords(optax.adamw, 'learning_rate', 'weight_decay'),
    ),
    Variant(
      'adamw_wd',
      'AdamW (tuned weight decay)',
      _adamw,
      ADAM_LEARNING_RATE,
      tuple(Hyperparams(lr, wd) for lr in ADAM_SWEEP for wd in WEIGHT_DECAY_SWEEP),
      False,
      accepts=_keywords(optax.adamw, 'learning_rate', 'weight_decay'),
    ),
    Variant(
      'sgd',
      'SGD, momentum 0.9',
      _sgd,
      SGD_LEARNING_RATE,
      SGD_SWEEP,
      False,
      accepts=_keywords(optax.sgd, 'learning_rate', 'momentum'),
      has_weight_decay=False,
    ),
  ]
  return {v.name: v for v in variants}


VARIANTS: dict[str, Variant] = _all_variants()
GRID: tuple[str, ...] = tuple(v.name for v in _grid())
BASELINES: tuple[str, ...] = ('adamw', 'adamw_wd', 'sgd')


def get(name: str | Variant) -> Variant:
  """The variant named ``name`` (a :class:`Variant` is returned as is).

  Raises:
    KeyError: for an unknown name, listing the known ones.
  """
  if isinstance(name, Variant):
    return name
  try:
    return VARIANTS[name]
  except KeyError:
    raise KeyError(f'unknown optimizer variant {name!r}; known: {sorted(VARIANTS)}') from None


def _check_overrides(variant: Variant, overrides: Mapping[str, Any]) -> None:
  for key in overrides:
    if key in variant.options:
      raise ValueError(
        f'option {key!r} defines variant {variant.name!r} ({key}={variant.options[key]!r});'
        ' choose the variant that has the value you want instead of overriding it.'
      )
    if key not in variant.accepts:
      raise ValueError(
        f'variant {variant.name!r} does not accept option {key!r} (it would be ignored);'
        f' it accepts {sorted(variant.accepts)}.'
      )


def make(
  name: str | Variant,
  learning_rate: optax.ScalarOrSchedule,
  *,
  weight_decay: Any = None,
  **overrides: Any,
) -> optax.GradientTransformation:
  """Builds the optimizer of variant ``name``.

  Args:
    name: a key of :data:`VARIANTS`, or a :class:`Variant` (e.g. from
      :meth:`Variant.with_overrides`).
    learning_rate: a float, an Optax schedule or a traced scalar.
    weight_decay: the decoupled weight decay (a float or a traced scalar); ``None`` gives
      :data:`DEFAULT_WEIGHT_DECAY` for variants with weight decay. Variants without one
      (``sgd``) reject any other value than ``None``.
    **overrides: further keyword arguments of the variant's optimizer, e.g.
      ``hvp_every=10`` or ``check_consistency=1e-4`` for the F3EO family.

  Returns:
    The Optax transformation. For ``uses_obj_fn`` variants, ``update`` needs ``obj_fn=``.

  Raises:
    ValueError: an override the variant does not accept (it would be ignored), one that
      would change an option that defines the variant, or a weight decay for a variant
      without one.
  """
  variant = get(name)
  _check_overrides(variant, overrides)
  if not variant.has_weight_decay:
    if weight_decay is not None:
      raise ValueError(
        f"variant {variant.name!r} does not accept option 'weight_decay' (it has no weight"
        ' decay); pass weight_decay=None.'
      )
    return variant.build(learning_rate, None, **overrides)
  if weight_decay is None:
    weight_decay = DEFAULT_WEIGHT_DECAY
  return variant.build(learning_rate, weight_decay, **overrides)
