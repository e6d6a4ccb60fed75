"""Step-for-step parity of f3eo_jax with an independent PyTorch implementation.

The torch side, ``benchmarks/torch_f3eo.py``, is written from the algorithm's definition
and imports nothing from ``f3eo_jax``: ``H·g`` by double backward
(``create_graph=True``), the clip, the orthogonal projection, the relative cap, and the
AdamW step written by hand. Both frameworks run in float64 on the same models, from
the same initial weights (drawn in numpy and converted between layouts), on the same
fixed sequence of minibatches (a different batch at every step).

Rules compared:

- ``reference``: the published PyTorch rule: ``meta = ∇‖g‖² = 2·H·g``, its global
  norm clipped to 1 (``m ← m·min(1, 1/(‖m‖ + 1e-6))``), projected per tensor against
  that tensor's gradient, ``e = g − m⊥``; against ``f3eo_jax.f3eo_reference`` (also
  with ``amsgrad=True``).
- ``theory``: ``e = g + (H·g)⊥`` (``H·g = ∇½‖g‖²``) with the projection over all
  parameters as one vector, no clip and no cap; against ``f3eo_jax.f3eo(...,
  meta_max_ratio=None)``.
- ``theory-capped`` and ``theory-per-leaf-capped``: the theory rule with the relative
  cap ``m⊥ ← m⊥·min(1, ρ‖g‖/‖m⊥‖)`` at ``ρ = CAP``, global and per tensor; against
  ``f3eo_jax.f3eo(..., meta_max_ratio=CAP)``. ``CAP`` is chosen so that the cap binds
  on some steps and not on others.

Models: an MLP (tanh and ReLU), a small CNN (conv, max-pool, conv, dense; torch
NCHW/OIHW against JAX NHWC/HWIO) and an MLP with bias-free layers and a frozen
parameter group.

What "frozen" means here (both sides): the frozen group is frozen *out of the
meta-gradient*, not out of training. It is the JAX ``meta_mask=False`` group: it gets
plain ``g`` as its effective gradient (still through Adam and weight decay), it
is excluded from the Hessian-vector product's tangent, and it takes no part in
the clip norm, the projection or the cap. On the torch side the meta objective is
``½‖g_M‖²`` over the masked-in group ``M`` only, differentiated with respect to ``M``
only; this gives ``H_MM·g_M``, which is what a zero tangent outside ``M`` followed by
restricting the product to ``M`` gives in JAX.

Tolerance, stated once: for every parameter tensor ``p``,
``max|p_jax − p_torch| / max|p_torch| ≤ 1e-8`` (the per-tensor max-norm relative
error; see :func:`_max_relative_error`), after 50 steps with weight decay 1e-2.
The same metric bounds the effective gradient ``e``: 1e-11 on the first step, 1e-8
on every step. Measured: at most 1.9e-15 for the params and 8.8e-15 for ``e``.
For scale, a float32 bias correction in AMSGrad gives ~3e-6 and a clip epsilon of
0 instead of 1e-6 gives 6e-8 to 2.5e-7: both fail here.

Every (model, rule) test is self-contained (one jit compile), so ``pytest -n 2``
spreads them without repeating work.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable

import numpy as np
import pytest

torch = pytest.importorskip('torch', reason='the parity tests need torch==2.13.0 (the test extra)')
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import optax  # noqa: E402
import torch.nn.functional as F  # noqa: E402

import f3eo_jax  # noqa: E402
from benchmarks import torch_f3eo  # noqa: E402

NUM_STEPS = 50
BATCH_SIZE = 16
LEARNING_RATE = 1e-2
WEIGHT_DECAY = 1e-2
BETAS = (0.9, 0.999)
EPS = 1e-8
CLIP_NORM = 1.0  # the published rule's clip (torch_f3eo.REFERENCE)
CAP = 0.6  # relative cap: binds on 7 to 49 of the 50 steps, by model and projection
TRAJECTORY_RTOL = 1e-8  # per tensor, max|Δ| / max|p_torch|, after NUM_STEPS steps
EFFECTIVE_GRAD_RTOL = 1e-11  # per tensor, max|Δe| / max|e_torch|, on the first step
NONTRIVIAL_RTOL = 1e-4  # F3EO must move the parameters this far from plain AdamW


@pytest.fixture(scope='module', autouse=True)
def _float64_everywhere():
  """float64 in JAX (restored afterwards) and one torch thread (tiny models)."""
  previous_x64 = jax.config.jax_enable_x64
  previous_threads = torch.get_num_threads()
  jax.config.update('jax_enable_x64', True)
  torch.set_num_threads(1)
  try:
    yield
  finally:
    jax.config.update('jax_enable_x64', previous_x64)
    torch.set_num_threads(previous_threads)


# --------------------------------------------------------------------------------------
# Models. Canonical weights are numpy float64 in torch layout; `to_jax` converts a
# whole parameter dict to the JAX layout and `to_torch_layout` converts back.
# --------------------------------------------------------------------------------------


def _dense_to_jax(w):  # torch Linear (out, in) -> JAX kernel (in, out)
  return w.T


def _dense_to_torch(k):
  return k.T


def _conv_to_jax(w):  # OIHW -> HWIO
  return w.transpose(2, 3, 1, 0)


def _conv_to_torch(k):  # HWIO -> OIHW
  return k.transpose(3, 2, 0, 1)


def _flat_dense_to_jax(chw):
  """A Linear after a flatten: torch flattens (C, H, W), JAX here (H, W, C)."""
  c, h, w = chw

  def to_jax(weight):  # (out, C*H*W) -> (H*W*C, out)
    out = weight.shape[0]
    return weight.reshape(out, c, h, w).transpose(2, 3, 1, 0).reshape(h * w * c, out)

  def to_torch(kernel):  # (H*W*C, out) -> (out, C*H*W)
    out = kernel.shape[1]
    return kernel.reshape(h, w, c, out).transpose(3, 2, 0, 1).reshape(out, c * h * w)

  return to_jax, to_torch


def _identity(x):
  return x


@dataclasses.dataclass(frozen=True)
class Model:
  """One model in both frameworks, with weights and data in numpy float64."""

  name: str
  init: Callable[[np.random.Generator], dict[str, np.ndarray]]  # torch layout
  converters: dict[str, tuple[Callable, Callable]]  # name -> (to_jax, to_torch)
  jax_logits: Callable  # (jax params, jax inputs) -> logits
  torch_logits: Callable  # (torch params, torch inputs) -> logits
  input_shape: tuple[int, ...]  # one torch-layout example
  inputs_to_jax: Callable[[np.ndarray], np.ndarray]
  num_classes: int
  meta_mask: dict[str, bool] | None = None  # None: every parameter gets the meta term

  def to_jax(self, params):
    return {k: jnp.asarray(self.converters[k][0](v)) for k, v in params.items()}

  def to_torch_layout(self, jax_params):
    return {k: self.converters[k][1](np.asarray(v)) for k, v in jax_params.items()}

  def meta_names(self):
    names = list(self.converters)
    return names if self.meta_mask is None else [n for n in names if self.meta_mask[n]]


def _normal(rng, shape, scale):
  return rng.normal(0.0, scale, size=shape)


def _dense_init(rng, fan_in, fan_out, gain=0.75):
  return _normal(rng, (fan_out, fan_in), gain / math.sqrt(fan_in))


# (a) MLP: dense -> tanh -> dense -> relu -> dense.
def _mlp_init(rng):
  return {
    'w1': _dense_init(rng, 8, 16),
    'b1': _normal(rng, (16,), 0.1),
    'w2': _dense_init(rng, 16, 12),
    'b2': _normal(rng, (12,), 0.1),
    'w3': _dense_init(rng, 12, 4),
    'b3': _normal(rng, (4,), 0.1),
  }


def _mlp_jax(p, x):
  h = jnp.tanh(x @ p['w1'] + p['b1'])
  h = jax.nn.relu(h @ p['w2'] + p['b2'])
  return h @ p['w3'] + p['b3']


def _mlp_torch(p, x):
  h = torch.tanh(F.linear(x, p['w1'], p['b1']))
  h = torch.relu(F.linear(h, p['w2'], p['b2']))
  return F.linear(h, p['w3'], p['b3'])


_DENSE = (_dense_to_jax, _dense_to_torch)
_VECTOR = (_identity, _identity)
_CONV = (_conv_to_jax, _conv_to_torch)

MLP = Model(
  name='mlp',
  init=_mlp_init,
  converters={
    'w1': _DENSE,
    'b1': _VECTOR,
    'w2': _DENSE,
    'b2': _VECTOR,
    'w3': _DENSE,
    'b3': _VECTOR,
  },
  jax_logits=_mlp_jax,
  torch_logits=_mlp_torch,
  input_shape=(8,),
  inputs_to_jax=_identity,
  num_classes=4,
)


# (b) CNN on 1x8x8 images: conv3x3(pad 1) -> tanh -> maxpool2 -> conv3x3(valid) -> tanh
#     -> flatten (6x2x2) -> dense.
def _cnn_init(rng):
  return {
    'conv1_w': _normal(rng, (4, 1, 3, 3), 0.75 / 3.0),
    'conv1_b': _normal(rng, (4,), 0.1),
    'conv2_w': _normal(rng, (6, 4, 3, 3), 0.75 / 6.0),
    'conv2_b': _normal(rng, (6,), 0.1),
    'dense_w': _dense_init(rng, 24, 3),
    'dense_b': _normal(rng, (3,), 0.1),
  }


def _cnn_jax(p, x):  # x: NHWC
  dims = ('NHWC', 'HWIO', 'NHWC')
  h = jax.lax.conv_general_dilated(
    x, p['conv1_w'], (1, 1), ((1, 1), (1, 1)), dimension_numbers=dims
  )
  h = jnp.tanh(h + p['conv1_b'])
  h = jax.lax.reduce_window(h, -jnp.inf, jax.lax.max, (1, 2, 2, 1), (1, 2, 2, 1), 'VALID')
  h = jax.lax.conv_general_dilated(h, p['conv2_w'], (1, 1), 'VALID', dimension_numbers=dims)
  h = jnp.tanh(h + p['conv2_b'])
  return h.reshape(h.shape[0], -1) @ p['dense_w'] + p['dense_b']


def _cnn_torch(p, x):  # x: NCHW
  h = torch.tanh(F.conv2d(x, p['conv1_w'], p['conv1_b'], padding=1))
  h = F.max_pool2d(h, 2)
  h = torch.tanh(F.conv2d(h, p['conv2_w'], p['conv2_b']))
  return F.linear(h.flatten(1), p['dense_w'], p['dense_b'])


CNN = Model(
  name='cnn',
  init=_cnn_init,
  converters={
    'conv1_w': _CONV,
    'conv1_b': _VECTOR,
    'conv2_w': _CONV,
    'conv2_b': _VECTOR,
    'dense_w': _flat_dense_to_jax((6, 2, 2)),
    'dense_b': _VECTOR,
  },
  jax_logits=_cnn_jax,
  torch_logits=_cnn_torch,
  input_shape=(1, 8, 8),
  inputs_to_jax=lambda x: x.transpose(0, 2, 3, 1),
  num_classes=3,
)


# (c) Bias-free dense -> tanh -> dense with bias (the frozen group) -> tanh -> bias-free
#     dense.
def _masked_init(rng):
  return {
    'w1': _dense_init(rng, 6, 10),
    'w2': _dense_init(rng, 10, 10),
    'b2': _normal(rng, (10,), 0.1),
    'w3': _dense_init(rng, 10, 3),
  }


def _masked_jax(p, x):
  h = jnp.tanh(x @ p['w1'])
  h = jnp.tanh(h @ p['w2'] + p['b2'])
  return h @ p['w3']


def _masked_torch(p, x):
  h = torch.tanh(F.linear(x, p['w1']))
  h = torch.tanh(F.linear(h, p['w2'], p['b2']))
  return F.linear(h, p['w3'])


MASKED = Model(
  name='bias_free_frozen_group',
  init=_masked_init,
  converters={'w1': _DENSE, 'w2': _DENSE, 'b2': _VECTOR, 'w3': _DENSE},
  jax_logits=_masked_jax,
  torch_logits=_masked_torch,
  input_shape=(6,),
  inputs_to_jax=_identity,
  num_classes=3,
  meta_mask={'w1': True, 'w2': False, 'b2': False, 'w3': True},
)

MODELS = [MLP, CNN, MASKED]


def _batches(model: Model, seed: int = 0):
  """NUM_STEPS minibatches (torch layout), labelled by a random linear teacher."""
  rng = np.random.default_rng(seed + 1)
  dim = int(np.prod(model.input_shape))
  teacher = rng.normal(size=(dim, model.num_classes))
  out = []
  for _ in range(NUM_STEPS):
    x = rng.normal(0.0, 1.5, size=(BATCH_SIZE, *model.input_shape))
    noise = rng.normal(size=(BATCH_SIZE, model.num_classes))
    y = np.argmax(x.reshape(BATCH_SIZE, dim) @ teacher + noise, axis=1)
    out.append((x, y))
  return out


def _initial_params(model: Model, seed: int = 0):
  return model.init(np.random.default_rng(seed))


# --------------------------------------------------------------------------------------
# The torch side: benchmarks/torch_f3eo.py, which imports nothing from f3eo_jax.
# --------------------------------------------------------------------------------------


def _torch_params(model, params_np):
  return [
    torch.tensor(params_np[k], dtype=torch.float64, requires_grad=True) for k in model.converters
  ]


def _torch_loss(model, params, x, y):
  named = dict(zip(model.converters, params))
  logits = model.torch_logits(named, torch.tensor(x, dtype=torch.float64))
  return F.cross_entropy(logits, torch.tensor(y, dtype=torch.int64))


# The runs compared: name -> (rule, amsgrad).
RUNS = {
  'reference': (torch_f3eo.REFERENCE, False),
  'reference-amsgrad': (torch_f3eo.REFERENCE, True),
  'theory': (torch_f3eo.THEORY, False),
  'theory-capped': (torch_f3eo.Rule(max_ratio=CAP), False),
  'theory-per-leaf-capped': (torch_f3eo.Rule(projection='per_leaf', max_ratio=CAP), False),
}


@dataclasses.dataclass
class Trajectory:
  """What one training run leaves behind, all numpy float64 in torch layout."""

  params: dict[str, np.ndarray]  # after NUM_STEPS steps
  effective_grads: list[dict[str, np.ndarray]]  # e of every step, at that step's params
  hg_norms: np.ndarray  # ‖H·g‖ (masked-in group) of every step, before coef and clip
  cap_scales: np.ndarray  # the relative cap's factor on every step (1: did not bind)


def run_torch(model, run):
  """Trains with the torch rule of ``RUNS[run]``; ``'adamw'``/``'adamw-amsgrad'``: e = g."""
  if run in RUNS:
    rule, amsgrad = RUNS[run]
  else:  # the non-triviality baselines: e = g
    rule, amsgrad = None, run == 'adamw-amsgrad'
  params = _torch_params(model, _initial_params(model))
  in_meta = [model.meta_mask is None or model.meta_mask[k] for k in model.converters]
  opt = torch_f3eo.AdamW(params, LEARNING_RATE, BETAS, EPS, WEIGHT_DECAY, amsgrad=amsgrad)
  effective_grads, hg_norms, cap_scales = [], [], []
  for x, y in _batches(model):
    loss = _torch_loss(model, params, x, y)
    if rule is None:
      e = [g.detach() for g in torch.autograd.grad(loss, params)]
    else:
      out = torch_f3eo.effective_gradient(loss, params, in_meta, rule=rule)
      e = out.e
      hg_norms.append(float(out.hg_norm))
      cap_scales.append(float(out.cap_scale))
    effective_grads.append({k: t.numpy().copy() for k, t in zip(model.converters, e)})
    opt.step(e)
  final = {k: p.detach().numpy().copy() for k, p in zip(model.converters, params)}
  return Trajectory(final, effective_grads, np.array(hg_norms), np.array(cap_scales))


# --------------------------------------------------------------------------------------
# The JAX side: the library under test.
# --------------------------------------------------------------------------------------


def _jax_loss(model, params, x, y):
  logits = model.jax_logits(params, x)
  return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()


def _jax_mask(model):
  return None if model.meta_mask is None else dict(model.meta_mask)


def _jax_meta_transform(model, rule):
  return f3eo_jax.add_meta_gradient(
    rule.meta_coef,
    projection=rule.projection,
    meta_clip_norm=rule.clip_norm,
    meta_max_ratio=rule.max_ratio,
    meta_mask=_jax_mask(model),
  )


def _jax_optimizer(model, rule, amsgrad):
  b1, b2 = BETAS
  if rule == torch_f3eo.REFERENCE:
    return f3eo_jax.f3eo_reference(
      LEARNING_RATE, b1, b2, EPS, WEIGHT_DECAY, amsgrad=amsgrad, meta_mask=_jax_mask(model)
    )
  assert not amsgrad and rule.clip_norm is None, 'f3eo: no amsgrad; the clip is not tested here'
  return f3eo_jax.f3eo(
    LEARNING_RATE,
    b1,
    b2,
    EPS,
    WEIGHT_DECAY,
    meta_coef=rule.meta_coef,
    projection=rule.projection,
    meta_max_ratio=rule.max_ratio,
    meta_mask=_jax_mask(model),
  )


def run_jax(model, run):
  """Trains with the library's optimizer for ``RUNS[run]``, one jitted step.

  Each step also evaluates a fresh ``add_meta_gradient(...).update``, configured as
  the optimizer's first transform, on the current params and batch: its output is
  the effective gradient ``e`` that the Adam step receives.
  """
  rule, amsgrad = RUNS[run]
  tx = _jax_optimizer(model, rule, amsgrad)
  meta = _jax_meta_transform(model, rule)

  @jax.jit
  def step(params, state, x, y):
    obj_fn = lambda p: _jax_loss(model, p, x, y)
    grads = jax.grad(obj_fn)(params)
    e, _ = meta.update(grads, meta.init(params), params, obj_fn=obj_fn)
    updates, state = tx.update(grads, state, params, obj_fn=obj_fn)
    diagnostics = f3eo_jax.diagnostics(state)
    return optax.apply_updates(params, updates), state, e, diagnostics

  params = model.to_jax(_initial_params(model))
  state = tx.init(params)
  effective_grads, hg_norms, cap_scales = [], [], []
  for x, y in _batches(model):
    params, state, e, diagnostics = step(
      params, state, jnp.asarray(model.inputs_to_jax(x)), jnp.asarray(y)
    )
    effective_grads.append(model.to_torch_layout(e))
    hg_norms.append(float(diagnostics['hg_norm']))
    cap_scales.append(float(diagnostics['cap_scale']))
  return Trajectory(
    model.to_torch_layout(params), effective_grads, np.array(hg_norms), np.array(cap_scales)
  )


def _max_relative_error(actual, expected):
  """Per tensor: max|actual − expected| / max|expected|; returns {name: error}."""
  errors = {}
  for name, want in expected.items():
    scale = np.max(np.abs(want))
    assert scale > 0, name
    errors[name] = float(np.max(np.abs(np.asarray(actual[name]) - want)) / scale)
  return errors


MODELS_BY_NAME = {m.name: m for m in MODELS}
ALL_RUNS = [pytest.param(m.name, run, id=f'{m.name}-{run}') for m in MODELS for run in RUNS]


# --------------------------------------------------------------------------------------
# Tests.
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize('amsgrad', [False, True], ids=['adamw', 'amsgrad'])
def test_hand_written_torch_adamw_equals_torch_optim_adamw(amsgrad):
  """Sanity check of the torch side: AdamW by hand equals torch.optim.AdamW on g."""
  model = MLP
  ours = _torch_params(model, _initial_params(model))
  theirs = _torch_params(model, _initial_params(model))
  hand = torch_f3eo.AdamW(ours, LEARNING_RATE, BETAS, EPS, WEIGHT_DECAY, amsgrad=amsgrad)
  hyper = dict(lr=LEARNING_RATE, betas=BETAS, eps=EPS, weight_decay=WEIGHT_DECAY, amsgrad=amsgrad)
  builtin = torch.optim.AdamW(theirs, **hyper, foreach=False)
  for x, y in _batches(model)[:20]:
    hand.step([g.detach() for g in torch.autograd.grad(_torch_loss(model, ours, x, y), ours)])
    builtin.zero_grad()
    _torch_loss(model, theirs, x, y).backward()
    builtin.step()
  for a, b in zip(ours, theirs):
    np.testing.assert_allclose(a.detach().numpy(), b.detach().numpy(), rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize('model', MODELS, ids=lambda m: m.name)
def test_torch_meta_gradient_is_a_dense_hessian_vector_product(model):
  """Sanity check of the torch side: double backward equals H·g from a dense Hessian.

  Uses ``torch.autograd.functional.hessian`` of the loss as a function of all
  parameters raveled into one vector, restricted to the masked-in block; checks
  ``∇‖g_M‖² = 2·H·g`` by double backward, and the twin's theory-rule ``e = g + (H·g)⊥``
  and ``‖H·g‖`` against the dense product projected in numpy.
  """
  params_np = _initial_params(model)
  x, y = _batches(model)[0]
  names = list(model.converters)
  shapes = [params_np[k].shape for k in names]
  sizes = [int(np.prod(s)) for s in shapes]
  flat0 = torch.tensor(np.concatenate([params_np[k].ravel() for k in names]), dtype=torch.float64)

  def flat_loss(flat):
    parts = torch.split(flat, sizes)
    return _torch_loss(model, [t.reshape(s) for t, s in zip(parts, shapes)], x, y)

  hess = torch.autograd.functional.hessian(flat_loss, flat0)
  in_meta = [model.meta_mask is None or model.meta_mask[k] for k in names]
  keep = torch.cat([torch.full((n,), k, dtype=torch.bool) for k, n in zip(in_meta, sizes)])
  flat = flat0.clone().requires_grad_(True)
  g = torch.autograd.grad(flat_loss(flat), flat)[0].detach()
  zeros = torch.zeros_like(g)
  hg_dense = torch.where(keep, hess @ torch.where(keep, g, zeros), zeros)

  params = _torch_params(model, params_np)
  grads = torch.autograd.grad(_torch_loss(model, params, x, y), params, create_graph=True)
  sq = sum((gr * gr).sum() for gr, k in zip(grads, in_meta) if k)
  two_hg = iter(torch.autograd.grad(sq, [p for p, k in zip(params, in_meta) if k]))
  two_hg_flat = torch.cat(
    [
      next(two_hg).ravel() if k else torch.zeros(n, dtype=torch.float64)
      for k, n in zip(in_meta, sizes)
    ]
  )
  assert float(hg_dense.norm()) > 1e-3
  np.testing.assert_allclose(two_hg_flat.numpy(), 2.0 * hg_dense.numpy(), rtol=1e-10, atol=1e-13)

  out = torch_f3eo.effective_gradient(
    _torch_loss(model, params, x, y), params, in_meta, rule=torch_f3eo.THEORY
  )
  g_m, hg_m = np.where(keep, g, 0.0), hg_dense.numpy()
  e_dense = g.numpy() + hg_m - (hg_m @ g_m) / (g_m @ g_m) * g_m
  e_flat = torch.cat([t.ravel() for t in out.e]).numpy()
  np.testing.assert_allclose(e_flat, e_dense, rtol=1e-10, atol=1e-13)
  np.testing.assert_allclose(float(out.hg_norm), np.linalg.norm(hg_m), rtol=1e-10)


@pytest.mark.parametrize('model_name, run', ALL_RUNS)
def test_f3eo_matches_torch_step_for_step(model_name, run):
  """The library's optimizer retraces torch's, step for step, for NUM_STEPS steps.

  Asserts, in this order:

  1. the first step's effective gradient, ``add_meta_gradient(...).update`` against
     torch's double-backward ``e``: within 1e-11 per tensor; on the torch side ``e``
     differs from ``g`` on the meta group and equals ``g`` on a frozen one;
  2. ``e`` on every later step (each side at its own, matching params): 1e-8;
  3. every parameter after NUM_STEPS steps with weight decay: 1e-8;
  4. the library's float32 ‖H·g‖ diagnostic tracks torch's on every step;
  5. the parity is not trivial: every tensor ends more than 100× the tolerance,
     and some tensor more than 1e-4, away from plain AdamW (same amsgrad flag);
  6. reference runs: ‖2·H·g‖ > 1 on some steps and < 1 on others, so both
     branches of ``min(1, 1/(‖m‖ + 1e-6))`` are on the compared trajectory;
  7. capped runs: the cap binds on some steps and not on others, and with the global
     projection the library's ``cap_scale`` diagnostic is torch's factor.
  """
  model = MODELS_BY_NAME[model_name]
  rule, amsgrad = RUNS[run]
  expected = run_torch(model, run)
  baseline = run_torch(model, 'adamw-amsgrad' if amsgrad else 'adamw')
  actual = run_jax(model, run)

  first = _max_relative_error(actual.effective_grads[0], expected.effective_grads[0])
  assert max(first.values()) <= EFFECTIVE_GRAD_RTOL, ('first-step e', first)
  plain_g = baseline.effective_grads[0]  # the same params and batch on step 1
  for name, e_k in expected.effective_grads[0].items():
    moved = np.max(np.abs(e_k - plain_g[name])) / np.max(np.abs(plain_g[name]))
    if model.meta_mask is None or model.meta_mask[name]:
      assert moved > 1e-3, ('meta term missing', name, moved)
    else:
      assert moved == 0.0, ('meta term on a frozen tensor', name, moved)

  worst_e = max(
    max(_max_relative_error(a, b).values())
    for a, b in zip(actual.effective_grads, expected.effective_grads)
  )
  assert worst_e <= TRAJECTORY_RTOL, ('e along the trajectory', worst_e)

  errors = _max_relative_error(actual.params, expected.params)
  assert max(errors.values()) <= TRAJECTORY_RTOL, ('params after NUM_STEPS', errors)

  np.testing.assert_allclose(actual.hg_norms, expected.hg_norms, rtol=1e-5)

  departure = _max_relative_error(expected.params, baseline.params)
  assert max(departure.values()) > NONTRIVIAL_RTOL, ('too close to AdamW', departure)
  assert min(departure.values()) > 100 * TRAJECTORY_RTOL, ('too close to AdamW', departure)

  if rule.clip_norm is not None:
    two_hg_norms = 2.0 * expected.hg_norms
    assert np.any(two_hg_norms > CLIP_NORM), ('clip never binds', two_hg_norms)
    assert np.any(two_hg_norms < CLIP_NORM), ('clip always binds', two_hg_norms)
  if rule.max_ratio is not None:
    assert np.any(expected.cap_scales < 0.99), ('cap never binds', expected.cap_scales)
    assert np.any(expected.cap_scales == 1.0), ('cap always binds', expected.cap_scales)
    if rule.projection == 'global':
      np.testing.assert_allclose(actual.cap_scales, expected.cap_scales, rtol=1e-5)
