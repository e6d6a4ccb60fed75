"""Multi-device cases for ``test_sharding.py``, run in a subprocess on 8 CPU devices.

``XLA_FLAGS`` must be set before JAX initialises, so this module is never imported by
the shared pytest process: ``python tests/_sharding_cases.py OUT.json`` runs every case
and writes the measured numbers (errors against the single-device run or a dense
Hessian, shardings, collective counts from the compiled HLO) to ``OUT.json``. The
assertions live in ``test_sharding.py``.
"""

from __future__ import annotations

import os

os.environ['XLA_FLAGS'] = (
    os.environ.get('XLA_FLAGS', '') + ' --xla_force_host_platform_device_count=8'
).strip()
os.environ.setdefault('JAX_PLATFORMS', 'cpu')

import json  # noqa: E402
import re  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from collections.abc import Callable  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402
from jax.flatten_util import ravel_pytree  # noqa: E402
from jax.sharding import AxisType, NamedSharding  # noqa: E402
from jax.sharding import PartitionSpec as P  # noqa: E402

import f3eo_jax  # noqa: E402

NUM_DEVICES = 8
NUM_STEPS = 4
BATCH = 64
AXIS = 'data'

# ---------------------------------------------------------------- model and data


def loss_fn(params, x, y):
  """Mean cross-entropy of a one-hidden-layer tanh MLP."""
  hidden = jnp.tanh(x @ params['w1'] + params['b1'])
  logits = hidden @ params['w2'] + params['b2']
  return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()


def make_problem():
  k1, k2, k3, k4, k5 = jax.random.split(jax.random.key(0), 5)
  params = {
      'w1': 0.5 * jax.random.normal(k1, (16, 32)),
      'b1': 0.1 * jax.random.normal(k5, (32,)),
      'w2': 0.5 * jax.random.normal(k2, (32, 8)),
      'b2': jnp.zeros((8,)),
  }
  x = jax.random.normal(k3, (BATCH, 16))
  y = jax.random.randint(k4, (BATCH,), 0, 8)
  return params, x, y


# The FSDP layout: the leading dim of each weight matrix over the data axis, biases replicated.
FSDP_SPECS = {'w1': P(AXIS, None), 'b1': P(), 'w2': P(AXIS, None), 'b2': P()}


def optimizers(axis_name=None):
  """The optimizers every mode trains with (axis_name only for local-gradient modes)."""
  return {
      'f3eo': f3eo_jax.f3eo(1e-2, weight_decay=1e-3, axis_name=axis_name),
      'f3eo_reference': f3eo_jax.f3eo_reference(1e-2, axis_name=axis_name),
      'f3eo_hvp_every_2': f3eo_jax.f3eo(
          1e-2, hvp_every=2, meta_clip_norm=1.0, check_consistency=1e-3, axis_name=axis_name
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
  """Inside shard_map(check_vma=False) or pmap: local gradients, averaged by the user."""
  obj_fn = lambda p: loss_fn(p, x, y)  # the mean over this device's slice
  grads = jax.lax.pmean(jax.grad(obj_fn)(params), AXIS)
  updates, state = tx.update(grads, state, params, obj_fn=obj_fn)  # tx has axis_name=AXIS
  return optax.apply_updates(params, updates), state


def vma_step(tx, params, state, x, y):
  """Inside shard_map(check_vma=True): the gradient of replicated params is summed."""
  obj_fn = lambda p: loss_fn(p, x, y) / jax.lax.axis_size(AXIS)
  grads = jax.grad(obj_fn)(params)
  updates, state = tx.update(grads, state, params, obj_fn=obj_fn)  # no axis_name
  return optax.apply_updates(params, updates), state


def all_optimizers_step(step, txs):
  """One program that steps every optimizer, so each mode compiles once."""

  def run(params, states, x, y):
    out = {name: step(tx, params[name], states[name], x, y) for name, tx in txs.items()}
    return {k: v[0] for k, v in out.items()}, {k: v[1] for k, v in out.items()}

  return run


def train(compiled, params, states, x, y):
  for _ in range(NUM_STEPS):
    params, states = compiled(params, states, x, y)
  return params, states


def diag(states):
  return {
      name: {k: float(v) for k, v in f3eo_jax.diagnostics(s).items()}
      for name, s in states.items()
  }


# ---------------------------------------------------------------- comparisons


def max_abs_diff(a, b) -> float:
  return max(
      float(np.max(np.abs(np.asarray(u, np.float64) - np.asarray(v, np.float64))))
      for u, v in zip(jax.tree.leaves(a), jax.tree.leaves(b))
  )


def compare(params, states, ref_params, ref_states) -> dict:
  """Per optimizer: the max abs param difference and the worst relative diagnostic one."""
  out = {}
  d, rd = diag(states), diag(ref_states)
  for name in ref_params:
    rel = max(
        abs(d[name][k] - rd[name][k]) / max(abs(rd[name][k]), 1e-6)
        for k in ('grad_sq_norm', 'g_dot_hg', 'hg_norm', 'meta_norm')
    )
    out[name] = {
        'param_err': max_abs_diff(params[name], ref_params[name]),
        'diag_rel_err': rel,
        'param_moved': max_abs_diff(params[name], INITIAL_PARAMS),
        'grad_mismatch': d[name]['grad_mismatch'],
    }
  return out


def varying_axes(x) -> list[str]:
  """The mesh axes a traced value varies over, as shard_map(check_vma=True) types it."""
  return sorted(jax.typeof(x).mat.varying)


def spec_of(x) -> str:
  sharding = x.sharding
  return str(sharding.spec) if isinstance(sharding, NamedSharding) else type(sharding).__name__


def w1_like_specs(state) -> list[str]:
  """The shardings of the state's leaves shaped like w1 (moments, H·g buffer)."""
  return sorted({spec_of(a) for a in jax.tree.leaves(state) if a.shape == (16, 32)})


# ---------------------------------------------------------------- compiled-HLO inspection

_COLLECTIVE = re.compile(
    r'=\s*(?P<shape>\([^=]*?\)|[a-z0-9]+\[[0-9,]*\](?:\{[^}]*\})?)\s+'
    r'(?P<op>all-reduce|all-gather|reduce-scatter|all-to-all|collective-permute)(?:-start)?\('
)
_ARRAY = re.compile(r'([a-z]+[0-9]*)\[([0-9,]*)\]')


def collectives(hlo_text: str) -> dict:
  """Collective ops of a compiled (SPMD-partitioned) module, with their result sizes."""
  found = {}
  for match in _COLLECTIVE.finditer(hlo_text):
    sizes = [
        int(np.prod([int(d) for d in dims.split(',') if d])) if dims else 1
        for _, dims in _ARRAY.findall(match.group('shape'))
    ]
    found.setdefault(match.group('op'), []).append(sizes)
  return found


def summarize(hlo_text: str) -> dict:
  """Per collective kind: op count, total result elements, largest single array."""
  out = {}
  for op, ops in collectives(hlo_text).items():
    flat = [s for sizes in ops for s in sizes]
    out[op] = {'count': len(ops), 'elements': int(sum(flat)), 'largest': int(max(flat))}
  return out


# ---------------------------------------------------------------- the cases


def main(out_path: str) -> None:
  global INITIAL_PARAMS
  start = time.perf_counter()
  assert jax.device_count() == NUM_DEVICES, jax.devices()
  results: dict = {'jax_version': jax.__version__, 'timings': {}}
  params, x, y = make_problem()
  INITIAL_PARAMS = params
  num_params = sum(p.size for p in jax.tree.leaves(params))
  results['num_params'] = int(num_params)
  results['largest_param'] = int(max(p.size for p in jax.tree.leaves(params)))

  def tick(name):
    results['timings'][name] = round(time.perf_counter() - start, 2)
    print(name, results['timings'][name], time.process_time(), file=sys.stderr, flush=True)

  # The independent oracle: a dense Hessian of the global loss on raveled params.
  flat, unravel = ravel_pytree(params)
  flat_loss = lambda f: loss_fn(unravel(f), x, y)
  dense_g = jax.grad(flat_loss)(flat)
  dense_hg = jax.hessian(flat_loss)(flat) @ dense_g
  results['dense_hg_norm'] = float(jnp.linalg.norm(dense_hg))

  def hg_err(g, hg):
    return {
        'grad_err': float(jnp.max(jnp.abs(ravel_pytree(g)[0] - dense_g))),
        'hg_err': float(jnp.max(jnp.abs(ravel_pytree(hg)[0] - dense_hg))),
    }

  # Single device: the reference every mode is compared with.
  txs = optimizers()
  rep = lambda tree: {name: tree for name in txs}
  single = jax.jit(all_optimizers_step(global_step, txs))
  ref_params, ref_states = train(
      single, rep(params), {n: tx.init(params) for n, tx in txs.items()}, x, y
  )
  tick('single_device')

  auto_mesh = jax.make_mesh((NUM_DEVICES,), (AXIS,), axis_types=(AxisType.Auto,))
  shard = lambda tree, spec: jax.device_put(tree, NamedSharding(auto_mesh, spec))
  xs, ys = shard(x, P(AXIS)), shard(y, P(AXIS))

  # (a) jit + NamedSharding, batch over 'data', params replicated.
  p_rep = shard(params, P())
  states = {n: tx.init(p_rep) for n, tx in txs.items()}
  compiled = jax.jit(all_optimizers_step(global_step, txs)).lower(
      rep(p_rep), states, xs, ys
  ).compile()
  out_params, out_states = train(compiled, rep(p_rep), states, xs, ys)
  results['jit_data_parallel'] = compare(out_params, out_states, ref_params, ref_states)
  g = jax.jit(jax.grad(loss_fn))(p_rep, xs, ys)
  hg = jax.jit(lambda p, v: f3eo_jax.hvp(lambda q: loss_fn(q, xs, ys), p, v))(p_rep, g)
  results['jit_data_parallel_hvp'] = hg_err(g, hg)
  tick('jit_data_parallel')

  # (b) FSDP: the leading dim of the weight matrices over the same axis.
  p_fsdp = {k: shard(v, FSDP_SPECS[k]) for k, v in params.items()}
  # Eager init: zeros_like keeps each leaf's sharding (under jit they would be unconstrained).
  states = {n: tx.init(p_fsdp) for n, tx in txs.items()}
  state_specs = {n: w1_like_specs(s) for n, s in states.items()}
  compiled = jax.jit(all_optimizers_step(global_step, txs)).lower(
      rep(p_fsdp), states, xs, ys
  ).compile()
  out_params, out_states = train(compiled, rep(p_fsdp), states, xs, ys)
  results['fsdp'] = {
      'compare': compare(out_params, out_states, ref_params, ref_states),
      'in_param_specs': {k: str(v) for k, v in FSDP_SPECS.items()},
      'out_param_specs': {
          n: {k: str(v.sharding.spec) for k, v in p.items()} for n, p in out_params.items()
      },
      'init_state_specs_w1': state_specs,
      'out_state_specs_w1': {n: w1_like_specs(s) for n, s in out_states.items()},
  }
  tick('fsdp')

  # (b') The same FSDP layout on an Explicit mesh (jax.make_mesh's default axis type).
  explicit_mesh = jax.make_mesh((NUM_DEVICES,), (AXIS,), axis_types=(AxisType.Explicit,))
  with jax.set_mesh(explicit_mesh):
    p_exp = jax.device_put(params, FSDP_SPECS)
    xe, ye = jax.device_put(x, P(AXIS)), jax.device_put(y, P(AXIS))
    tx = txs['f3eo']
    step = jax.jit(lambda p, s, x, y: global_step(tx, p, s, x, y))
    p_out, s_out = p_exp, tx.init(p_exp)
    for _ in range(NUM_STEPS):
      p_out, s_out = step(p_out, s_out, xe, ye)
    results['explicit_fsdp'] = {
        'param_err': max_abs_diff(jax.device_get(p_out), ref_params['f3eo']),
        'w1_type': str(jax.typeof(p_out['w1'])),
    }
  tick('explicit_fsdp')

  # HLO of the FSDP step and of the transform alone.
  lin_hvp = lambda v: jax.tree.map(lambda a: 3.0 * a, v)  # any linear map will do here

  def transform_only(tx):
    def run(grads, state, params):
      updates, state = tx.update(grads, state, params, hvp_fn=lin_hvp)
      return optax.apply_updates(params, updates), state

    return run

  def ravel_projection(grads, state, params):
    """What the transform must not do: project on the raveled pytree."""
    flat_g, unravel_g = ravel_pytree(grads)
    flat_m = 3.0 * flat_g + jnp.roll(flat_g, 1)
    flat_m = flat_m - (flat_m @ flat_g) / (flat_g @ flat_g) * flat_g
    return optax.apply_updates(params, unravel_g(-1e-2 * (flat_g + flat_m))), state

  hlo = {}
  for name, tx in txs.items():
    state = tx.init(p_fsdp)
    lowered = jax.jit(transform_only(tx)).lower(p_fsdp, state, p_fsdp)
    hlo[f'transform_{name}'] = summarize(lowered.compile().as_text())
  hlo['ravel_projection'] = summarize(
      jax.jit(ravel_projection).lower(p_fsdp, None, p_fsdp).compile().as_text()
  )
  hlo['fsdp_step_all'] = summarize(compiled.as_text())

  def grad_and_hvp_sgd(params, x, y):
    """What any HVP method needs from the model: a gradient and one jvp of it."""
    obj_fn = lambda p: loss_fn(p, x, y)
    grads = jax.grad(obj_fn)(params)
    hg = f3eo_jax.hvp(obj_fn, params, grads)
    return jax.tree.map(lambda p, a, b: p - 1e-2 * (a + b), params, grads, hg)

  def adamw_step(params, state, x, y):
    grads = jax.grad(loss_fn)(params, x, y)
    updates, state = optax.adamw(1e-2).update(grads, state, params)
    return optax.apply_updates(params, updates), state

  def f3eo_step(params, state, x, y):
    return global_step(txs['f3eo'], params, state, x, y)

  for layout, p_in in (('fsdp', p_fsdp), ('data_parallel', p_rep)):
    hlo[f'{layout}_adamw'] = summarize(
        jax.jit(adamw_step).lower(p_in, optax.adamw(1e-2).init(p_in), xs, ys).compile().as_text()
    )
    hlo[f'{layout}_grad_and_hvp'] = summarize(
        jax.jit(grad_and_hvp_sgd).lower(p_in, xs, ys).compile().as_text()
    )
    hlo[f'{layout}_f3eo'] = summarize(
        jax.jit(f3eo_step).lower(p_in, txs['f3eo'].init(p_in), xs, ys).compile().as_text()
    )
  results['hlo'] = hlo
  tick('hlo')

  # shard_map with local gradients (check_vma=False): pmean g, axis_name averages H·g.
  txs_local = optimizers(axis_name=AXIS)
  specs = lambda: (P(), P(), P(AXIS), P(AXIS))
  local = jax.jit(
      jax.shard_map(
          all_optimizers_step(local_grad_step, txs_local),
          mesh=auto_mesh, in_specs=specs(), out_specs=(P(), P()), check_vma=False,
      )
  )
  states = {n: tx.init(params) for n, tx in txs_local.items()}
  out_params, out_states = train(local, rep(params), states, xs, ys)
  results['shard_map_local_grads'] = compare(out_params, out_states, ref_params, ref_states)
  results['hlo']['shard_map_local_grads_f3eo'] = summarize(
      jax.jit(
          jax.shard_map(
              lambda p, s, x, y: local_grad_step(txs_local['f3eo'], p, s, x, y),
              mesh=auto_mesh, in_specs=specs(), out_specs=(P(), P()), check_vma=False,
          )
      ).lower(params, txs_local['f3eo'].init(params), xs, ys).compile().as_text()
  )

  # The same without axis_name: H·g stays local, so the run must differ.
  tx_no_axis = optimizers()['f3eo']
  missing = jax.jit(
      jax.shard_map(
          lambda p, s, x, y: local_grad_step(tx_no_axis, p, s, x, y),
          mesh=auto_mesh, in_specs=specs(), out_specs=(P(), P()), check_vma=False,
      )
  )
  p_out, s_out = params, tx_no_axis.init(params)
  for _ in range(NUM_STEPS):
    p_out, s_out = missing(p_out, s_out, xs, ys)
  results['shard_map_local_grads_without_axis_name'] = {
      'param_err': max_abs_diff(jax.device_get(p_out), ref_params['f3eo'])
  }

  def local_hvp(p, x, y):
    obj_fn = lambda q: loss_fn(q, x, y)
    g = jax.lax.pmean(jax.grad(obj_fn)(p), AXIS)
    return g, jax.lax.pmean(f3eo_jax.hvp(obj_fn, p, g), AXIS)

  g, hg = jax.jit(
      jax.shard_map(local_hvp, mesh=auto_mesh, in_specs=(P(), P(AXIS), P(AXIS)),
                    out_specs=P(), check_vma=False)
  )(params, xs, ys)
  results['shard_map_local_grads_hvp'] = hg_err(g, hg)
  tick('shard_map_local_grads')

  # Legacy jax.pmap (implemented on shard_map with check_vma=False in this JAX).
  pmapped = jax.pmap(
      all_optimizers_step(local_grad_step, txs_local),
      axis_name=AXIS, in_axes=(None, None, 0, 0), out_axes=None,
  )
  xp, yp = x.reshape(NUM_DEVICES, -1, x.shape[-1]), y.reshape(NUM_DEVICES, -1)
  states = {n: tx.init(params) for n, tx in txs_local.items()}
  out_params, out_states = train(pmapped, rep(params), states, xp, yp)
  results['pmap'] = compare(out_params, out_states, ref_params, ref_states)
  tick('pmap')

  # shard_map with varying-axis typing (check_vma=True): loss / n, no axis_name.
  vma = jax.jit(
      jax.shard_map(
          all_optimizers_step(vma_step, txs),
          mesh=auto_mesh, in_specs=specs(), out_specs=(P(), P()), check_vma=True,
      )
  )
  states = {n: tx.init(params) for n, tx in txs.items()}
  out_params, out_states = train(vma, rep(params), states, xs, ys)
  results['shard_map_vma'] = compare(out_params, out_states, ref_params, ref_states)
  results['hlo']['shard_map_vma_f3eo'] = summarize(
      jax.jit(
          jax.shard_map(
              lambda p, s, x, y: vma_step(txs['f3eo'], p, s, x, y),
              mesh=auto_mesh, in_specs=specs(), out_specs=(P(), P()), check_vma=True,
          )
      ).lower(params, txs['f3eo'].init(params), xs, ys).compile().as_text()
  )

  def vma_hvp(p, x, y):
    obj_fn = lambda q: loss_fn(q, x, y) / jax.lax.axis_size(AXIS)
    g = jax.grad(obj_fn)(p)
    hg = f3eo_jax.hvp(obj_fn, p, g)
    return g, hg, varying_axes(hg['w1'])

  vma_types = {}

  def vma_hvp_outputs(p, x, y):
    g, hg, hg_vma = vma_hvp(p, x, y)
    vma_types['hg'] = sorted(hg_vma)
    vma_types['g'] = varying_axes(g['w1'])
    return g, hg

  g, hg = jax.jit(
      jax.shard_map(vma_hvp_outputs, mesh=auto_mesh, in_specs=(P(), P(AXIS), P(AXIS)),
                    out_specs=P(), check_vma=True)
  )(params, xs, ys)
  results['shard_map_vma_hvp'] = hg_err(g, hg) | {'vma_of_g': vma_types['g'],
                                                   'vma_of_hg': vma_types['hg']}

  # check_vma=True with axis_name anyway: pmean of an unvarying value is that value.
  tx_axis = optimizers(axis_name=AXIS)['f3eo']
  both = jax.jit(
      jax.shard_map(
          lambda p, s, x, y: vma_step(tx_axis, p, s, x, y),
          mesh=auto_mesh, in_specs=specs(), out_specs=(P(), P()), check_vma=True,
      )
  )
  p_out, s_out = params, tx_axis.init(params)
  for _ in range(NUM_STEPS):
    p_out, s_out = both(p_out, s_out, xs, ys)
  results['shard_map_vma_with_axis_name'] = {
      'param_err': max_abs_diff(jax.device_get(p_out), ref_params['f3eo'])
  }
  tick('shard_map_vma')

  with open(out_path, 'w', encoding='utf-8') as f:
    json.dump(results, f, indent=1, sort_keys=True)


INITIAL_PARAMS = None

if __name__ == '__main__':
  main(sys.argv[1])
