"""Data-parallel CG-FAC on N simulated CPU devices: the step time against one device, and the
collectives of the compiled step against the planner's communication model.

Trains the autoencoder task (``tasks.py``, batch ``--batch-size``) with fixed-rate CG-FAC
(``FIXED_RATE``), once per solver, under ``jax.jit`` with the batch split over a ``data`` axis
of a ``Mesh`` (params and optimizer state replicated, or split FSDP-style with ``--layout
fsdp``), in a fresh process with 1 device and in one with N simulated devices
(``XLA_FLAGS=--xla_force_host_platform_device_count=N``). Prints the median step time of each,
and the collectives of the compiled N-device step read from its HLO (``hlo_collectives.py``):
once per step, and per CG iteration (those inside the ``while`` loop), each beside what
``cgfac_optax.plan(..., data_shards=N)`` predicts (per step: the gradients' all-reduce plus
the solver's exchange without iterations, not the few scalars the step also reduces, such as
its mean loss; per iteration: one iteration's more).

Simulated devices share this machine's cores and "communicate" through memory: the N-device
time shows the overhead of the partitioned program, not a speed-up. Both processes run with
``OPENBLAS_NUM_THREADS=1``: N devices calling LAPACK at once would oversubscribe the cores.

  python benchmarks/data_parallel.py                      # 8 devices, every solver
  python benchmarks/data_parallel.py --devices 4 --solvers cg eigh --layout fsdp
  python benchmarks/data_parallel.py --tiny               # 2 devices, "cg", seconds
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import harness as H
import hlo_collectives
import jax
import numpy as np
import optax
import optimizers as O
import tasks as T
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

import cgfac_optax

LAYOUTS = ("dp", "fsdp")
FIXED_RATE = {"learning_rate": 0.05, "damping": 1e-2, "max_iters": 3, "tol": 1e-2}


def fsdp_spec(shape: tuple[int, ...], n: int, axis: str = "data") -> P:
  """Splits the last dimension divisible by ``n`` (else replicates).

  The last first: CG-FAC works on each layer as one ``(d_in + 1) x d_out`` matrix with the bias
  as its last row, and a kernel split along ``d_out`` stacks with its bias without moving data.
  """
  for i in reversed(range(len(shape))):
    if shape[i] % n == 0:
      return P(*([None] * i), axis)
  return P()


def shardings(mesh: Mesh, layout: str, tree, axis: str = "data"):
  """Every leaf's sharding: ``"dp"`` replicates all, ``"fsdp"`` splits by :func:`fsdp_spec`."""
  if layout not in LAYOUTS:
    raise ValueError(f"layout must be one of {LAYOUTS}, got {layout!r}")
  n = mesh.shape[axis]
  spec = lambda x: fsdp_spec(x.shape, n, axis) if layout == "fsdp" else P()
  return jax.tree.map(lambda x: NamedSharding(mesh, spec(x)), tree)


def sharded_step(step, mesh: Mesh, layout: str, params, opt_state, axis: str = "data"):
  """``jax.jit(step)`` for ``step(params, opt_state, x, y) -> (params, opt_state, loss)``, the
  batch split over ``axis``, params and state laid out by ``layout``; and those shardings.

  Outputs are laid out as inputs, so the second step reuses the first step's executable.
  """
  p_sh = shardings(mesh, layout, params, axis)
  s_sh = shardings(mesh, layout, opt_state, axis)
  batch = NamedSharding(mesh, P(axis))
  jitted = jax.jit(
    step,
    in_shardings=(p_sh, s_sh, batch, batch),
    out_shardings=(p_sh, s_sh, NamedSharding(mesh, P())),
  )
  return jitted, (p_sh, s_sh, batch)


def training_step(task: T.Task, tx, key: jax.Array):
  """``(params, opt_state, x, y) -> (params, opt_state, loss)``: a fresh key every step."""
  update = O.update_fn(task, tx, uses_curvature=True)
  _, state = task.init(0)

  def step(params, opt_state, x, y):
    count = cgfac_optax.state_scalars(opt_state)["count"]
    params, _, opt_state, loss = update(
      params, state, opt_state, x, y, jax.random.fold_in(key, count)
    )
    return params, opt_state, loss

  return step


def predicted_bytes(task: T.Task, solver: str, x, y, n: int) -> dict[str, float]:
  """The planner's bytes per step (gradients included) and per CG iteration, on ``n`` devices."""
  params, state = task.init(0)
  helper = O.value_grad_and_extra(task)
  stats = jax.eval_shape(lambda: helper(params, state, x, y, jax.random.key(0))[2]["layer_stats"]())
  options = dict(solver=solver, max_iters=FIXED_RATE["max_iters"], data_shards=n)
  exchanged = []
  for m in (0, 1):
    plan = cgfac_optax.plan(params, stats, learning_rate=1.0, cg_iters=m, **options)
    exchanged.append(sum(layer.communication_bytes[solver] for layer in plan.values()))
  gradients = sum(4 * leaf.size for leaf in jax.tree.leaves(params))
  return {"step": gradients + exchanged[0], "iteration": exchanged[1] - exchanged[0]}


def run_child(args) -> dict:
  """Every solver on this process's devices: step times, and on several the collectives."""
  n = jax.device_count()
  mesh = Mesh(np.array(jax.devices()), ("data",))
  task = T.make("autoencoder", args.tiny)
  batches = H.Batches(*task.data[:2], args.batch_size, 0)
  results = {}
  for solver in args.solvers:
    tx = cgfac_optax.cgfac(**FIXED_RATE, solver=solver)
    params = task.init(0)[0]
    opt_state = tx.init(params)
    step = training_step(task, tx, jax.random.key(1))
    if n == 1:
      jitted, b_sh = jax.jit(step), None  # None: the default device
    else:
      jitted, (p_sh, s_sh, b_sh) = sharded_step(step, mesh, args.layout, params, opt_state)
      params, opt_state = jax.device_put((params, opt_state), (p_sh, s_sh))
    x, y = jax.device_put(next(batches), (b_sh, b_sh))
    start = time.perf_counter()
    compiled = jitted.lower(params, opt_state, x, y).compile()
    out = {"compile_s": time.perf_counter() - start}
    if n > 1:
      found = hlo_collectives.collectives(compiled.as_text())
      out["collectives"] = hlo_collectives.summary(found)
      out["predicted_bytes"] = predicted_bytes(task, solver, x, y, n)
    times = []
    for _ in range(args.steps + 2):  # the first two calls warm up
      x, y = jax.device_put(next(batches), (b_sh, b_sh))
      start = time.perf_counter()
      params, opt_state, loss = compiled(params, opt_state, x, y)
      jax.block_until_ready(loss)
      times.append(time.perf_counter() - start)
    scalars = cgfac_optax.state_scalars(opt_state)
    iterations = [int(v) for k, v in scalars.items() if k.startswith("cg_iterations/")]
    out.update(step_s=H.median(times[2:]), final_loss=float(loss))
    out["mean_cg_iterations"] = float(np.mean(iterations)) if iterations else 0.0
    results[solver] = out
  return {"devices": n, "task": task.description, "results": results}


def run_devices(n: int, argv: list[str]) -> dict:
  """:func:`run_child` in a fresh process with ``n`` simulated CPU devices."""
  env = dict(os.environ)
  flags = [f for f in env.get("XLA_FLAGS", "").split() if "device_count" not in f]
  env["XLA_FLAGS"] = " ".join([*flags, f"--xla_force_host_platform_device_count={n}"])
  env.update(JAX_PLATFORMS="cpu", OPENBLAS_NUM_THREADS="1")
  command = [sys.executable, __file__, "--child", *argv]
  out = subprocess.run(command, env=env, check=True, capture_output=True, text=True)
  return json.loads(out.stdout.strip().splitlines()[-1])


def table(args, one: dict, many: dict) -> str:
  n = many["devices"]
  headers = ["solver", "1 device ms", f"{n} devices ms", "ratio", "CG iterations"]
  headers += ["per step: n, KiB (model)", "per CG iteration: n, KiB (model)"]
  rows = []
  for solver in args.solvers:
    a, b = one["results"][solver], many["results"][solver]
    row = [solver, 1e3 * a["step_s"], 1e3 * b["step_s"], b["step_s"] / a["step_s"]]
    row.append(b["mean_cg_iterations"])
    for where in ("step", "iteration"):
      c, model = b["collectives"][where], b["predicted_bytes"][where]
      row.append(f"{c['count']}, {c['bytes'] / 1024:.1f} ({model / 1024:.1f})")
    rows.append(row)
  return H.format_table(headers, rows)


def plot(args, one: dict, many: dict, path: Path) -> Path:
  import matplotlib

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  xs = np.arange(len(args.solvers))
  fig, ax = plt.subplots(figsize=(6, 3.5))
  for k, (res, label) in enumerate(((one, "1 device"), (many, f"{many['devices']} simulated"))):
    ms = [1e3 * res["results"][s]["step_s"] for s in args.solvers]
    ax.bar(xs + (k - 0.5) * 0.4, ms, width=0.4, label=label)
  ax.set_xticks(xs, args.solvers)
  ax.set_ylabel("median step time (ms)")
  ax.set_title(f"CG-FAC data-parallel ({args.layout}), {many['task']}", fontsize=8)
  ax.legend()
  fig.tight_layout()
  path.parent.mkdir(parents=True, exist_ok=True)
  fig.savefig(path, dpi=110)
  plt.close(fig)
  return path


def parse_args(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--devices", type=int, default=8)
  parser.add_argument("--solvers", nargs="+", default=None, choices=O.solver_names())
  parser.add_argument("--layout", choices=LAYOUTS, default="dp")
  parser.add_argument("--steps", type=int, default=20, help="timed steps (after two warm-ups)")
  parser.add_argument("--batch-size", type=int, default=512)
  parser.add_argument("--out", type=Path, default=H.RESULTS / "data_parallel")
  parser.add_argument("--tiny", action="store_true", help="2 devices, 'cg', tiny model")
  parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
  args = parser.parse_args(argv)
  if args.tiny:
    args.devices, args.batch_size, args.steps = 2, 64, 1
  args.solvers = args.solvers or (["cg"] if args.tiny else O.solver_names())
  return args


def main(argv=None) -> dict:
  argv = sys.argv[1:] if argv is None else list(argv)
  args = parse_args(argv)
  if args.child:
    print(json.dumps(run_child(args)))
    return {}
  if args.batch_size % args.devices:
    raise SystemExit(
      f"--batch-size {args.batch_size} must be divisible by --devices {args.devices}"
    )
  info = H.environment(optax=optax, cgfac_optax=cgfac_optax)
  H.print_environment(info)
  one, many = run_devices(1, argv), run_devices(args.devices, argv)
  print(f"\n{many['task']}, batch {args.batch_size}, layout {args.layout}, {FIXED_RATE}\n")
  printed = table(args, one, many)
  print(printed)
  print(
    f"\nThe {args.devices} devices are simulated on {info['cpu_count']} CPU cores: not a "
    "speed-up measurement. Collectives: count and KiB of their results per device, from the "
    "compiled HLO; (model): cgfac_optax.plan's bytes, for the replicated layout (dp)."
  )
  payload = {
    "environment": info,
    "settings": vars(args),
    "one": one,
    "many": many,
    "table": printed,
  }
  path = H.write_json("data_parallel", payload, args.out)
  png = plot(args, one, many, Path(args.out) / "data_parallel.png")
  print(f"wrote {path} and {png}")
  return payload


if __name__ == "__main__":
  main()
