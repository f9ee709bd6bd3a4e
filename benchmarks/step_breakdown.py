"""Where the time of a ``cgfac()`` step goes, per task, against Adam's step.

Whole compiled training steps, as ``time_to_target.py`` runs them (same task, batch and
helpers), interleaved across the variants; each repetition runs ``--steps`` consecutive
steps (a multiple of the curvature's update period, so the amortized parts count at their
share); the median over repetitions of the mean step time:

  ``adam``            Adam: the reference;
  ``cgfac``           ``cgfac()`` as it is;
  ``every_step``      ``cgfac(curvature_every=1)``: the curvature statistics on every step;
  ``fixed_rate``      ``cgfac(learning_rate=...)`` with the same solver and curvature memory:
                      no quadratic model.

and the parts of one step on one batch: ``loss_pass`` (the loss and gradients, what Adam
computes), ``stats_pass`` (the curvature statistics: one forward pass of the curvature
examples and one backward pass to the layer outputs), ``quadratic_model`` (the exact Fisher's
Gram of two directions: ``jax.linearize`` of the curvature model and two Jacobian-vector
products).

Each call's flops are XLA's count for its compiled program (``Compiled.cost_analysis()``),
which counts a loop's body once, a conditional's costlier branch (so an amortized step counts
its curvature update in full), and nothing for LAPACK's decompositions. The first call of
each step, compilation included, is reported as its compile time.

Run: ``python benchmarks/step_breakdown.py --tasks resnet`` (``--tiny`` for a quick check).
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import harness as H
import jax
import numpy as np
import optimizers as O
import tasks as T

import cgfac_optax

VARIANTS = {
  "adam": ("adam", None),
  "cgfac": ("cgfac", {}),
  "every_step": ("cgfac", {"curvature_every": 1}),
  "fixed_rate": ("cgfac", {"learning_rate": 0.05, "kl_clip": None, "momentum": 0.9}),
}


def interleaved(calls: dict, reps: int, n: int) -> dict[str, list[float]]:
  """Mean seconds of ``n`` consecutive calls of each thunk, ``reps`` repetitions interleaved.

  Each thunk returns what to wait for; repetition 0 warms up and is dropped.
  """
  times = {name: [] for name in calls}
  for rep in range(reps + 1):
    for name, call in calls.items():
      start = time.perf_counter()
      for _ in range(n):
        out = call()
      jax.block_until_ready(out)
      if rep:
        times[name].append((time.perf_counter() - start) / n)
  return times


def gflop(fn, *args) -> float | None:
  """XLA's flop count of ``jax.jit(fn)`` on ``args``, in GFLOP (None where none is given)."""
  cost = jax.jit(fn).lower(*args).compile().cost_analysis()
  if isinstance(cost, (list, tuple)):
    cost = cost[0] if cost else None
  flops = (cost or {}).get("flops")
  return None if flops is None or flops < 0 else flops / 1e9


def time_steps(task: T.Task, reps: int, steps: int) -> dict:
  """Median over ``reps`` interleaved repetitions of each variant's mean step time."""
  batches = H.Batches(*task.data[:2], task.batch_size, 0)
  data = [next(batches) for _ in range(8)]
  runs = {}
  for name, (optimizer, settings) in VARIANTS.items():
    settings = O.settings_for(optimizer, task.name) if settings is None else settings
    run = O.make_run(task, O.FACTORIES[optimizer](**settings), optimizer == "cgfac")
    state = {"carry": run.init(0), "i": 0}
    start = time.perf_counter()
    state["carry"], loss = run.step(state["carry"], data[0], 0)
    jax.block_until_ready(loss)
    runs[name] = (run, state, time.perf_counter() - start)

  def call(run, state):
    state["i"] += 1
    state["carry"], loss = run.step(state["carry"], data[state["i"] % len(data)], state["i"])
    return loss

  times = interleaved({n: lambda r=r: call(r[0], r[1]) for n, r in runs.items()}, reps, steps)
  adam = np.array(times["adam"])
  return {
    name: {
      "step_s": H.median(times[name]),
      "ratio_to_adam": H.median(list(np.array(times[name]) / adam)),
      "first_step_s": runs[name][2],
      "times_s": times[name],
    }
    for name in runs
  }


def time_parts(task: T.Task, reps: int, calls: int) -> dict:
  """The loss pass, the stats pass and the quadratic model's Gram, on one batch."""
  params, state = task.init(0)
  x, y = (np.asarray(a[: task.batch_size]) for a in task.data[:2])
  key = jax.random.key(0)
  helper = O.value_grad_and_extra(task)
  extra = helper(params, state, x, y, key)[2]
  model = extra["curvature_model"]
  keys = jax.random.split(jax.random.key(1), 2)
  u, v = (jax.tree.map(lambda a, k=k: 1e-2 * jax.random.normal(k, a.shape), params) for k in keys)

  def loss_pass(params, state, x, y):
    fn = lambda p: T.mean_loss(task, p, state, x, y)
    return jax.value_and_grad(fn, has_aux=True)(params)

  def stats_pass(params, state, x, y, key):
    return helper(params, state, x, y, key)[2]["layer_stats"]()

  def quadratic_model(params, u, v):
    outputs, jvp = jax.linearize(model.outputs_fn, params)
    return outputs, jvp(u), jvp(v)

  parts = {
    "loss_pass": (loss_pass, (params, state, x, y)),
    "stats_pass": (stats_pass, (params, state, x, y, key)),
    "quadratic_model": (quadratic_model, (params, u, v)),
  }
  compiled = {n: jax.jit(f) for n, (f, _) in parts.items()}
  times = interleaved({n: lambda n=n: compiled[n](*parts[n][1]) for n in parts}, reps, calls)
  return {
    n: {"call_s": H.median(t), "gflop": gflop(*parts[n]), "times_s": t} for n, t in times.items()
  }


def main(argv=None) -> dict:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--tasks", nargs="+", default=list(T.TASKS), choices=T.TASKS)
  parser.add_argument("--reps", type=int, default=5)
  parser.add_argument("--steps", type=int, default=20, help="consecutive steps per repetition")
  parser.add_argument("--out", type=Path, default=H.RESULTS / "step_breakdown")
  parser.add_argument("--tiny", action="store_true")
  args = parser.parse_args(argv)
  if args.tiny:
    args.reps, args.steps = 1, 2
  info = H.environment(cgfac_optax=cgfac_optax)
  H.print_environment(info)
  results = {}
  for name in args.tasks:
    task = T.make(name, args.tiny)
    steps, parts = time_steps(task, args.reps, args.steps), time_parts(task, args.reps, args.steps)
    results[name] = {"description": task.description, "steps": steps, "parts": parts}
    rows = [[n, 1e3 * s["step_s"], s["ratio_to_adam"], s["first_step_s"]] for n, s in steps.items()]
    print(f"\n{task.description}, batch {task.batch_size}\n")
    print(H.format_table(["step", "ms", "x Adam", "first call s"], rows))
    rows = [[n, 1e3 * p["call_s"], p["gflop"]] for n, p in parts.items()]
    print("\n" + H.format_table(["part", "ms", "GFLOP"], rows))
  info["load_average_end"] = H.load_average()
  print(f"\nload average {info['load_average']} -> {info['load_average_end']}")
  path = H.write_json("step_breakdown", {"environment": info, "tasks": results}, args.out)
  print(f"wrote {path}")
  return results


if __name__ == "__main__":
  main()
