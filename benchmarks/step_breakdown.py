"""Where the time of a ``cgfac()`` step goes, on the time-to-target autoencoder.

Whole compiled training steps (as ``time_to_target.py`` runs them: same model,
data, batch and sampled-Fisher pass), interleaved across the variants, each
repetition ``--steps`` consecutive steps (one refresh period of the
preconditioner's inverses by default, so the refresh is counted at its share); the median over
repetitions of the mean step time:

  ``adam``        Adam (its forward, backward and update): the reference;
  ``cgfac``       ``cgfac()`` as it is;
  ``direct``      ``cgfac(solver="kfac_inverse")``: the same without the CG iteration
                  (K-FAC's factored-damping solve alone);
  ``fixed_rate``  the default solver, curvature memory and adaptive damping with a fixed
                  learning rate and no KL clipping: no quadratic model.

The differences price the parts: ``cgfac - direct`` is the CG iteration (its two
Kronecker products and the preconditioner's second application), ``cgfac -
fixed_rate`` the step sizes from the quadratic model. The same run also times,
on one batch, the model's forward pass alone and the quadratic model's Gram
matrix of two directions (``jax.linearize`` and two Jacobian-vector products).

Each variant's flops are XLA's own count for its compiled step
(``Compiled.cost_analysis()``), which counts a loop's body once (CG's, one iteration
by default: right for the default ``max_iters=1``), a conditional's costlier branch,
and nothing for LAPACK's decompositions (the refresh's LU inverses, one step in
``--steps``, take time the count leaves out). Counted flops over the measured step
time give the rate the step ran at, to set against the machine's matrix-multiply rate.

Run: ``python benchmarks/step_breakdown.py`` (``--tiny`` for a seconds-long check).
"""

from __future__ import annotations

import argparse
import os
import time

import _common as C
import jax
import jax.numpy as jnp
import numpy as np
import time_to_target as T
from tqdm import tqdm

import cgfac_optax
from cgfac_optax._alias import ADAPTIVE_DEFAULTS
from cgfac_optax._quadratic import gram

VARIANTS = {
  "adam": ("adam", {"learning_rate": 3e-4}),
  "cgfac": ("cgfac", {"learning_rate": None}),
  "direct": ("cgfac", {"learning_rate": None, "solver": "kfac_inverse"}),
  "fixed_rate": ("cgfac", {**ADAPTIVE_DEFAULTS, "learning_rate": 1e-3, "kl_clip": None}),
}


def interleaved(calls: dict, reps: int, n: int) -> dict[str, list[float]]:
  """Mean seconds of ``n`` consecutive calls of each thunk, ``reps`` repetitions interleaved.

  Each thunk returns what to wait for; repetition 0 warms up and is dropped.
  """
  times = {name: [] for name in calls}
  with tqdm(total=reps * len(calls), desc="timing", leave=False) as bar:
    for rep in range(reps + 1):
      for name, call in calls.items():
        start = time.perf_counter()
        for _ in range(n):
          out = call()
        C.block(out)
        if rep:
          times[name].append((time.perf_counter() - start) / n)
          bar.update()
  return times


def xla_gflop(compiled) -> float | None:
  """XLA's flop count of a compiled function, in GFLOP (``None`` where the backend gives none)."""
  cost = compiled.cost_analysis()
  if isinstance(cost, (list, tuple)):  # older JAX: one dict per device program
    cost = cost[0] if cost else None
  flops = (cost or {}).get("flops")
  return None if flops is None or flops < 0 else flops / 1e9


def time_steps(task: T.Task, reps: int, steps: int) -> dict:
  """Median over ``reps`` interleaved repetitions of each variant's mean step time."""
  compiled = T.Compiled(task, "sampled")
  batches = T.Batches(task.x, task.y, task.batch_size, 0)
  data = [next(batches) for _ in range(8)]
  key, counter, runs = jax.random.key(0), [0], {}
  for name, (factory, settings) in tqdm(VARIANTS.items(), desc="compile", leave=False):
    fn, tx, compile_s = compiled(factory, settings)
    params = task.init_params(0)
    lr = jnp.float32(settings["learning_rate"] or 0.0)
    runs[name] = {
      "fn": fn,
      "carry": (params, tx.init(params)),
      "lr": lr,
      "compile_s": compile_s,
      "gflop": xla_gflop(fn),
    }

  def step(r):
    i = counter[0]
    params, state, r["loss"] = r["fn"](*r["carry"], *data[i % len(data)], key, i, r["lr"])
    r["carry"], counter[0] = (params, state), i + 1
    return params, r["loss"]

  times = interleaved({name: lambda r=r: step(r) for name, r in runs.items()}, reps, steps)
  adam = np.array(times["adam"])
  return {
    name: {
      "step_s": C.median(times[name]),
      "ratio_to_adam": C.median(np.array(times[name]) / adam),
      "compile_s": r["compile_s"],
      "gflop": r["gflop"],
      "last_training_loss": float(r["loss"]),
      "times_s": times[name],
    }
    for name, r in runs.items()
  }


def time_quadratic_model(task: T.Task, reps: int, calls: int) -> dict:
  """The forward pass alone and the quadratic model's 2x2 Gram, on one batch."""
  params = task.init_params(0)
  x = jnp.asarray(task.x[: task.batch_size])
  model = cgfac_optax.CurvatureModel(lambda p: C.forward(task.layers, p, x)[0], task.loss)
  keys = jax.random.split(jax.random.key(1), 2)
  u, v = [
    jax.tree.map(lambda a, k=k: 1e-2 * jax.random.normal(k, a.shape, a.dtype), params) for k in keys
  ]
  # Compiled once, ahead of time: the same executables are timed and counted.
  forward = jax.jit(model.outputs_fn).lower(params).compile()
  gram_of_two = jax.jit(lambda p, u, v: gram(model, p, [u, v])).lower(params, u, v).compile()
  calls_by_name = {"forward": (forward, (params,)), "gram_of_two": (gram_of_two, (params, u, v))}
  times = interleaved(
    {n: lambda f=f, a=a: f(*a) for n, (f, a) in calls_by_name.items()}, reps, calls
  )
  return {
    name: {"call_s": C.median(t), "gflop": xla_gflop(calls_by_name[name][0]), "times_s": t}
    for name, t in times.items()
  }


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--task", default="autoencoder-fashion", help="a time_to_target.py task")
  parser.add_argument("--batch-size", type=int, default=512)
  parser.add_argument("--reps", type=int, default=5, help="interleaved repetitions (median)")
  parser.add_argument("--steps", type=int, default=None, help="default: refresh_every")
  parser.add_argument("--out", default=None, help="output folder (default $OUT or results/)")
  parser.add_argument("--tiny", action="store_true", help="small model, seconds-long check")
  args = parser.parse_args(argv)
  args.out = args.out or os.environ.get("OUT") or None
  args.steps = args.steps or ADAPTIVE_DEFAULTS["refresh_every"]
  if args.tiny:
    args.task = "autoencoder-mnist"
    args.batch_size, args.reps, args.steps = 64, 1, 2

  load_start = os.getloadavg()
  info = C.environment()
  C.print_environment(info)
  task = T.Task(args.task, args.tiny, args.batch_size, 512 if args.tiny else None)
  steps = time_steps(task, args.reps, args.steps)
  parts = time_quadratic_model(task, args.reps, args.steps)
  info["load_average_start"] = list(load_start)
  info["load_average_end"] = list(os.getloadavg())

  ms = {name: 1e3 * r["step_s"] for name, r in steps.items()}
  gf = {name: r["gflop"] for name, r in steps.items()}
  gf.update({name: r["gflop"] for name, r in parts.items()})
  ms.update({name: 1e3 * r["call_s"] for name, r in parts.items()})

  def minus(a, b):
    return None if gf[a] is None or gf[b] is None else gf[a] - gf[b]

  def row(label, t, flop, ratio=None, compile_s=None):
    rate = None if flop is None or t <= 0 else flop / (t / 1e3)
    return [label, t, ratio, flop, rate, compile_s]

  rows = [row(n, ms[n], gf[n], r["ratio_to_adam"], r["compile_s"]) for n, r in steps.items()]
  rows += [
    row("CG iteration (cgfac - direct)", ms["cgfac"] - ms["direct"], minus("cgfac", "direct")),
    row(
      "quadratic model (cgfac - fixed_rate)",
      ms["cgfac"] - ms["fixed_rate"],
      minus("cgfac", "fixed_rate"),
    ),
    row("forward pass alone", ms["forward"], gf["forward"]),
    row("Gram of two directions alone", ms["gram_of_two"], gf["gram_of_two"]),
  ]
  table = C.format_table(["step or part", "ms", "x Adam", "GFLOP", "GFLOP/s", "compile s"], rows)
  print(f"### {args.task}, batch {args.batch_size}, {args.steps} steps a repetition\n\n{table}\n")
  print(f"load average {load_start} -> {info['load_average_end']}")
  payload = {
    "environment": info,
    "settings": vars(args),
    "variants": {k: {"optimizer": f, "settings": s} for k, (f, s) in VARIANTS.items()},
    "steps": steps,
    "parts": parts,
    "table": table,
  }
  path = C.write_json("step_breakdown", payload, args.out)
  fig, (ax,) = C.new_figure(1, width=6.5)
  names = [r[0] for r in rows]
  ax.barh(names, [r[1] for r in rows], color=["tab:blue"] * len(steps) + ["tab:orange"] * 4)
  ax.set_xlabel(f"ms ({info['device']}, {info['cpu_count']} cores)")
  ax.set_title(f"{args.task}: step time and its parts", fontsize=9)
  ax.invert_yaxis()
  png = C.save_figure(fig, "step_breakdown", args.out)
  print(f"wrote {path} and {png}")
  return payload


if __name__ == "__main__":
  main()
