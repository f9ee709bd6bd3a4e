"""One solve of one dense layer per solver, as the layer widens and the rows grow, against the
planner's cost model.

Two sweeps of one ``scale_by_cgfac`` update (the stats prepared and the system solved) for a
dense layer with ``--d-in`` inputs plus a bias: the outputs (256 ... 32768) at fixed curvature
rows, and the rows (64 ... 8192) at a fixed width. CG starts cold and runs ``--iters``
iterations (``tol=0``: the worst case; a warm start only makes it cheaper). Each cell gives the
measured time and XLA's memory for the compiled update (arguments, outputs and temporaries),
and in parentheses what ``cgfac_optax.plan`` predicts: its flops at the matmul rate measured
here, and its curvature memory plus the update's working set (about eight ``d_A x d_G``
arrays: gradient, solution, warm start, CG's vectors, update, state, and the stats' rows). A
solve predicted to need more than the free memory or more than ``--max-seconds`` is skipped
and reported as such: this is where K-FAC's eigendecompositions run out.

Run: ``python benchmarks/scaling.py`` (``--tiny`` for a seconds-long check).
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

import harness as H
import jax
import jax.numpy as jnp
import optimizers as O

import cgfac_optax


def dense_layer(d_in: int, d_out: int, rows: int, seed: int = 0):
  """``(params, grads, stats)`` of one dense layer: random gradients and curvature rows."""
  k = jax.random.split(jax.random.key(seed), 4)
  params = {"dense": {"kernel": jnp.zeros((d_in, d_out)), "bias": jnp.zeros((d_out,))}}
  grads = {
    "dense": {
      "kernel": jax.random.normal(k[0], (d_in, d_out)),
      "bias": jax.random.normal(k[1], (d_out,)),
    }
  }
  inputs = jnp.tanh(jax.random.normal(k[2], (rows, d_in)))
  stats = {"dense": cgfac_optax.DenseStats(inputs, jax.random.normal(k[3], (rows, d_out)))}
  return params, grads, stats


def shapes(d_in: int, d_out: int, rows: int):
  """``(params, stats)`` as shapes only: what the planner reads."""
  return jax.eval_shape(lambda: dense_layer(d_in, d_out, rows))[::2]


def predicted(solver: str, d_in: int, d_out: int, rows: int, iters: int) -> tuple[float, float]:
  """``(flops, bytes)`` of one solve: the planner's model, plus the update's working set."""
  layer = cgfac_optax.plan(
    *shapes(d_in, d_out, rows), learning_rate=1.0, solver=solver, max_iters=iters, cg_iters=iters
  )["dense"]
  working = 4 * (8 * layer.d_a * layer.d_g + rows * (layer.d_a + layer.d_g))
  return layer.flops[solver], layer.memory_bytes[solver] + working


def available_bytes() -> float:
  """A share of the device's free memory (of the host's, on the CPU)."""
  dev = jax.devices()[0]
  stats = dev.memory_stats() or {} if dev.platform != "cpu" else {}
  if "bytes_limit" in stats:
    return 0.8 * (stats["bytes_limit"] - stats.get("bytes_in_use", 0))
  with open("/proc/meminfo") as f:
    free = next(line for line in f if line.startswith("MemAvailable"))
  return 0.6 * 1024 * float(free.split()[1])


def seconds(fn, *args, reps: int) -> float:
  """Median seconds of ``fn(*args)`` over ``reps`` calls after one warm-up call."""
  times = []
  for _ in range(reps + 1):
    start = time.perf_counter()
    jax.block_until_ready(fn(*args))
    times.append(time.perf_counter() - start)
  return H.median(times[1:])


def matmul_rate() -> float:
  """Float32 matmul flops per second on this device (the time the flops predict)."""
  x = jax.random.normal(jax.random.key(0), (1024, 1024))
  return 2 * 1024**3 / seconds(jax.jit(lambda x: x @ x), x, reps=5)


def measure(solver: str, d_in: int, d_out: int, rows: int, iters: int, reps: int) -> dict:
  params, grads, stats = dense_layer(d_in, d_out, rows)
  tx = cgfac_optax.scale_by_cgfac(1e-3, solver=solver, max_iters=iters, tol=0.0)
  state = tx.init(params)
  fn = jax.jit(lambda g, s, st: tx.update(g, s, params, layer_stats=st))
  start = time.perf_counter()
  compiled = fn.lower(grads, state, stats).compile()
  compile_s = time.perf_counter() - start
  m = compiled.memory_analysis()
  used = m.argument_size_in_bytes + m.output_size_in_bytes + m.temp_size_in_bytes
  used -= getattr(m, "alias_size_in_bytes", 0)
  time_s = seconds(compiled, grads, state, stats, reps=reps)
  return {"time_s": time_s, "compile_s": compile_s, "memory_bytes": used}


def sweep_cells(args) -> list[tuple[str, int, int]]:
  """``(sweep, rows, d_out)`` of every cell."""
  cells = [("width", args.width_rows, w) for w in args.widths]
  return cells + [("rows", r, args.rows_width) for r in args.rows]


def run_cell(solver: str, sweep: str, rows: int, d_out: int, args, rate: float, free: float):
  flops, need = predicted(solver, args.d_in, d_out, rows, args.iters)
  entry = {"sweep": sweep, "solver": solver, "rows": rows, "d_out": d_out, "d_in": args.d_in}
  entry.update(predicted_s=flops / rate, predicted_bytes=need)
  if need > free:
    entry["skipped"] = f"needs ~{need / 2**30:.1f} GiB > {free / 2**30:.1f} GiB"
  elif flops / rate > args.max_seconds:
    entry["skipped"] = f"predicted ~{flops / rate:.0f} s > {args.max_seconds:g} s"
  else:
    reps = args.reps if flops / rate < 2 else 1
    try:
      entry.update(measure(solver, args.d_in, d_out, rows, args.iters, reps))
    except Exception as e:  # an allocation failure is a result here, not a crash
      entry["skipped"] = f"failed: {type(e).__name__}: {str(e)[:120]}"
  return entry


def run_sweeps(args, rate: float, free: float) -> list[dict]:
  """Every cell of both sweeps per solver; a cell in both (same rows and width) is run once."""
  results, done = [], {}
  for sweep, rows, d_out in sweep_cells(args):
    for solver in args.solvers:
      key = (solver, rows, d_out)
      if key not in done:
        done[key] = run_cell(solver, sweep, rows, d_out, args, rate, free)
      results.append({**done[key], "sweep": sweep})
    print(f"  {sweep} sweep: {rows} rows, d_out {d_out} done", flush=True)
  return results


def size(n: float) -> str:
  return f"{n / 2**20:.3g} MiB" if n >= 2**20 else f"{n / 2**10:.3g} KiB"


def cell(e: dict) -> str:
  if "skipped" in e:
    return "skipped: " + e["skipped"]
  time_ = f"{1e3 * e['time_s']:.3g} ms ({1e3 * e['predicted_s']:.3g})"
  return f"{time_}, {size(e['memory_bytes'])} ({size(e['predicted_bytes'])})"


def tables(results: list[dict], args) -> list[str]:
  out = []
  for sweep, key, fixed in (
    ("width", "d_out", f"{args.width_rows} rows"),
    ("rows", "rows", f"d_out {args.rows_width}"),
  ):
    values = sorted({e[key] for e in results if e["sweep"] == sweep})
    by = {(e[key], e["solver"]): e for e in results if e["sweep"] == sweep}
    rows = [[v, *(cell(by[v, s]) for s in args.solvers)] for v in values]
    title = (
      f"### One solve against {key} (d_in {args.d_in}, {fixed}, CG {args.iters} iterations; "
      "in parentheses: the planner's model)"
    )
    out.append(title + "\n\n" + H.format_table([key, *args.solvers], rows))
  return out


def plot(results: list[dict], args, path: Path, device: str) -> Path:
  import matplotlib

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  fig, axes = plt.subplots(1, 2, figsize=(10, 4))
  for ax, (sweep, key) in zip(axes, (("width", "d_out"), ("rows", "rows"))):
    for solver in args.solvers:
      pts = [e for e in results if e["sweep"] == sweep and e["solver"] == solver]
      ran = [e for e in pts if "skipped" not in e]
      (line,) = ax.plot([e[key] for e in ran], [e["time_s"] for e in ran], "o-", label=solver)
      ax.plot([e[key] for e in pts], [e["predicted_s"] for e in pts], ":", color=line.get_color())
    ax.set(xscale="log", yscale="log", xlabel=key, ylabel="seconds per solve")
    ax.set_title(f"{sweep} sweep on {device} (dotted: the planner's model)", fontsize=9)
    ax.legend(fontsize=7)
  fig.tight_layout()
  path.parent.mkdir(parents=True, exist_ok=True)
  fig.savefig(path, dpi=110)
  plt.close(fig)
  return path


def main(argv=None) -> dict:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--d-in", type=int, default=1024)
  parser.add_argument("--widths", type=int, nargs="+", default=[256, 1024, 4096, 16384, 32768])
  parser.add_argument("--width-rows", type=int, default=256, help="rows in the width sweep")
  parser.add_argument("--rows", type=int, nargs="+", default=[64, 256, 1024, 4096, 8192])
  parser.add_argument("--rows-width", type=int, default=4096, help="width in the rows sweep")
  parser.add_argument("--solvers", nargs="+", default=O.solver_names(), choices=O.solver_names())
  parser.add_argument("--iters", type=int, default=10, help="CG iterations (cold start)")
  parser.add_argument("--reps", type=int, default=3)
  parser.add_argument("--max-seconds", type=float, default=30.0, help="skip longer solves")
  parser.add_argument("--out", type=Path, default=H.RESULTS / "scaling")
  parser.add_argument("--tiny", action="store_true", help="one cell per sweep, seconds long")
  args = parser.parse_args(argv)
  if args.tiny:  # one cell, in both sweeps
    args.d_in, args.widths, args.width_rows, args.rows, args.rows_width = 16, [24], 8, [8], 24
    args.reps, args.max_seconds = 1, 5.0
  info = H.environment(cgfac_optax=cgfac_optax)
  H.print_environment(info)
  rate, free = matmul_rate(), available_bytes()
  print(f"matmul {rate / 1e9:.1f} GFLOP/s; memory cap {free / 2**30:.1f} GiB", flush=True)
  results = run_sweeps(args, rate, free)
  printed = tables(results, args)
  for t in printed:
    print("\n" + t)
  payload = {
    "environment": info,
    "settings": vars(args),
    "matmul_flops_per_s": rate,
    "memory_cap_bytes": free,
    "cpu_count": os.cpu_count(),
    "results": results,
    "tables": printed,
  }
  path = H.write_json("scaling", payload, args.out)
  png = plot(results, args, Path(args.out) / "scaling.png", info["device"])
  print(f"wrote {path} and {png}")
  return payload


if __name__ == "__main__":
  main()
