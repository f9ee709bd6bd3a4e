"""The three tasks side by side and the step breakdown on the accelerator JAX finds: one run.

One prepared script for a GPU machine, sized for a 10-minute slot: twelve runs of ``--budget``
seconds (15 by default) plus their compilation, then the breakdown, whose steps the shared
compilation cache (``--cache``) mostly does not compile again:

1. ``time_to_target.py`` on every task: Adam, Muon, PSGD Kron and ``cgfac()`` at their
   benchmark settings, one seed, ``--budget`` seconds of step time each (kfac-jax is left
   out: its venv has a CPU-only JAX, which would not be a like comparison);
2. ``step_breakdown.py`` on every task: Adam's step against ``cgfac()``'s and its variants,
   and the parts of a step; on the autoencoder also ``--arithmetic``: each ``precision``
   (TF32 or float32 products), bfloat16 curvature and each ``cg_skip`` (not under ``--tiny``).

It prints the device first and writes ``<task>/time_to_target.json``,
``step_breakdown/step_breakdown.json``, ``step_breakdown_arithmetic/step_breakdown.json`` and
``gpu.json`` (the device, the settings and every table) to ``--out``: ``$OUT`` when set, else
``benchmarks/results/gpu/``. Without a GPU it runs on the CPU and says so; ``--tiny`` is the
seconds-long check of the same code on tiny tasks, which needs no GPU.

Run: ``python benchmarks/gpu.py`` (``--tiny --tasks autoencoder`` for a quick check).
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

import harness as H
import jax
import step_breakdown
import tasks as T
import time_to_target

import cgfac_optax

OPTIMIZERS = ("adam", "muon", "psgd_kron", "cgfac")


def main(argv=None) -> dict:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--tasks", nargs="+", default=list(T.TASKS), choices=T.TASKS)
  parser.add_argument("--budget", type=float, default=15.0, help="seconds per optimizer and task")
  parser.add_argument("--cache", default="/tmp/cgfac-gpu-xla-cache", help="XLA compilation cache")
  default_out = Path(os.environ["OUT"]) if os.environ.get("OUT") else H.RESULTS / "gpu"
  parser.add_argument("--out", type=Path, default=default_out, help="default $OUT when set")
  parser.add_argument("--tiny", action="store_true", help="tiny tasks on the CPU, seconds long")
  args = parser.parse_args(argv)
  if not os.environ.get("JAX_COMPILATION_CACHE_DIR"):  # a cache the caller set is kept
    jax.config.update("jax_compilation_cache_dir", args.cache)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
  start = time.perf_counter()
  info = H.environment(cgfac_optax=cgfac_optax)
  print(f"device: {info['device']} x{info['devices']}", flush=True)
  if jax.default_backend() == "cpu" and not args.tiny:
    print("no GPU found: running on the CPU", flush=True)
  tiny = ["--tiny"] if args.tiny else []
  side_by_side = time_to_target.main(
    [*tiny, "--tasks", *args.tasks, "--optimizers", *OPTIMIZERS, "--seeds", "1"]
    + ([] if args.tiny else ["--budget", str(args.budget), "--evals", "10"])
    + ["--out", str(args.out)]
  )
  seconds = {"side_by_side": time.perf_counter() - start}
  breakdown = step_breakdown.main(
    [*tiny, "--tasks", *args.tasks, "--out", str(args.out / "step_breakdown")]
    + ([] if args.tiny else ["--reps", "3", "--steps", "10"])
  )
  if not args.tiny:
    arithmetic = step_breakdown.main(
      ["--tasks", "autoencoder", "--arithmetic", "--reps", "3", "--steps", "10"]
      + ["--out", str(args.out / "step_breakdown_arithmetic")]
    )
    breakdown["autoencoder (arithmetic)"] = arithmetic["autoencoder"]
  seconds["total"] = time.perf_counter() - start
  print(f"\ndevice: {info['device']}; side by side {seconds['side_by_side']:.0f} s, ", end="")
  print(f"total {seconds['total']:.0f} s")
  payload = {
    "environment": info,
    "settings": vars(args),
    "seconds": seconds,
    "time_to_target": {t: r["tables"] for t, r in side_by_side.items()},
    "step_breakdown": {t: r["tables"] for t, r in breakdown.items()},
  }
  path = H.write_json("gpu", payload, args.out)
  print(f"wrote {path}")
  return payload


if __name__ == "__main__":
  main()
