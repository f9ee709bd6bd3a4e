"""Step cost and time to target on the accelerator JAX finds (GPU when there is one), short runs.

Runs ``step_cost.py`` (batch 256 and 1024) and ``time_to_target.py`` (the MNIST
autoencoder, one seed, a short budget) in this process and prints the device
first. Without a GPU it runs on the CPU and says so; ``--tiny`` is the
seconds-long check CI runs.

Run: ``python benchmarks/gpu.py`` (``--tiny`` for a seconds-long check).
"""

from __future__ import annotations

import argparse

import _common as C
import jax
import step_cost
import time_to_target


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--budget", type=float, default=20.0, help="seconds per time-to-target run")
  parser.add_argument("--seeds", type=int, default=1)
  parser.add_argument("--out", default=None)
  parser.add_argument("--tiny", action="store_true", help="seconds-long check")
  args = parser.parse_args(argv)

  dev = jax.devices()[0]
  kind = getattr(dev, "device_kind", str(dev))
  print(f"device: {dev.platform} ({kind}), {len(jax.devices())} device(s)")
  if dev.platform == "cpu":
    print("no GPU found: running on the CPU")
  common = ["--out", args.out] if args.out else []
  tiny = ["--tiny"] if args.tiny else []
  step = step_cost.main([*tiny, *common, "--reps", "5", "--steps", "5"])
  ttt = time_to_target.main(
    [
      *tiny,
      *common,
      "--tasks",
      "autoencoder-mnist",
      # kfac-jax's venv has CPU JAX only: on an accelerator it would not be a like comparison.
      "--optimizers",
      "adam",
      "muon",
      "cgfac",
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
  print(f"load average {info['load_average']}")


if __name__ == "__main__":
  main()
