"""Runs CG-FAC sharded over simulated CPU devices and prints what tests/test_sharding.py checks.

Started by the tests in a fresh process with ``XLA_FLAGS=--xla_force_host_platform_device_count=8``
(the rest of the suite runs on one device). Prints one JSON object on its last line.

  python tests/sharded_worker.py updates cg linen_mlp,linen_cnn  # sharded vs 1-device steps
  python tests/sharded_worker.py updates eigh linen_mlp fsdp,dp_explicit  # those layouts only
  python tests/sharded_worker.py collectives  # collectives in the compiled demo-sized step
  python tests/sharded_worker.py adaptive  # adaptive damping on an Explicit mesh vs 1 device
  python tests/sharded_worker.py recipe  # the README's cgfac() Linen recipe, same comparison

Every model is a Flax Linen model whose loss, gradients and ``extra`` come from
``cgfac_optax.flax.value_grad_and_extra``, passed whole to ``tx.update``.
"""

from __future__ import annotations

import json
import logging
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _max_rel_diff(got, want) -> float:
  """Largest ``max|got - want| / max|want|`` over the leaves."""
  import jax
  import numpy as np

  worst = 0.0
  for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
    g, w = np.asarray(g, np.float64), np.asarray(w, np.float64)
    scale = max(np.max(np.abs(w), initial=0.0), 1e-30)
    worst = max(worst, float(np.max(np.abs(g - w), initial=0.0) / scale))
  return worst


class _CountCompiles(logging.Handler):
  def __init__(self):
    super().__init__()
    self.count = 0

  def emit(self, record):
    if record.getMessage().startswith("Finished XLA compilation of jit(step)"):
      self.count += 1


def _mlp(widths):
  """A Linen MLP with ``tanh`` between its ``Dense_i`` layers of the given output widths."""
  import flax.linen as nn
  import jax.numpy as jnp

  class MLP(nn.Module):
    @nn.compact
    def __call__(self, x):
      for i, width in enumerate(widths):
        x = nn.Dense(width)(x)
        x = jnp.tanh(x) if i < len(widths) - 1 else x
      return x

  return MLP()


def _mlp_extra(widths):
  """``fn(params, x, y) -> (loss, grads, extra)`` of :func:`_mlp` (softmax cross-entropy,
  empirical Fisher: deterministic stats, the per-example gradients of the batch's labels)."""
  from cgfac_optax import flax as cflax

  fn = cflax.value_grad_and_extra(_mlp(widths), loss="softmax_cross_entropy", fisher="empirical")
  return lambda p, x, y: fn(p, x, y)


def _step_fn(tx, value_grad_and_extra):
  """``step(params, opt_state, x, y) -> (params, opt_state, loss)``, ``extra`` passed whole."""
  import optax

  def step(params, opt_state, x, y):
    loss, grads, extra = value_grad_and_extra(params, x, y)
    updates, opt_state = tx.update(grads, opt_state, params, **extra)
    return optax.apply_updates(params, updates), opt_state, loss

  return step


def _test_problem(model: str = "mlp"):
  """Params, ``value_grad_and_extra(params, x, y)`` and two batches of 16, as host arrays.

  ``"mlp"``: an MLP 64-64-48-32 (empirical Fisher, softmax cross-entropy, params drawn here).
  16 rows, at most half of every layer's width, keep every solver in its float32-accurate
  regime: ``"lowrank"`` loses digits (about ``1e-5`` against float64, on one device as on 8)
  when the rows approach the widths. ``"linen_mlp"`` (the same widths, Flax's initialization)
  and ``"linen_cnn"`` (conv 3x3, average pool, conv 3x3, dense on 8x8x1 images): squared error
  against 32 targets with the sampled Fisher (the same key on every device count). Squared error
  rather than softmax cross-entropy: with sampled softmax output gradients the float32
  ``"lowrank"`` solve is itself good to only about ``1e-4``, so two runs differ by that much.
  """
  import jax
  import numpy as np

  rng = np.random.default_rng(0)
  shape = (8, 8, 1) if model == "linen_cnn" else (64,)
  inputs = [rng.normal(size=(16, *shape)).astype(np.float32) for _ in range(2)]
  if model == "mlp":
    targets = [rng.integers(0, 32, 16).astype(np.int32) for _ in range(2)]
  else:
    targets = [rng.normal(size=(16, 32)).astype(np.float32) for _ in range(2)]
  batches = list(zip(inputs, targets))
  if model == "mlp":
    widths = (64, 64, 48, 32)
    params = {
      f"Dense_{i}": {
        "kernel": (rng.normal(size=(m, n)) / np.sqrt(m)).astype(np.float32),
        "bias": (0.1 * rng.normal(size=n)).astype(np.float32),
      }
      for i, (m, n) in enumerate(zip(widths[:-1], widths[1:]))
    }
    return params, _mlp_extra(widths[1:]), batches

  import flax.linen as nn

  from cgfac_optax import flax as cflax

  class CNN(nn.Module):
    @nn.compact
    def __call__(self, x):
      x = nn.relu(nn.Conv(8, (3, 3))(x))
      x = nn.avg_pool(x, (2, 2), strides=(2, 2))
      x = nn.relu(nn.Conv(8, (3, 3))(x))
      return nn.Dense(32)(x.reshape(x.shape[0], -1))

  if model == "linen_mlp":
    net = nn.Sequential([nn.Dense(64), nn.tanh, nn.Dense(48), nn.tanh, nn.Dense(32)])
  elif model == "linen_cnn":
    net = CNN()
  else:
    raise ValueError(f"unknown model {model!r}")
  params = jax.jit(net.init)(jax.random.key(0), batches[0][0])["params"]
  fn = cflax.value_grad_and_extra(net, loss="squared_error", fisher="sampled")
  key = jax.random.key(1)
  return jax.tree.map(np.asarray, params), lambda p, x, y: fn(p, x, y, key), batches


def _sharded_run(jitted, layout_shardings, params0, state0, batches, ref, handler) -> dict:
  """The sharded step from each single-device input, and chained on its own output."""
  import jax

  p_sh, s_sh, b_sh = layout_shardings
  handler.count = 0
  case, inputs, shardings, chained = {}, (params0, state0), [], None
  for i, (x, y) in enumerate(batches):
    x, y = jax.device_put((x, y), (b_sh, b_sh))
    # Each step starts from the single-device run's input, so that both solve the same system.
    params, state, _ = jitted(*jax.device_put(inputs, (p_sh, s_sh)), x, y)
    # The chained run feeds the sharded step's output back in: its layout must not change.
    chained = jitted(*chained, x, y)[:2] if i else (params, state)
    shardings.append(jax.tree.map(lambda a: a.sharding, chained[1]))
    want_params, want_state = ref[i]
    cg_state = state[0]
    case[f"step{i + 1}"] = {
      # The preconditioned gradient (the solve), and the update after KL clipping and
      # momentum (the trace), relative to their size.
      "solution_rel_diff": _max_rel_diff(cg_state.solution, want_state[0].solution),
      "update_rel_diff": _max_rel_diff(state[1].trace, want_state[1].trace),
      # The new params, relative to the params' size: float32 rounds them at about 6e-8.
      "params_rel_diff": _max_rel_diff(params, want_params),
      "iterations": {k: int(v) for k, v in cg_state.iterations.items()},
      "want_iterations": {k: int(v) for k, v in want_state[0].iterations.items()},
      # Global termination: every device holds the same iteration count.
      "iterations_per_device": {
        k: sorted({int(s.data) for s in v.addressable_shards})
        for k, v in cg_state.iterations.items()
      },
    }
    inputs = ref[i]
  case["compiles"] = handler.count
  case["state_sharding_stable"] = shardings[0] == shardings[1]
  case["solution_specs"] = [str(s.spec) for s in jax.tree.leaves(shardings[1][0].solution)]
  return case


LAYOUTS = ("dp", "fsdp", "dp_explicit")


def check_updates(solvers, models, layouts=LAYOUTS) -> dict:
  """Two training steps per solver and model on one device and on 8, per layout; how they differ.

  Layouts: ``dp`` (batch split, params and state replicated) and ``fsdp`` (params and state
  split too) on a mesh with Auto axes, and ``dp_explicit``: ``dp`` on a mesh with Explicit
  axes, run under ``jax.set_mesh`` (for the first model only).
  """
  import jax
  import numpy as np
  from data_parallel import sharded_step

  import cgfac_optax as cgfac

  handler = _CountCompiles()
  logging.getLogger("jax").addHandler(handler)
  jax.config.update("jax_log_compiles", True)
  logging.getLogger("jax").setLevel(logging.WARNING)

  devices = np.array(jax.devices())
  auto = jax.sharding.Mesh(devices, ("data",))
  explicit = jax.sharding.Mesh(devices, ("data",), axis_types=(jax.sharding.AxisType.Explicit,))
  out = {}
  for model, solver in [(m, s) for m in models for s in solvers]:
    params0, value_grad_and_extra, batches = _test_problem(model)
    # The CNN's conv layers have many rows and few columns: a larger damping keeps its
    # unconverged float32 CG well enough conditioned for 1e-5 (see _test_problem).
    damping = 3.0 if model == "linen_cnn" else 1.0
    tx = cgfac.cgfac(learning_rate=0.1, damping=damping, max_iters=10, tol=1e-2, solver=solver)
    step = _step_fn(tx, value_grad_and_extra)

    state0 = jax.tree.map(np.asarray, jax.jit(tx.init)(params0))
    ref, params, state = [], params0, state0
    single = jax.jit(step)
    for x, y in batches:
      params, state, _ = single(params, state, x, y)
      ref.append(jax.tree.map(np.asarray, (params, state)))

    for name, mesh, layout in (("dp", auto, "dp"), ("fsdp", auto, "fsdp")):
      if name not in layouts:
        continue
      jitted, shardings = sharded_step(step, mesh, layout, params0, state0)
      out[f"{model}/{solver}/{name}"] = _sharded_run(
        jitted, shardings, params0, state0, batches, ref, handler
      )
    if model == models[0] and "dp_explicit" in layouts:
      with jax.set_mesh(explicit):
        jitted, shardings = sharded_step(step, explicit, "dp", params0, state0)
        out[f"{model}/{solver}/dp_explicit"] = _sharded_run(
          jitted, shardings, params0, state0, batches, ref, handler
        )
  return out


def check_collectives(solvers) -> dict:
  """Collectives of the demo-sized data-parallel step (compiled only, not run)."""
  import hlo_collectives
  import jax
  import numpy as np
  from data_parallel import sharded_step

  import cgfac_optax as cgfac

  def shapes(widths):
    model = _mlp(widths[1:])
    x = jax.ShapeDtypeStruct((256, widths[0]), np.float32)
    return jax.eval_shape(model.init, jax.random.key(0), x)["params"], _mlp_extra(widths[1:])

  mesh = jax.sharding.Mesh(np.array(jax.devices()), ("data",))
  params, value_grad_and_extra = shapes((784, 256, 128, 10))  # the demo MLP
  x = jax.ShapeDtypeStruct((256, 784), np.float32)
  y = jax.ShapeDtypeStruct((256,), np.int32)
  out = {}
  cases = [(s, "dp", None) for s in solvers] + [("cg", "fsdp", None)]
  # CG with masked updates (the accelerators' default) instead of a lax.cond per layer.
  cases += [("cg", "dp", "mask"), ("cg", "fsdp", "mask")]
  for solver, layout, skip in cases:
    tx = cgfac.cgfac(learning_rate=0.1, damping=1e-2, max_iters=10, solver=solver, cg_skip=skip)
    state = jax.eval_shape(tx.init, params)
    step = _step_fn(tx, value_grad_and_extra)
    jitted, _ = sharded_step(step, mesh, layout, params, state)
    text = jitted.lower(params, state, x, y).compile().as_text()
    name = f"{solver}/{layout}" + (f"/{skip}" if skip else "")
    out[name] = [c._asdict() for c in hlo_collectives.collectives(text)]
    out[f"{name}/conditionals"] = hlo_collectives.count_instructions(text, "conditional")
  # A layer narrower on its input side (d_A = 65 <= d_G = 512) takes the product's other side.
  narrow, value_grad_and_extra = shapes((64, 512, 10))
  tx = cgfac.cgfac(learning_rate=0.1, damping=1e-2, max_iters=10, solver="cg")
  state = jax.eval_shape(tx.init, narrow)
  jitted, _ = sharded_step(_step_fn(tx, value_grad_and_extra), mesh, "dp", narrow, state)
  x = jax.ShapeDtypeStruct((256, 64), np.float32)
  text = jitted.lower(narrow, state, x, y).compile().as_text()
  out["cg/dp/narrow"] = [c._asdict() for c in hlo_collectives.collectives(text)]
  return out


def check_adaptive() -> dict:
  """Adaptive damping (``value_fn`` closes over the batch) on an Explicit mesh vs one device."""
  import jax
  import numpy as np
  from data_parallel import sharded_step

  import cgfac_optax as cgfac

  params0, value_grad_and_extra, batches = _test_problem("mlp")
  damping = cgfac.AdaptiveDamping(initial=0.1)
  tx = cgfac.cgfac(learning_rate=0.1, damping=damping, max_iters=5)
  step = _step_fn(tx, value_grad_and_extra)

  state0 = jax.tree.map(np.asarray, jax.jit(tx.init)(params0))
  single, params, state = jax.jit(step), params0, state0
  for x, y in batches:
    params, state, _ = single(params, state, x, y)
  mesh = jax.sharding.Mesh(
    np.array(jax.devices()), ("data",), axis_types=(jax.sharding.AxisType.Explicit,)
  )
  with jax.set_mesh(mesh):
    jitted, (p_sh, s_sh, b_sh) = sharded_step(step, mesh, "dp", params0, state0)
    sharded = jax.device_put((params0, state0), (p_sh, s_sh))
    for x, y in batches:
      sharded = jitted(*sharded[:2], *jax.device_put((x, y), (b_sh, b_sh)))
  return {
    "params_rel_diff": _max_rel_diff(sharded[0], params),
    "control_rel_diff": _max_rel_diff(sharded[1][0].control, state[0].control),
  }


def check_recipe(steps: int = 5) -> dict:
  """The README's ``cgfac()`` Linen recipe (step sizes from the quadratic model, so every function
  of ``extra`` runs inside the update) on ``jax.make_mesh``'s mesh, whose axes are Explicit, with
  the batch split over its 8 devices, against the same steps on one device."""
  import flax.linen as nn
  import jax
  import jax.numpy as jnp
  import numpy as np
  import optax
  from jax.sharding import PartitionSpec as P

  import cgfac_optax as cgfac
  from cgfac_optax import flax as cflax

  kx, kw, kinit = jax.random.split(jax.random.key(0), 3)
  x = jax.random.normal(kx, (256, 8))
  y = jnp.argmax(x @ jax.random.normal(kw, (8, 4)), axis=-1)
  model = nn.Sequential([nn.Dense(32), nn.tanh, nn.Dense(4)])
  params0 = model.init(kinit, x)["params"]
  tx = cgfac.cgfac()
  fn = cflax.value_grad_and_extra(model, loss="softmax_cross_entropy")

  def train(x, y, params, opt_state):
    @jax.jit
    def train_step(params, opt_state, x, y, key):
      loss, grads, extra = fn(params, x, y, key)
      updates, opt_state = tx.update(grads, opt_state, params, **extra)
      return optax.apply_updates(params, updates), opt_state, loss

    losses = []
    for i in range(steps):
      key = jax.random.fold_in(jax.random.key(1), i)
      params, opt_state, loss = train_step(params, opt_state, x, y, key)
      losses.append(float(loss))
    return jax.tree.map(np.asarray, params), losses

  one, one_losses = train(x, y, params0, tx.init(params0))
  mesh = jax.make_mesh((jax.device_count(),), ("data",))
  with jax.set_mesh(mesh):
    x8, y8 = jax.device_put((x, y), P("data"))
    params8 = jax.device_put(params0, P())
    many, many_losses = train(x8, y8, params8, tx.init(params8))
    batch_spec = str(jax.typeof(x8).sharding.spec)
  return {
    "axis_types": [str(t) for t in mesh.axis_types],
    "batch_spec": batch_spec,
    "losses": one_losses,
    "loss_rel_diff": max(abs(a - b) / abs(b) for a, b in zip(many_losses, one_losses)),
    "params_rel_diff": _max_rel_diff(many, one),
  }


def main(argv) -> None:
  sys.path.insert(0, str(ROOT / "benchmarks"))
  from cgfac_optax._solvers import SOLVERS

  what = argv[1]
  solvers = argv[2].split(",") if len(argv) > 2 else list(SOLVERS)
  if what == "updates":
    models = argv[3].split(",") if len(argv) > 3 else ["mlp"]
    layouts = argv[4].split(",") if len(argv) > 4 else LAYOUTS
    result = check_updates(solvers, models, layouts)
  elif what == "adaptive":
    result = check_adaptive()
  elif what == "recipe":
    result = check_recipe()
  elif what == "collectives":
    result = check_collectives(solvers)
  else:
    raise SystemExit(f"unknown check {what!r}")
  import jax

  print(json.dumps({"devices": jax.device_count(), "result": result}))


if __name__ == "__main__":
  main(sys.argv)
