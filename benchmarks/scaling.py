"""Time and memory of one curvature solve for a single dense layer, per solver, as it grows.

Two sweeps of one ``scale_by_cgfac`` update (statistics preparation plus solve)
for a dense layer with ``--d-in`` inputs (plus bias): the number of outputs
(256 ... 32768) at a fixed number of curvature rows, and the rows (64 ... 8192) at
a fixed width. CG runs from a cold start with ``max_iters`` iterations (the worst
case: a warm start only makes it cheaper). A solve whose predicted working set
(the solver record's cost model) exceeds the available memory, or whose predicted time
exceeds ``--max-seconds``, is not run and is reported as such: this is where
standard K-FAC (``eigh``) runs out. Memory is XLA's buffer assignment for the
compiled update (arguments + outputs + temporaries), which is also what a GPU
would need.

Run: ``python benchmarks/scaling.py`` (``--tiny`` for a seconds-long check).
"""

from __future__ import annotations

import argparse
import os
import time

import _common as C
import jax
import jax.numpy as jnp
import numpy as np
from tqdm import tqdm

from cgfac_optax._layers import LayerShape
from cgfac_optax._solvers import SOLVERS


def predicted(solver: str, rows: int, d_a: int, d_g: int, iters: int) -> tuple[float, float]:
  """(flops, bytes) of one solve: the solver record's cost model, plus the d_A x d_G vectors.

  Besides its curvature data a solve holds about eight ``d_A x d_G`` arrays (gradient, solution,
  warm start, CG's r, p and Ap, update, state) and the stats' rows.
  """
  shape = LayerShape(rows, d_a, d_g)
  record = SOLVERS[solver]
  words = 8 * d_a * d_g + rows * (d_a + d_g) + record.memory(shape)
  return float(record.flops(shape, iters, 1)), float(4 * words)


def available_bytes() -> float:
  dev = jax.devices()[0]
  if dev.platform != "cpu":
    stats = dev.memory_stats() or {}
    if "bytes_limit" in stats:
      return 0.8 * (stats["bytes_limit"] - stats.get("bytes_in_use", 0))
  try:
    with open("/proc/meminfo") as f:
      for line in f:
        if line.startswith("MemAvailable"):
          return 0.6 * 1024 * float(line.split()[1])
  except OSError:
    pass
  return 0.6 * os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def matmul_rate() -> float:
  """Measured float32 matmul flops per second on this device (for the time prediction)."""
  x = jax.random.normal(jax.random.key(0), (1024, 1024))
  f = jax.jit(lambda x: x @ x)
  f(x).block_until_ready()
  times = []
  for _ in range(5):
    t, _ = C.timed(lambda: f(x))
    times.append(t)
  return 2 * 1024**3 / C.median(times)


def measure(solver, rows, d_in, d_out, *, iters, reps, seed=0):
  import cgfac_optax

  key = jax.random.split(jax.random.key(seed), 5)
  params = {"dense": {"kernel": jnp.zeros((d_in, d_out)), "bias": jnp.zeros((d_out,))}}
  grads = {
    "dense": {
      "kernel": jax.random.normal(key[0], (d_in, d_out)),
      "bias": jax.random.normal(key[1], (d_out,)),
    }
  }
  stats = {
    "dense": cgfac_optax.DenseStats(
      jnp.tanh(jax.random.normal(key[2], (rows, d_in))), jax.random.normal(key[3], (rows, d_out))
    )
  }
  tx = cgfac_optax.scale_by_cgfac(1e-3, solver=solver, max_iters=iters, tol=0.0)
  state = tx.init(params)
  fn = jax.jit(lambda g, s, st: tx.update(g, s, params, layer_stats=st))
  start = time.perf_counter()
  compiled = fn.lower(grads, state, stats).compile()
  compile_s = time.perf_counter() - start
  mem = compiled.memory_analysis()
  peak = None
  if mem is not None:
    peak = (
      mem.argument_size_in_bytes
      + mem.output_size_in_bytes
      + mem.temp_size_in_bytes
      - getattr(mem, "alias_size_in_bytes", 0)
    )
  times = []
  for _ in range(reps + 1):
    t, _ = C.timed(lambda: compiled(grads, state, stats))
    times.append(t)
  return {"time_s": C.median(times[1:]), "compile_s": compile_s, "memory_bytes": peak}


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--d-in", type=int, default=1024)
  parser.add_argument("--widths", type=int, nargs="+", default=[256, 1024, 4096, 16384, 32768])
  parser.add_argument("--width-rows", type=int, default=256, help="rows in the width sweep")
  parser.add_argument("--rows", type=int, nargs="+", default=[64, 256, 1024, 4096, 8192])
  parser.add_argument("--rows-width", type=int, default=4096, help="width in the rows sweep")
  parser.add_argument("--solvers", nargs="+", default=list(SOLVERS))
  parser.add_argument("--iters", type=int, default=10, help="CG iterations (cold start)")
  parser.add_argument("--reps", type=int, default=3)
  parser.add_argument(
    "--max-seconds",
    type=float,
    default=30.0,
    help="skip a solve predicted to take longer than this",
  )
  parser.add_argument("--out", default=None)
  parser.add_argument("--tiny", action="store_true", help="small grid, seconds-long check")
  args = parser.parse_args(argv)
  if args.tiny:
    # One cell per sweep (each solver compiles once per cell), with d_out above d_in in one and
    # below it in the other: both sides of the solvers' shape-dependent branches.
    args.d_in, args.widths, args.width_rows = 64, [128], 16
    args.rows, args.rows_width, args.reps = [8], 64, 1
    args.max_seconds = 5.0

  info = C.environment()
  C.print_environment(info)
  rate = matmul_rate()
  budget = available_bytes()
  print(f"matmul rate {rate / 1e9:.1f} GFLOP/s; memory cap {budget / 2**30:.1f} GiB")
  cells = [("width", args.width_rows, w) for w in args.widths]
  cells += [("rows", r, args.rows_width) for r in args.rows]
  results = []
  for sweep, rows, width in tqdm(cells, desc="grid"):
    for solver in args.solvers:
      flops, need = predicted(solver, rows, args.d_in + 1, width, args.iters)
      entry = {
        "sweep": sweep,
        "solver": solver,
        "rows": rows,
        "d_out": width,
        "d_in": args.d_in,
        "predicted_gflop": flops / 1e9,
        "predicted_bytes": need,
      }
      if need > budget:
        entry["skipped"] = f"needs ~{need / 2**30:.1f} GiB > {budget / 2**30:.1f} GiB"
      elif flops / rate > args.max_seconds:
        entry["skipped"] = f"predicted ~{flops / rate:.0f} s > {args.max_seconds:g} s"
      else:
        reps = args.reps if flops / rate < 2 else 1
        try:
          entry.update(measure(solver, rows, args.d_in, width, iters=args.iters, reps=reps))
        except Exception as e:  # an allocation failure is a result here, not a crash
          entry["skipped"] = f"failed: {type(e).__name__}: {str(e)[:120]}"
      results.append(entry)

  tables = []
  for sweep, key, fixed in (
    ("width", "d_out", f"rows {args.width_rows}"),
    ("rows", "rows", f"d_out {args.rows_width}"),
  ):
    values = sorted({e[key] for e in results if e["sweep"] == sweep})
    rows_out = []
    for v in values:
      row = [v]
      for solver in args.solvers:
        e = next(
          e for e in results if e["sweep"] == sweep and e[key] == v and e["solver"] == solver
        )
        if "skipped" in e:
          row.append("skipped: " + e["skipped"])
        else:
          mem = e["memory_bytes"]
          row.append(
            f"{1e3 * e['time_s']:.3g} ms, {mem / 2**20:.3g} MiB"
            if mem
            else f"{1e3 * e['time_s']:.3g} ms"
          )
      rows_out.append(row)
    title = f"### One solve vs {key} (d_in {args.d_in}, {fixed}, CG {args.iters} iterations)"
    tables.append(title + "\n\n" + C.format_table([key, *args.solvers], rows_out))
    print(tables[-1] + "\n")

  payload = {
    "environment": info,
    "settings": vars(args),
    "matmul_flops_per_s": rate,
    "memory_cap_bytes": budget,
    "results": results,
    "tables": tables,
  }
  path = C.write_json("scaling", payload, args.out)
  fig, axes = C.new_figure(4, width=4.2)
  for col, (sweep, key) in enumerate((("width", "d_out"), ("rows", "rows"))):
    ax_t, ax_m = axes[2 * col], axes[2 * col + 1]
    for solver in args.solvers:
      pts = [e for e in results if e["sweep"] == sweep and e["solver"] == solver]
      ok = [e for e in pts if "skipped" not in e]
      (line,) = ax_t.plot([e[key] for e in ok], [e["time_s"] for e in ok], "o-", label=solver)
      ax_m.plot(
        [e[key] for e in ok],
        [(e["memory_bytes"] or np.nan) / 2**20 for e in ok],
        "o-",
        color=line.get_color(),
        label=solver,
      )
      skipped = [e for e in pts if "skipped" in e]
      if skipped:
        ax_t.plot(
          [e[key] for e in skipped],
          [e["predicted_gflop"] * 1e9 / rate for e in skipped],
          "x",
          color=line.get_color(),
          ms=9,
        )
    for ax, label in ((ax_t, "seconds per solve (x: skipped, predicted)"), (ax_m, "MiB")):
      ax.set_xscale("log", base=2)
      ax.set_yscale("log")
      ax.set_xlabel(key)
      ax.set_ylabel(label)
      ax.legend(fontsize=7)
    ax_t.set_title(f"time vs {key} ({info['device']})")
    ax_m.set_title(f"memory vs {key}")
  png = C.save_figure(fig, "scaling", args.out)
  print(f"wrote {path} and {png}")
  return payload


if __name__ == "__main__":
  main()
