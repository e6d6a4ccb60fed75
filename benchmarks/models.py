"""Small Flax models: an MLP, a CNN, a CIFAR ResNet-18 and a GPT, all ``__call__(x, train)``;
BatchNorm statistics in ``'batch_stats'``, the CNN's dropout from the ``'dropout'`` stream."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax


def cross_entropy(logits: jax.Array, labels: jax.Array) -> jax.Array:
  """Mean softmax cross-entropy of integer ``labels`` under ``logits`` (any batch dims)."""
  return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()


class MLP(nn.Module):
  """Multi-layer perceptron on flattened inputs, ReLU (or ``activation``) between layers."""

  hidden: Sequence[int] = (512, 512)
  num_classes: int = 10
  activation: Callable[[jax.Array], jax.Array] = nn.relu

  @nn.compact
  def __call__(self, x, train: bool = False):
    x = x.reshape((x.shape[0], -1))
    for width in self.hidden:
      x = self.activation(nn.Dense(width)(x))
    return nn.Dense(self.num_classes)(x)


class CNN(nn.Module):
  """Conv → BatchNorm → ReLU → max-pool stages, then dense → dropout → logits.

  On 1-D signals ``(B, L[, C])`` (kernel 5) or images ``(B, H, W, C)`` (3×3 kernels).
  """

  num_classes: int = 10
  channels: Sequence[int] = (32, 64)
  dense: int = 128
  dropout_rate: float = 0.1

  @nn.compact
  def __call__(self, x, train: bool = False):
    if x.ndim == 2:
      x = x[..., None]
    spatial = x.ndim - 2
    kernel = (5,) if spatial == 1 else (3,) * spatial
    window = (2,) * spatial
    for width in self.channels:
      x = nn.Conv(width, kernel, padding='SAME', use_bias=False)(x)
      x = nn.BatchNorm(use_running_average=not train, momentum=0.9)(x)
      x = nn.relu(x)
      x = nn.max_pool(x, window, strides=window)
    x = x.reshape((x.shape[0], -1))
    x = nn.relu(nn.Dense(self.dense)(x))
    x = nn.Dropout(self.dropout_rate, deterministic=not train)(x)
    return nn.Dense(self.num_classes)(x)


class BasicBlock(nn.Module):
  """ResNet basic block: two 3×3 conv-BN layers with an identity or 1×1 shortcut."""

  width: int
  strides: int = 1

  @nn.compact
  def __call__(self, x, train: bool = False):
    norm = lambda: nn.BatchNorm(use_running_average=not train, momentum=0.9)
    y = nn.Conv(self.width, (3, 3), (self.strides, self.strides), padding=1, use_bias=False)(x)
    y = nn.relu(norm()(y))
    y = nn.Conv(self.width, (3, 3), padding=1, use_bias=False)(y)
    y = norm()(y)
    if self.strides != 1 or x.shape[-1] != self.width:
      x = nn.Conv(self.width, (1, 1), (self.strides, self.strides), use_bias=False)(x)
      x = norm()(x)
    return nn.relu(x + y)


class ResNet18(nn.Module):
  """ResNet-18 for 32×32 images (CIFAR variant: 3×3 stride-1 stem, no max-pool)."""

  num_classes: int = 10
  widths: Sequence[int] = (64, 128, 256, 512)

  @nn.compact
  def __call__(self, x, train: bool = False):
    x = nn.Conv(self.widths[0], (3, 3), padding=1, use_bias=False)(x)
    x = nn.relu(nn.BatchNorm(use_running_average=not train, momentum=0.9)(x))
    for stage, width in enumerate(self.widths):
      for block in range(2):
        strides = 2 if stage > 0 and block == 0 else 1
        x = BasicBlock(width, strides)(x, train)
    x = jnp.mean(x, axis=(1, 2))
    return nn.Dense(self.num_classes)(x)


class CausalSelfAttention(nn.Module):
  """Multi-head causal self-attention."""

  d_model: int
  n_head: int

  @nn.compact
  def __call__(self, x):
    batch, seq, _ = x.shape
    head_dim = self.d_model // self.n_head
    qkv = nn.Dense(3 * self.d_model)(x).reshape(batch, seq, 3, self.n_head, head_dim)
    q, k, v = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]
    scores = jnp.einsum('bqhd,bkhd->bhqk', q, k) / jnp.sqrt(head_dim).astype(x.dtype)
    mask = jnp.tril(jnp.ones((seq, seq), dtype=bool))
    scores = jnp.where(mask, scores, jnp.finfo(scores.dtype).min)
    attn = jax.nn.softmax(scores, axis=-1)
    y = jnp.einsum('bhqk,bkhd->bqhd', attn, v).reshape(batch, seq, self.d_model)
    return nn.Dense(self.d_model)(y)


class Block(nn.Module):
  """Pre-LayerNorm transformer block: attention and a 4× GELU MLP, both residual."""

  d_model: int
  n_head: int

  @nn.compact
  def __call__(self, x):
    x = x + CausalSelfAttention(self.d_model, self.n_head)(nn.LayerNorm()(x))
    h = nn.gelu(nn.Dense(4 * self.d_model)(nn.LayerNorm()(x)), approximate=False)
    return x + nn.Dense(self.d_model)(h)


class GPT(nn.Module):
  """Small causal transformer language model with learned positional embeddings."""

  vocab_size: int
  seq_len: int
  d_model: int = 128
  n_layer: int = 2
  n_head: int = 4

  @nn.compact
  def __call__(self, x, train: bool = False):
    seq = x.shape[1]
    tok = nn.Embed(self.vocab_size, self.d_model)(x)
    pos = self.param('pos_embedding', nn.initializers.normal(0.02), (self.seq_len, self.d_model))
    h = tok + pos[:seq]
    for _ in range(self.n_layer):
      h = Block(self.d_model, self.n_head)(h)
    h = nn.LayerNorm()(h)
    return nn.Dense(self.vocab_size)(h)
