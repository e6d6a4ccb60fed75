"""PyTorch twins of :mod:`benchmarks.models` (same shapes and parameter counts, not the same
weights), taking the Flax layout: channels last; the modules transpose internally."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import nn
from torch.nn import functional as F


class MLP(nn.Module):
  """Flattened input → ReLU hidden layers → logits."""

  def __init__(self, in_features: int, hidden: Sequence[int] = (512, 512), num_classes: int = 10):
    super().__init__()
    widths = [in_features, *hidden]
    self.hidden = nn.ModuleList(nn.Linear(a, b) for a, b in zip(widths[:-1], widths[1:]))
    self.out = nn.Linear(widths[-1], num_classes)

  def forward(self, x):
    x = x.reshape(x.shape[0], -1)
    for layer in self.hidden:
      x = F.relu(layer(x))
    return self.out(x)


class CNN(nn.Module):
  """Conv → BatchNorm → ReLU → max-pool stages, dense → dropout → logits.

  ``input_shape``: one example's shape, ``(L,)``, ``(L, C)`` or ``(H, W, C)``.
  """

  def __init__(self, input_shape, num_classes=10, channels=(32, 64), dense=128, dropout_rate=0.1):
    super().__init__()
    shape = list(input_shape)
    if len(shape) == 1:
      shape.append(1)
    spatial, in_ch = shape[:-1], shape[-1]
    one_d = len(spatial) == 1
    layers = ((nn.Conv2d, nn.BatchNorm2d, nn.MaxPool2d), (nn.Conv1d, nn.BatchNorm1d, nn.MaxPool1d))
    conv, norm, pool = layers[one_d]
    kernel = 5 if len(spatial) == 1 else 3
    stages = []
    for width in channels:
      stages += [conv(in_ch, width, kernel, padding=kernel // 2, bias=False), norm(width)]
      stages += [nn.ReLU(), pool(2)]
      in_ch = width
      spatial = [s // 2 for s in spatial]
    self.features = nn.Sequential(*stages)
    self.hidden = nn.Linear(in_ch * math.prod(spatial), dense)
    self.dropout = nn.Dropout(dropout_rate)
    self.out = nn.Linear(dense, num_classes)

  def forward(self, x):
    if x.dim() == 2:
      x = x[..., None]
    x = self.features(x.movedim(-1, 1))
    x = F.relu(self.hidden(x.flatten(1)))
    return self.out(self.dropout(x))


class BasicBlock(nn.Module):
  """Two 3×3 conv-BN layers with an identity or 1×1 conv-BN shortcut."""

  def __init__(self, in_ch: int, width: int, stride: int = 1):
    super().__init__()
    self.conv1 = nn.Conv2d(in_ch, width, 3, stride, 1, bias=False)
    self.bn1 = nn.BatchNorm2d(width)
    self.conv2 = nn.Conv2d(width, width, 3, 1, 1, bias=False)
    self.bn2 = nn.BatchNorm2d(width)
    self.shortcut = nn.Sequential()
    if stride != 1 or in_ch != width:
      self.shortcut = nn.Sequential(
        nn.Conv2d(in_ch, width, 1, stride, bias=False), nn.BatchNorm2d(width)
      )

  def forward(self, x):
    y = F.relu(self.bn1(self.conv1(x)))
    y = self.bn2(self.conv2(y))
    return F.relu(self.shortcut(x) + y)


class ResNet18(nn.Module):
  """CIFAR ResNet-18: 3×3 stride-1 stem, no max-pool, [2, 2, 2, 2] basic blocks."""

  def __init__(self, num_classes=10, widths: Sequence[int] = (64, 128, 256, 512), in_channels=3):
    super().__init__()
    self.stem = nn.Sequential(
      nn.Conv2d(in_channels, widths[0], 3, 1, 1, bias=False), nn.BatchNorm2d(widths[0]), nn.ReLU()
    )
    blocks, in_ch = [], widths[0]
    for stage, width in enumerate(widths):
      for block in range(2):
        blocks.append(BasicBlock(in_ch, width, 2 if stage > 0 and block == 0 else 1))
        in_ch = width
    self.blocks = nn.Sequential(*blocks)
    self.out = nn.Linear(in_ch, num_classes)

  def forward(self, x):
    x = self.blocks(self.stem(x.movedim(-1, 1)))
    return self.out(x.mean(dim=(2, 3)))


class Block(nn.Module):
  """Pre-LayerNorm transformer block: causal attention and a 4× GELU MLP."""

  def __init__(self, d_model: int, n_head: int):
    super().__init__()
    self.n_head = n_head
    self.ln1 = nn.LayerNorm(d_model, eps=1e-6)
    self.qkv = nn.Linear(d_model, 3 * d_model)
    self.proj = nn.Linear(d_model, d_model)
    self.ln2 = nn.LayerNorm(d_model, eps=1e-6)
    self.fc = nn.Linear(d_model, 4 * d_model)
    self.fc_out = nn.Linear(4 * d_model, d_model)

  def forward(self, x):
    batch, seq, d = x.shape
    qkv = self.qkv(self.ln1(x)).reshape(batch, seq, 3, self.n_head, d // self.n_head)
    q, k, v = (qkv[:, :, i].transpose(1, 2) for i in range(3))
    # Math attention, not the fused kernel: the fused one has no double backward.
    scores = q @ k.transpose(-1, -2) / math.sqrt(d // self.n_head)
    mask = torch.ones(seq, seq, dtype=torch.bool, device=x.device).tril()
    attn = scores.masked_fill(~mask, torch.finfo(scores.dtype).min).softmax(-1)
    y = (attn @ v).transpose(1, 2).reshape(batch, seq, d)
    x = x + self.proj(y)
    return x + self.fc_out(F.gelu(self.fc(self.ln2(x))))


class GPT(nn.Module):
  """Small causal transformer LM with learned positional embeddings; returns logits."""

  def __init__(self, vocab_size: int, seq_len: int, d_model=128, n_layer=2, n_head=4):
    super().__init__()
    self.tok = nn.Embedding(vocab_size, d_model)
    self.pos = nn.Parameter(torch.randn(seq_len, d_model) * 0.02)
    self.blocks = nn.ModuleList(Block(d_model, n_head) for _ in range(n_layer))
    self.ln = nn.LayerNorm(d_model, eps=1e-6)
    self.out = nn.Linear(d_model, vocab_size)

  def forward(self, x):
    h = self.tok(x) + self.pos[: x.shape[1]]
    for block in self.blocks:
      h = block(h)
    return self.out(self.ln(h))
