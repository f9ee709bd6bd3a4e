"""Step time of CG-FAC vs Adam on a small Flax CNN (conv, pooling, dense) at batch 128.

Both optimizers train the same ``flax.linen`` CNN on 8x8 ``load_digits`` images. One step is
everything a training loop does per batch, compiled as one ``jax.jit`` function:

- Adam: ``jax.value_and_grad`` of the mean cross-entropy, ``optax.adam``, apply.
- CG-FAC: ``cgfac_optax.flax.value_grad_and_stats`` (one forward, one backward for the
  empirical Fisher, a second backward for the sampled Fisher), ``cgfac_optax.cgfac`` with
  ``solver="auto"`` (the plan is printed), apply.

Each step is compiled and run ``--warmup`` times first. Then ``--reps`` repetitions, the
optimizers interleaved in alternating order, each time ``--steps`` consecutive steps ended by
``block_until_ready``; the figure is the median over repetitions of the time per step. Prints
the device and versions and writes JSON (default ``benchmarks/results/cnn_step_time.json``).

  python benchmarks/cnn_step_time.py [--batch 128] [--reps 15] [--steps 20] [--out PATH]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from sklearn.datasets import load_digits

import cgfac_optax as cgfac
from cgfac_optax import flax as cflax

RESULTS = Path(__file__).resolve().parent / "results"


class CNN(nn.Module):
  """8x8x1 -> conv3x3 (16) -> tanh -> avgpool 2 -> conv3x3 (32) -> tanh -> avgpool 2 -> dense 10."""

  @nn.compact
  def __call__(self, x):
    x = nn.avg_pool(nn.tanh(nn.Conv(16, (3, 3))(x)), (2, 2), (2, 2))
    x = nn.avg_pool(nn.tanh(nn.Conv(32, (3, 3))(x)), (2, 2), (2, 2))
    return nn.Dense(10)(x.reshape(x.shape[0], -1))


def make_steps(model, x, y):
  """``{name: (jitted step, initial carry)}``; a step maps its carry to the next carry."""
  params = model.init(jax.random.key(0), x)["params"]

  def mean_loss(p):
    logits = model.apply({"params": p}, x)
    return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()

  adam = optax.adam(1e-2)

  @jax.jit
  def adam_step(carry):
    p, s, k = carry
    loss, grads = jax.value_and_grad(mean_loss)(p)
    updates, s = adam.update(grads, s, p)
    return optax.apply_updates(p, updates), s, k, loss

  steps = {"adam": (adam_step, (params, adam.init(params), jax.random.key(1)))}
  for fisher in ("sampled", "empirical"):
    vgs = cflax.value_grad_and_stats(model, loss="softmax_cross_entropy", fisher=fisher)
    tx = cgfac.cgfac(0.3, 0.1, solver="auto")

    @jax.jit
    def cgfac_step(carry, vgs=vgs, tx=tx):
      p, s, k = carry
      k, sub = jax.random.split(k)
      loss, grads, stats = vgs(p, x, y, sub)
      updates, s = tx.update(grads, s, p, layer_stats=stats)
      return optax.apply_updates(p, updates), s, k, loss

    steps[f"cgfac_{fisher}"] = (cgfac_step, (params, tx.init(params), jax.random.key(1)))
  return params, steps


def run(step, carry, n):
  for _ in range(n):
    *carry, loss = step(tuple(carry))
  jax.block_until_ready((carry, loss))
  return tuple(carry)


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--batch", type=int, default=128)
  parser.add_argument("--warmup", type=int, default=5)
  parser.add_argument("--reps", type=int, default=15)
  parser.add_argument("--steps", type=int, default=20)
  parser.add_argument("--out", type=Path, default=RESULTS / "cnn_step_time.json")
  args = parser.parse_args(argv)

  digits = load_digits()
  x = jnp.asarray(digits.images[: args.batch, ..., None] / 16.0, jnp.float32)
  y = jnp.asarray(digits.target[: args.batch])
  model = CNN()
  params, steps = make_steps(model, x, y)
  _, _, stats = cflax.value_grad_and_stats(model)(params, x, y, jax.random.key(0))
  plan = cgfac.plan(params, stats)

  device = jax.devices()[0]
  versions = {
    "python": platform.python_version(),
    "jax": jax.__version__,
    "jaxlib": jax.lib.__version__ if hasattr(jax.lib, "__version__") else None,
    "flax": flax.__version__,
    "optax": optax.__version__,
    "numpy": np.__version__,
  }
  host = f"{platform.machine()}, {os.cpu_count()} CPUs"
  print(f"device: {device.platform} {device.device_kind}; host: {host}")
  print("versions:", versions)
  print(f"batch {args.batch}; plan (solver='auto'):\n{plan}")

  load_before = os.getloadavg()
  carries = {}
  for name, (step, carry) in steps.items():
    carries[name] = run(step, carry, args.warmup)  # compile, then settle
  times = {name: [] for name in steps}
  names = list(steps)
  for rep in range(args.reps):
    for name in names if rep % 2 == 0 else names[::-1]:
      step, _ = steps[name]
      start = time.perf_counter()
      carries[name] = run(step, carries[name], args.steps)
      times[name].append((time.perf_counter() - start) / args.steps)

  load = {"before": load_before, "after": os.getloadavg(), "cpus": os.cpu_count()}
  print(f"load average (1, 5, 15 min) before {load['before']}, after {load['after']}")
  median = {name: statistics.median(t) for name, t in times.items()}
  ratios = {name: median[name] / median["adam"] for name in names if name != "adam"}
  for name in names:
    extra = f"  ratio to adam {ratios[name]:.2f}" if name in ratios else ""
    print(f"{name:>16}: median {median[name] * 1e3:.3f} ms/step{extra}")
  result = {
    "benchmark": "cnn_step_time",
    "command": " ".join([Path(sys.argv[0]).name, *(argv if argv is not None else sys.argv[1:])]),
    "device": {"platform": device.platform, "kind": device.device_kind, "host": host},
    "versions": versions,
    "batch": args.batch,
    "warmup": args.warmup,
    "reps": args.reps,
    "steps_per_rep": args.steps,
    "plan": {p: lp.solver for p, lp in plan.items()},
    "plan_table": str(plan),
    "seconds_per_step": times,
    "median_seconds_per_step": median,
    "ratio_to_adam": ratios,
    "load_average": load,
    "note": "CPU timings may include other processes' load; compare ratios from one run only.",
  }
  args.out.parent.mkdir(parents=True, exist_ok=True)
  args.out.write_text(json.dumps(result, indent=2))
  print(f"wrote {args.out}")
  return result


if __name__ == "__main__":
  main()
