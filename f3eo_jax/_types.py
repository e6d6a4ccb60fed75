"""Type aliases shared by the library's modules."""

from __future__ import annotations

from collections.abc import Callable, Hashable
from typing import Any, Literal, TypeAlias

import jax

PyTree: TypeAlias = Any
"""A JAX pytree (nested dicts, lists, tuples and NamedTuples of arrays)."""

ObjFn: TypeAlias = Callable[[PyTree], jax.Array]
"""The loss as a function of the parameters alone, returning a scalar."""

HvpFn: TypeAlias = Callable[[PyTree], PyTree]
"""A linear map ``v ↦ H·v`` on pytrees shaped like the parameters."""

MaskOrFn: TypeAlias = Any
"""A pytree of bools like the parameters (or a prefix of it), a function of the
parameters returning one, or ``None``."""

Projection: TypeAlias = Literal['global', 'per_leaf']
"""How the meta term is made orthogonal to ``g`` (over the whole pytree, or per array)."""

ScalarLike: TypeAlias = jax.typing.ArrayLike
"""A Python number or a scalar array (``optax.inject_hyperparams`` passes arrays)."""

AxisName: TypeAlias = Hashable
"""A mapped axis name of ``shard_map``/``pmap``, or a tuple of them."""
