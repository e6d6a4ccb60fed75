"""Multi-device cases for ``test_sharding.py``, run in a subprocess on 8 CPU devices.

``XLA_FLAGS`` must be set before JAX initialises, so the shared pytest process never
imports this module: ``python tests/_sharding_cases.py OUT.json`` (with the repository
root on ``PYTHONPATH``, for ``benchmarks.xla_utils``) runs every case and
writes what it measured (errors against the single-device run and against a dense
Hessian, shardings, vma types, collectives counted in the compiled HLO) to ``OUT.json``.
The assertions live in ``test_sharding.py``.
"""

from __future__ import annotations

from benchmarks import xla_utils

# Eight simulated devices; fast_compile only cuts CPU compile time (same HLO, same math).
xla_utils.use_host_devices(8, fast_compile=True)

import json  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402
from jax.flatten_util import ravel_pytree  # noqa: E402
from jax.sharding import AxisType, NamedSharding  # noqa: E402
from jax.sharding import PartitionSpec as P  # noqa: E402

import f3eo_jax  # noqa: E402
from f3eo_jax import reductions  # noqa: E402

NUM_DEVICES = 8
NUM_STEPS = 4
AXIS = 'data'
W1_SHAPE = (16, 32)

# The FSDP layout: the leading dim of each weight matrix over the data axis, biases replicated.
FSDP_SPECS = {'w1': P(AXIS, None), 'b1': P(), 'w2': P(AXIS, None), 'b2': P()}


def loss_fn(params, x, y):
  """Mean cross-entropy of a one-hidden-layer tanh MLP."""
  hidden = jnp.tanh(x @ params['w1'] + params['b1'])
  logits = hidden @ params['w2'] + params['b2']
  return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()


def make_problem():
  k1, k2, k3, k4, k5 = jax.random.split(jax.random.key(0), 5)
  params = {
    'w1': 0.5 * jax.random.normal(k1, W1_SHAPE),
    'b1': 0.1 * jax.random.normal(k5, (32,)),
    'w2': 0.5 * jax.random.normal(k2, (32, 8)),
    'b2': jnp.zeros((8,)),
  }
  x = jax.random.normal(k3, (64, 16))
  y = jax.random.randint(k4, (64,), 0, 8)
  return params, x, y


def optimizers(axis_name=None):
  """Every optimizer under test; axis_name only where gradients are local."""
  return {
    'f3eo': f3eo_jax.f3eo(1e-2, weight_decay=1e-3, axis_name=axis_name),
    'f3eo_reference': f3eo_jax.f3eo_reference(1e-2, axis_name=axis_name),
    # lax.cond, the H·g buffer in the state, clipping and the consistency check.
    'f3eo_hvp_every_2': f3eo_jax.f3eo(
      1e-2,
      hvp_every=2,
      meta_clip_norm=1.0,
      projection='per_leaf',
      check_consistency=1e-3,
      axis_name=axis_name,
    ),
  }


# ---------------------------------------------------------------- one step, three semantics


def global_step(tx, params, state, x, y):
  """A plain step: under jit + NamedSharding, XLA (GSPMD) inserts all communication."""
  obj_fn = lambda p: loss_fn(p, x, y)
  grads = jax.grad(obj_fn)(params)
  updates, state = tx.update(grads, state, params, obj_fn=obj_fn)
  return optax.apply_updates(params, updates), state


def local_grad_step(tx, params, state, x, y):
  """shard_map(check_vma=False) or pmap: local gradients, averaged by the user."""
  obj_fn = lambda p: loss_fn(p, x, y)  # the mean over this device's slice
  grads = jax.lax.pmean(jax.grad(obj_fn)(params), AXIS)
  updates, state = tx.update(grads, state, params, obj_fn=obj_fn)  # tx has axis_name
  return optax.apply_updates(params, updates), state


def vma_step(tx, params, state, x, y):
  """shard_map(check_vma=True): the gradient of replicated params comes back summed."""
  obj_fn = lambda p: loss_fn(p, x, y) / jax.lax.axis_size(AXIS)
  grads = jax.grad(obj_fn)(params)
  updates, state = tx.update(grads, state, params, obj_fn=obj_fn)  # no axis_name
  return optax.apply_updates(params, updates), state


def adamw_step(params, state, x, y):
  grads = jax.grad(loss_fn)(params, x, y)
  updates, state = optax.adamw(1e-2).update(grads, state, params)
  return optax.apply_updates(params, updates), state


def grad_and_hvp_step(params, x, y):
  """What any HVP method needs from the model: a gradient and one jvp of it."""
  obj_fn = lambda p: loss_fn(p, x, y)
  grads = jax.grad(obj_fn)(params)
  hg = f3eo_jax.hvp(obj_fn, params, grads)
  return jax.tree.map(lambda p, a, b: p - 1e-2 * (a + b), params, grads, hg)


def train(step_fn, params, state, x, y):
  for _ in range(NUM_STEPS):
    # one step in flight at a time: queued multi-device steps can starve XLA:CPU's threads
    params, state = jax.block_until_ready(step_fn(params, state, x, y))
  return params, state


# ---------------------------------------------------------------- comparisons


def max_abs_diff(a, b) -> float:
  return max(
    float(np.max(np.abs(np.asarray(u, np.float64) - np.asarray(v, np.float64))))
    for u, v in zip(jax.tree.leaves(a), jax.tree.leaves(b))
  )


def compare(params, state, reference) -> dict:
  """Final params and diagnostics against the single-device run of the same optimizer."""
  ref_params, ref_state, initial = reference
  d, rd = f3eo_jax.diagnostics(state), f3eo_jax.diagnostics(ref_state)
  return {
    'param_err': max_abs_diff(params, ref_params),
    'diag_rel_err': max(
      abs(float(d[k]) - float(rd[k])) / max(abs(float(rd[k])), 1e-6)
      for k in ('grad_sq_norm', 'g_dot_hg', 'hg_norm', 'meta_norm')
    ),
    'param_moved': max_abs_diff(ref_params, initial),
    'grad_mismatch': float(d['grad_mismatch']),
  }


def varying_axes(x) -> list[str]:
  """The mesh axes a traced value varies over, as shard_map(check_vma=True) types it."""
  return sorted(jax.typeof(x).mat.varying)


def spec_of(x) -> str:
  """A NamedSharding's spec without trailing Nones (``P('data', None)`` is ``P('data',)``)."""
  if not isinstance(x.sharding, NamedSharding):
    return type(x.sharding).__name__
  spec = tuple(x.sharding.spec)
  while spec and spec[-1] is None:
    spec = spec[:-1]
  return str(P(*spec))


def w1_like_specs(state) -> list[str]:
  """Shardings of the state's leaves shaped like w1 (moments, the H·g buffer)."""
  return sorted({spec_of(a) for a in jax.tree.leaves(state) if a.shape == W1_SHAPE})


# ---------------------------------------------------------------- the cases


def main(out_path: str) -> None:
  start = time.perf_counter()
  assert jax.device_count() == NUM_DEVICES, jax.devices()
  params, x, y = make_problem()
  results: dict = {
    'jax_version': jax.__version__,
    'param_sizes': sorted((int(p.size) for p in jax.tree.leaves(params)), reverse=True),
    'hlo': {},
    'cpu_seconds': {},
  }
  hlo = results['hlo']

  def tick(name):
    results['cpu_seconds'][name] = round(time.process_time(), 2)
    print(f'{name}: {time.perf_counter() - start:.1f} s', file=sys.stderr, flush=True)

  # The independent oracle: a dense Hessian of the global loss on raveled params.
  flat, unravel = ravel_pytree(params)
  flat_loss = lambda f: loss_fn(unravel(f), x, y)
  dense_g = jax.jit(jax.grad(flat_loss))(flat)
  dense_hg = jax.jit(jax.hessian(flat_loss))(flat) @ dense_g

  def hvp_errors(g, hg):
    return {
      'grad_err': float(jnp.max(jnp.abs(ravel_pytree(g)[0] - dense_g))),
      'hg_err': float(jnp.max(jnp.abs(ravel_pytree(hg)[0] - dense_hg))),
      'hg_scale': float(jnp.max(jnp.abs(dense_hg))),
    }

  # Single device: the run every layout is compared with.
  txs = optimizers()
  reference = {}
  for name, tx in txs.items():
    step = jax.jit(lambda p, s, x, y, tx=tx: global_step(tx, p, s, x, y))
    reference[name] = (*train(step, params, tx.init(params), x, y), params)
  tick('single_device')

  mesh = jax.make_mesh((NUM_DEVICES,), (AXIS,), axis_types=(AxisType.Auto,))
  shard = lambda tree, spec: jax.device_put(tree, NamedSharding(mesh, spec))
  xs, ys = shard(x, P(AXIS)), shard(y, P(AXIS))

  # (a) jit + NamedSharding: batch over 'data', params replicated; (b) FSDP.
  layouts = {
    'jit_data_parallel': shard(params, P()),
    'jit_fsdp': {k: shard(v, FSDP_SPECS[k]) for k, v in params.items()},
  }
  for layout, p_in in layouts.items():
    cases = results[layout] = {}
    for name, tx in txs.items():
      state = tx.init(p_in)  # eager: zeros_like keeps each leaf's sharding
      compiled = (
        jax.jit(lambda p, s, x, y, tx=tx: global_step(tx, p, s, x, y))
        .lower(p_in, state, xs, ys)
        .compile()
      )
      out_params, out_state = train(compiled, p_in, state, xs, ys)
      cases[name] = compare(out_params, out_state, reference[name]) | {
        'in_specs': {k: spec_of(v) for k, v in p_in.items()},
        'out_specs': {k: spec_of(v) for k, v in out_params.items()},
        'state_specs_w1': w1_like_specs(out_state),
      }
      if name == 'f3eo':
        hlo[f'{layout}_f3eo'] = xla_utils.collectives(compiled.as_text())
    hlo[f'{layout}_adamw'] = xla_utils.collectives(
      jax.jit(adamw_step).lower(p_in, optax.adamw(1e-2).init(p_in), xs, ys).compile().as_text()
    )
    # The gradient check compares obj_fn's gradient with g: what it costs on its own.
    unchecked = f3eo_jax.f3eo(1e-2, weight_decay=1e-3, check_consistency=None)
    hlo[f'{layout}_f3eo_unchecked'] = xla_utils.collectives(
      jax.jit(lambda p, s, x, y, tx=unchecked: global_step(tx, p, s, x, y))
      .lower(p_in, unchecked.init(p_in), xs, ys)
      .compile()
      .as_text()
    )
    tick(layout)
  hlo['jit_fsdp_grad_and_hvp'] = xla_utils.collectives(
    jax.jit(grad_and_hvp_step).lower(layouts['jit_fsdp'], xs, ys).compile().as_text()
  )
  g = jax.jit(jax.grad(loss_fn))(layouts['jit_data_parallel'], xs, ys)
  hg = jax.jit(lambda p, v: f3eo_jax.hvp(lambda q: loss_fn(q, xs, ys), p, v))(
    layouts['jit_data_parallel'], g
  )
  results['jit_data_parallel_hvp'] = hvp_errors(g, hg)

  # The transform alone on FSDP-sharded trees, and a raveling projection to contrast.
  p_fsdp = layouts['jit_fsdp']
  linear_hvp = lambda v: jax.tree.map(lambda a: 3.0 * a, v)

  def transform_only(tx):
    def run(grads, state, params):
      updates, state = tx.update(grads, state, params, hvp_fn=linear_hvp)
      return optax.apply_updates(params, updates), state

    return run

  # The reductions are platform-dependent: a variadic reduce over short rows of the last axis
  # on CPU (here), separate reductions elsewhere. Emptying the CPU list compiles the GPU/TPU
  # form here. Besides FSDP, a leaf sharded along its last axis (128 = 8 devices × 2 rows of 8).
  p_last_axis = {'w': shard(jnp.linspace(-1.0, 1.0, 8 * 128).reshape(8, 128), P(None, AXIS))}
  cpu_forms = reductions.ROWS_FIRST_PLATFORMS
  for form, platforms in (('', cpu_forms), ('_separate', ())):
    reductions.ROWS_FIRST_PLATFORMS = platforms
    try:
      for name, layout, p_in in (
        ('f3eo', '', p_fsdp),
        ('f3eo_hvp_every_2', '', p_fsdp),
        ('f3eo', '_last_axis', p_last_axis),
      ):
        tx = txs[name]
        hlo[f'transform_{name}{layout}{form}'] = xla_utils.collectives(
          jax.jit(transform_only(tx)).lower(p_in, tx.init(p_in), p_in).compile().as_text()
        )
    finally:
      reductions.ROWS_FIRST_PLATFORMS = cpu_forms

  def raveled_projection(grads, params):
    """What the transform must not do: inner products on the raveled pytree."""
    flat_g, unravel_g = ravel_pytree(grads)
    flat_m = 3.0 * flat_g
    flat_m = flat_m - (flat_m @ flat_g) / (flat_g @ flat_g) * flat_g
    return optax.apply_updates(params, unravel_g(-1e-2 * (flat_g + flat_m)))

  hlo['raveled_projection'] = xla_utils.collectives(
    jax.jit(raveled_projection).lower(p_fsdp, p_fsdp).compile().as_text()
  )
  tick('hlo')

  # (b') The FSDP layout on an Explicit mesh, jax.make_mesh's default axis type.
  with jax.set_mesh(jax.make_mesh((NUM_DEVICES,), (AXIS,))):
    p_exp = jax.device_put(params, FSDP_SPECS)
    xe, ye = jax.device_put(x, P(AXIS)), jax.device_put(y, P(AXIS))
    tx = txs['f3eo']
    step = jax.jit(lambda p, s, x, y: global_step(tx, p, s, x, y))
    out_params, out_state = train(step, p_exp, tx.init(p_exp), xe, ye)
    results['explicit_fsdp'] = compare(out_params, out_state, reference['f3eo']) | {
      'w1_type': str(jax.typeof(out_params['w1']))
    }
  tick('explicit_fsdp')

  def shard_mapped(step, tx, check_vma):
    return jax.jit(
      jax.shard_map(
        lambda p, s, x, y: step(tx, p, s, x, y),
        mesh=mesh,
        in_specs=(P(), P(), P(AXIS), P(AXIS)),
        out_specs=(P(), P()),
        check_vma=check_vma,
      )
    )

  def shard_map_cases(step, txs, names, check_vma, hlo_key):
    """Each optimizer of ``names`` against one device; f3eo's collectives in ``hlo[hlo_key]``."""
    cases = {}
    for name in names:
      tx = txs[name]
      compiled = shard_mapped(step, tx, check_vma).lower(params, tx.init(params), xs, ys).compile()
      cases[name] = compare(*train(compiled, params, tx.init(params), xs, ys), reference[name])
      if name == 'f3eo':
        hlo[hlo_key] = xla_utils.collectives(compiled.as_text())
    return cases

  # shard_map with local gradients (check_vma=False): pmean g, axis_name averages H·g.
  txs_local = optimizers(axis_name=AXIS)
  results['shard_map_local_grads'] = shard_map_cases(
    local_grad_step, txs_local, ('f3eo', 'f3eo_hvp_every_2'), False, 'shard_map_local_grads_f3eo'
  )
  # The same without axis_name: H·g stays local, so this run must differ.
  tx = txs['f3eo']
  out = train(shard_mapped(local_grad_step, tx, False), params, tx.init(params), xs, ys)
  results['shard_map_local_grads_without_axis_name'] = compare(*out, reference['f3eo'])

  def local_hvp(p, x, y):
    obj_fn = lambda q: loss_fn(q, x, y)
    g = jax.lax.pmean(jax.grad(obj_fn)(p), AXIS)
    return g, jax.lax.pmean(f3eo_jax.hvp(obj_fn, p, g), AXIS)

  g, hg = jax.jit(
    jax.shard_map(
      local_hvp, mesh=mesh, in_specs=(P(), P(AXIS), P(AXIS)), out_specs=P(), check_vma=False
    )
  )(params, xs, ys)
  results['shard_map_local_grads_hvp'] = hvp_errors(g, hg)
  tick('shard_map_local_grads')

  # Legacy jax.pmap, built on shard_map(check_vma=False) in this JAX: local gradients too.
  tx = txs_local['f3eo_reference']
  pmapped = jax.pmap(
    lambda p, s, x, y: local_grad_step(tx, p, s, x, y),
    axis_name=AXIS,
    in_axes=(None, None, 0, 0),
    out_axes=None,
  )
  xp, yp = x.reshape(NUM_DEVICES, -1, x.shape[-1]), y.reshape(NUM_DEVICES, -1)
  out = train(pmapped, params, tx.init(params), xp, yp)
  results['pmap'] = {'f3eo_reference': compare(*out, reference['f3eo_reference'])}
  tick('pmap')

  # shard_map with varying-manual-axes typing (check_vma=True): loss / n, no axis_name.
  results['shard_map_vma'] = shard_map_cases(
    vma_step, txs, ('f3eo', 'f3eo_reference', 'f3eo_hvp_every_2'), True, 'shard_map_vma_f3eo'
  )
  # With axis_name as well: a pmean of an unvarying value is that value.
  tx = txs_local['f3eo']
  out = train(shard_mapped(vma_step, tx, True), params, tx.init(params), xs, ys)
  results['shard_map_vma_with_axis_name'] = compare(*out, reference['f3eo'])

  types = {}

  def vma_hvp(p, x, y):
    obj_fn = lambda q: loss_fn(q, x, y) / jax.lax.axis_size(AXIS)
    loss, g = jax.value_and_grad(obj_fn)(p)
    hg = f3eo_jax.hvp(obj_fn, p, g)
    types.update(loss=varying_axes(loss), g=varying_axes(g['w1']), hg=varying_axes(hg['w1']))
    return g, hg

  g, hg = jax.jit(
    jax.shard_map(
      vma_hvp, mesh=mesh, in_specs=(P(), P(AXIS), P(AXIS)), out_specs=P(), check_vma=True
    )
  )(params, xs, ys)
  results['shard_map_vma_hvp'] = hvp_errors(g, hg) | {f'vma_of_{k}': v for k, v in types.items()}
  tick('shard_map_vma')

  results['wall_seconds'] = round(time.perf_counter() - start, 1)
  with open(out_path, 'w', encoding='utf-8') as f:
    json.dump(results, f, indent=1, sort_keys=True)


if __name__ == '__main__':
  main(sys.argv[1])
