"""scale_by_amsgrad_torch's state type, and its deprecated name."""

from __future__ import annotations

import jax.numpy as jnp
import optax
import pytest

import f3eo_jax


def test_state_is_torch_amsgrad_state_not_optax_s():
  state = f3eo_jax.scale_by_amsgrad_torch().init({'w': jnp.zeros(2)})

  assert isinstance(state, f3eo_jax.TorchAmsgradState)
  assert f3eo_jax.TorchAmsgradState is not optax.ScaleByAmsgradState


def test_old_state_name_still_works_and_warns():
  with pytest.warns(DeprecationWarning, match='TorchAmsgradState'):
    old = f3eo_jax.ScaleByAmsgradState

  assert old is f3eo_jax.TorchAmsgradState


def test_unknown_attribute_raises_attribute_error():
  with pytest.raises(AttributeError, match='no attribute'):
    f3eo_jax.NoSuchName  # noqa: B018
