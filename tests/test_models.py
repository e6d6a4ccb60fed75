"""The benchmark model zoo: shapes, parameter counts, and one F3EO step per model."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import f3eo_jax
from benchmarks import models

torch = pytest.importorskip('torch', reason='the PyTorch twins need torch (the `torch` extra)')
from benchmarks import torch_models  # noqa: E402


def _count(tree):
  return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(tree))


def _mlp_count(sizes):
  return sum(a * b + b for a, b in zip(sizes[:-1], sizes[1:]))


def _cnn_count(spatial, in_ch, channels, dense, num_classes, kernel):
  total = 0
  for width in channels:
    total += kernel ** len(spatial) * in_ch * width + 2 * width  # bias-free conv + BN scale, bias
    in_ch, spatial = width, [s // 2 for s in spatial]
  return total + _mlp_count([in_ch * math.prod(spatial), dense, num_classes])


def _resnet18_count(widths, num_classes, in_ch=3):
  def conv_bn(k, a, b):
    return k * k * a * b + 2 * b

  total, prev = conv_bn(3, in_ch, widths[0]), widths[0]
  for stage, width in enumerate(widths):
    for block in range(2):
      total += conv_bn(3, prev, width) + conv_bn(3, width, width)
      if (stage > 0 and block == 0) or prev != width:
        total += conv_bn(1, prev, width)
      prev = width
  return total + prev * num_classes + num_classes


def _gpt_count(vocab, seq, d, n_layer):
  block = 2 * (2 * d) + _mlp_count([d, 3 * d]) + _mlp_count([d, d]) + _mlp_count([d, 4 * d, d])
  return vocab * d + seq * d + n_layer * block + 2 * d + d * vocab + vocab


# (name, flax module, torch module, input shape, dtype, expected output shape, expected count)
CASES = [
  (
    'mlp',
    models.MLP(hidden=(16, 8)),
    lambda: torch_models.MLP(4 * 4 * 1, (16, 8)),
    (2, 4, 4, 1),
    'float32',
    (2, 10),
    _mlp_count([16, 16, 8, 10]),
  ),
  (
    'cnn_1d',
    models.CNN(channels=(4, 8), dense=16),
    lambda: torch_models.CNN((40,), channels=(4, 8), dense=16),
    (2, 40),
    'float32',
    (2, 10),
    _cnn_count([40], 1, (4, 8), 16, 10, kernel=5),
  ),
  (
    'cnn_2d',
    models.CNN(channels=(4, 8), dense=16),
    lambda: torch_models.CNN((8, 8, 1), channels=(4, 8), dense=16),
    (2, 8, 8, 1),
    'float32',
    (2, 10),
    _cnn_count([8, 8], 1, (4, 8), 16, 10, kernel=3),
  ),
  (
    'resnet18',
    models.ResNet18(widths=(4, 8, 8, 16)),
    lambda: torch_models.ResNet18(widths=(4, 8, 8, 16)),
    (2, 8, 8, 3),
    'float32',
    (2, 10),
    _resnet18_count((4, 8, 8, 16), 10),
  ),
  (
    'gpt',
    models.GPT(vocab_size=11, seq_len=8, d_model=16, n_layer=2, n_head=2),
    lambda: torch_models.GPT(11, 8, d_model=16, n_layer=2, n_head=2),
    (2, 8),
    'int32',
    (2, 8, 11),
    _gpt_count(11, 8, 16, 2),
  ),
]
IDS = [c[0] for c in CASES]


def _random_variables(model, x, seed=0):
  """Variables of ``model`` drawn with numpy: shapes from ``eval_shape``, so nothing compiles."""
  rng = np.random.default_rng(seed)
  shapes = jax.eval_shape(model.init, jax.random.key(0), x)

  def draw(path, s):
    name = jax.tree_util.keystr(path)
    if 'batch_stats' in name:  # running mean 0, running variance 1
      return jnp.ones(s.shape, s.dtype) if 'var' in name else jnp.zeros(s.shape, s.dtype)
    fan_in = max(1, int(np.prod(s.shape[:-1])))
    return jnp.asarray(rng.standard_normal(s.shape) / np.sqrt(fan_in), s.dtype)

  return jax.tree_util.tree_map_with_path(draw, shapes)


def _inputs(shape, dtype, seed=0):
  rng = np.random.default_rng(seed)
  if dtype == 'int32':
    return rng.integers(0, 11, size=shape).astype(np.int32)
  return rng.standard_normal(shape).astype(np.float32)


@pytest.mark.parametrize('name, model, _, shape, dtype, out_shape, count', CASES, ids=IDS)
def test_flax_model_output_shape_and_param_count(name, model, _, shape, dtype, out_shape, count):
  x = jnp.asarray(_inputs(shape, dtype))
  variables = jax.eval_shape(model.init, jax.random.key(0), x)  # shapes only: no compile
  assert jax.eval_shape(model.apply, variables, x).shape == out_shape
  assert _count(variables['params']) == count
  has_bn = name.startswith(('cnn', 'resnet'))
  assert ('batch_stats' in variables) == has_bn


def test_full_size_param_counts_match_the_published_architectures():
  # CIFAR ResNet-18 has 11,173,962 parameters with 10 classes; the MLP 784-512-512-10 669,706.
  x = jnp.zeros((1, 32, 32, 3))
  shapes = jax.eval_shape(models.ResNet18().init, jax.random.key(0), x)
  assert _count(shapes['params']) == 11_173_962
  shapes = jax.eval_shape(models.MLP().init, jax.random.key(0), jnp.zeros((1, 28, 28, 1)))
  assert _count(shapes['params']) == 669_706


@pytest.mark.parametrize('name, model, torch_ctor, shape, dtype, out_shape, count', CASES, ids=IDS)
def test_torch_twin_has_the_same_output_shape_and_param_count(
  name, model, torch_ctor, shape, dtype, out_shape, count
):
  torch_model = torch_ctor()
  x = _inputs(shape, dtype)
  with torch.no_grad():
    y = torch_model(torch.from_numpy(x).long() if dtype == 'int32' else torch.from_numpy(x))
  assert tuple(y.shape) == out_shape
  assert sum(p.numel() for p in torch_model.parameters()) == count
  flax_shapes = jax.eval_shape(model.init, jax.random.key(0), jnp.asarray(x))
  assert _count(flax_shapes['params']) == count


@pytest.mark.parametrize('name, model, _, shape, dtype, out_shape, count', CASES, ids=IDS)
def test_one_f3eo_step_changes_params_and_stays_finite(
  name, model, _, shape, dtype, out_shape, count
):
  x = jnp.asarray(_inputs(shape, dtype))
  labels = jnp.asarray(_inputs(shape, 'int32', seed=1)) if name == 'gpt' else jnp.array([1, 3])
  variables = _random_variables(model, x)
  params, batch_stats = variables['params'], variables.get('batch_stats')
  dropout_key = jax.random.key(1)

  def obj_fn(p):
    v = {'params': p} if batch_stats is None else {'params': p, 'batch_stats': batch_stats}
    logits, new_state = model.apply(
      v, x, train=True, mutable=['batch_stats'], rngs={'dropout': dropout_key}
    )
    return models.cross_entropy(logits, labels), new_state

  tx = f3eo_jax.f3eo(1e-2)
  state = tx.init(params)

  def step(params, state):
    (loss, new_state), grads = jax.value_and_grad(obj_fn, has_aux=True)(params)
    updates, state = tx.update(grads, state, params, obj_fn=lambda p: obj_fn(p)[0])
    return optax.apply_updates(params, updates), state, loss, new_state

  # Backend optimisations off: this checks values, not speed, and halves the compile time.
  compiled = jax.jit(step).lower(params, state).compile({'xla_backend_optimization_level': 0})
  new_params, state, loss, new_model_state = compiled(params, state)
  assert np.isfinite(float(loss))
  leaves_old, leaves_new = jax.tree.leaves(params), jax.tree.leaves(new_params)
  assert all(np.all(np.isfinite(np.asarray(p))) for p in leaves_new)
  assert any(
    not np.array_equal(np.asarray(a), np.asarray(b)) for a, b in zip(leaves_old, leaves_new)
  )
  diag = f3eo_jax.diagnostics(state)
  assert all(np.isfinite(float(v)) for v in diag.values())
  assert float(diag['grad_sq_norm']) > 0
  if batch_stats is not None:  # train mode updated the running statistics
    changed = jax.tree.map(
      lambda a, b: not np.allclose(a, b), batch_stats, new_model_state['batch_stats']
    )
    assert any(jax.tree.leaves(changed))


def test_cnn_dropout_is_active_only_in_train_mode():
  model = models.CNN(channels=(4,), dense=32, dropout_rate=0.5)
  x = jnp.asarray(_inputs((4, 8, 8, 1), 'float32'))
  variables = _random_variables(model, x)
  apply = jax.jit(model.apply, static_argnames=('train', 'mutable'))
  np.testing.assert_array_equal(apply(variables, x), apply(variables, x))
  train = lambda k: apply(
    variables, x, train=True, mutable=('batch_stats',), rngs={'dropout': jax.random.key(k)}
  )[0]
  assert not np.allclose(train(0), train(1))


def test_gpt_is_causal():
  model = models.GPT(vocab_size=11, seq_len=8, d_model=16, n_layer=2, n_head=2)
  x = jnp.asarray(_inputs((1, 8), 'int32'))
  variables = _random_variables(model, x)
  changed = x.at[0, 5].set((x[0, 5] + 1) % 11)
  apply = jax.jit(model.apply)
  a, b = apply(variables, x), apply(variables, changed)
  np.testing.assert_allclose(a[:, :5], b[:, :5], rtol=1e-5, atol=1e-6)
  assert not np.allclose(a[:, 5:], b[:, 5:])
