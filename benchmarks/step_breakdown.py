"""Where the time of a ``cgfac()`` step goes, per task, against Adam's step.

Whole compiled training steps, as ``time_to_target.py`` runs them (same task, batch and
helpers), interleaved across the variants; each repetition runs ``--steps`` consecutive
steps (a multiple of the curvature's update period, so the amortized parts count at their
share); the median over repetitions of the mean step time:

  ``adam``            Adam: the reference;
  ``cgfac``           ``cgfac()`` as it is;
  ``every_step``      ``cgfac(curvature_every=1)``: the curvature statistics on every step;
  ``fixed_rate``      ``cgfac(learning_rate=1e-3)`` (momentum and KL clipping) with all else
                      as ``cgfac()`` resolves it (each layer's solver from
                      ``cgfac_optax.plan``, the curvature memory, ``curvature_every``,
                      ``weight_sharing`` as ``"auto"`` picks it, ``max_iters``, the damping):
                      the step policy alone differs, a fixed rate instead of the quadratic
                      model.

and the parts of one step on one batch: ``loss_pass`` (the loss and gradients, what Adam
computes), ``stats_pass`` (the curvature statistics: one forward pass of the curvature
examples and one backward pass to the layer outputs), ``quadratic_model`` (the exact Fisher's
Gram of two directions: ``jax.linearize`` of the curvature model and two Jacobian-vector
products). ``--arithmetic`` adds ``cgfac()`` at each ``precision`` (``"highest"``,
``"default"``: TF32 on a GPU), with ``curvature_dtype="bfloat16"``, and with each ``cg_skip``.

Each call's flops are XLA's count for its compiled program (``Compiled.cost_analysis()``),
which counts a loop's body once, a conditional's costlier branch (so an amortized step counts
its curvature update in full), and nothing for LAPACK's decompositions. Every program is
compiled ahead of time (``lower().compile()``, reported as its compile time) before the clock
starts.

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

# cgfac()'s options besides its step policy, as its docstring gives them (the tests check them
# against the library's): the fixed-rate variant keeps them all.
CGFAC_RESOLVED = {
  "damping": {"initial": 1e-2, "minimum": 1e-5},
  "max_iters": 1,
  "curvature_decay": 0.95,
  "refresh_every": 20,
  "curvature_every": 10,
  "weight_sharing": "auto",
}


# With --arithmetic: cgfac() with each arithmetic option set (one of each pair is the
# platform's default, so each pair compares the platform's choice with the other).
ARITHMETIC = {
  "precision_highest": {"precision": "highest"},
  "precision_default": {"precision": "default"},
  "bfloat16_curvature": {"curvature_dtype": "bfloat16"},
  "cg_skip_mask": {"cg_skip": "mask"},
  "cg_skip_cond": {"cg_skip": "cond"},
}


def variants(task: T.Task, arithmetic: bool = False) -> dict[str, tuple[str, dict]]:
  """``{variant: (optimizer, settings)}``; the fixed-rate one with ``cgfac()``'s solvers."""
  plan = O.cgfac_plan(task)
  # The fixed-rate mode has no curvature model to choose from: it gets what "auto" chose.
  sharing = {"weight_sharing": plan.weight_sharing or "expand"}
  fixed = {"learning_rate": 1e-3, "solver": plan.solvers(), **CGFAC_RESOLVED, **sharing}
  chosen = {
    "adam": ("adam", O.settings_for("adam", task.name)),
    "cgfac": ("cgfac", {}),
    "every_step": ("cgfac", {"curvature_every": 1}),
    "fixed_rate": ("cgfac", fixed),
  }
  extra = ARITHMETIC if arithmetic else {}
  return chosen | {name: ("cgfac", settings) for name, settings in extra.items()}


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


def gflop(compiled) -> float | None:
  """XLA's flop count of a compiled program, in GFLOP (None where none is given)."""
  cost = compiled.cost_analysis()
  if isinstance(cost, (list, tuple)):
    cost = cost[0] if cost else None
  flops = (cost or {}).get("flops")
  return None if flops is None or flops < 0 else flops / 1e9


def ahead_of_time(fn, *args):
  """``(compiled, seconds to lower and compile it)``: timed calls then run no compilation."""
  start = time.perf_counter()
  compiled = fn.lower(*args).compile()
  return compiled, time.perf_counter() - start


def time_steps(task: T.Task, chosen: dict, reps: int, steps: int) -> dict:
  """Median over ``reps`` interleaved repetitions of each variant's mean step time."""
  batches = H.Batches(*task.data[:2], task.batch_size, 0)
  data = [next(batches) for _ in range(8)]
  runs = {}
  for name, (optimizer, settings) in chosen.items():
    run = O.make_run(task, O.FACTORIES[optimizer](**settings), optimizer == "cgfac")
    carry = run.init(0)
    compiled, compile_s = ahead_of_time(run.update, *carry[:3], *data[0], carry[3])
    runs[name] = {"step": O.stepper(compiled), "carry": carry, "i": 0}
    runs[name].update(compile_s=compile_s, gflop=gflop(compiled))

  def call(r):
    r["i"] += 1
    r["carry"], loss = r["step"](r["carry"], data[r["i"] % len(data)], r["i"])
    return loss

  times = interleaved({n: lambda r=r: call(r) for n, r in runs.items()}, reps, steps)
  adam = np.array(times["adam"])
  return {
    name: {
      "step_s": H.median(times[name]),
      "ratio_to_adam": H.median(list(np.array(times[name]) / adam)),
      "compile_s": r["compile_s"],
      "gflop": r["gflop"],
      "last_loss": float(call(r)),
      "times_s": times[name],
    }
    for name, r in runs.items()
  }


def time_parts(task: T.Task, reps: int, calls: int) -> dict:
  """The loss pass, the stats pass and the quadratic model's Gram, on one batch."""
  params, state = task.init(0)
  x, y = (np.asarray(a[: task.batch_size]) for a in task.data[:2])
  key = jax.random.key(0)
  helper = O.value_grad_and_extra(task)
  keys = jax.random.split(jax.random.key(1), 2)
  u, v = (jax.tree.map(lambda a, k=k: 1e-2 * jax.random.normal(k, a.shape), params) for k in keys)

  def loss_pass(params, state, x, y):
    fn = lambda p: T.mean_loss(task, p, state, x, y)
    return jax.value_and_grad(fn, has_aux=True)(params)

  def stats_pass(params, state, x, y, key):
    return helper(params, state, x, y, key)[2]["layer_stats"]()

  def quadratic_model(params, state, x, y, key, u, v):
    # Only the curvature model's outputs reach the result: XLA drops the rest of the helper.
    model = helper(params, state, x, y, key)[2]["curvature_model"]
    outputs, jvp = jax.linearize(model.outputs_fn, params)
    return outputs, jvp(u), jvp(v)

  parts = {
    "loss_pass": (loss_pass, (params, state, x, y)),
    "stats_pass": (stats_pass, (params, state, x, y, key)),
    "quadratic_model": (quadratic_model, (params, state, x, y, key, u, v)),
  }
  compiled = {n: ahead_of_time(jax.jit(f), *args)[0] for n, (f, args) in parts.items()}
  times = interleaved({n: lambda n=n: compiled[n](*parts[n][1]) for n in parts}, reps, calls)
  return {
    n: {"call_s": H.median(t), "gflop": gflop(compiled[n]), "times_s": t} for n, t in times.items()
  }


def main(argv=None) -> dict:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--tasks", nargs="+", default=list(T.TASKS), choices=T.TASKS)
  parser.add_argument("--reps", type=int, default=5)
  parser.add_argument("--steps", type=int, default=20, help="consecutive steps per repetition")
  parser.add_argument("--out", type=Path, default=H.RESULTS / "step_breakdown")
  parser.add_argument("--arithmetic", action="store_true", help="add the ARITHMETIC variants")
  parser.add_argument("--tiny", action="store_true")
  args = parser.parse_args(argv)
  if args.tiny:
    args.reps, args.steps = 1, 2
  info = H.environment(cgfac_optax=cgfac_optax)
  H.print_environment(info)
  results = {}
  for name in args.tasks:
    task = T.make(name, args.tiny)
    chosen = variants(task, args.arithmetic)
    steps = time_steps(task, chosen, args.reps, args.steps)
    parts = time_parts(task, args.reps, args.steps)
    rows = [
      [n, 1e3 * s["step_s"], s["ratio_to_adam"], s["gflop"], s["compile_s"]]
      for n, s in steps.items()
    ]
    tables = {"steps": H.format_table(["step", "ms", "x Adam", "GFLOP", "compile s"], rows)}
    rows = [[n, 1e3 * p["call_s"], p["gflop"]] for n, p in parts.items()]
    tables["parts"] = H.format_table(["part", "ms", "GFLOP"], rows)
    results[name] = {
      "description": task.description,
      "batch_size": task.batch_size,
      "variants": {n: {"optimizer": o, "settings": s} for n, (o, s) in chosen.items()},
      "steps": steps,
      "parts": parts,
      "tables": tables,
    }
    print(f"\n{task.description}, batch {task.batch_size}\n")
    print(tables["steps"] + "\n\n" + tables["parts"], flush=True)
  info["load_average_end"] = H.load_average()
  print(f"\nload average {info['load_average']} -> {info['load_average_end']}")
  payload = {"environment": info, "settings": vars(args), "tasks": results}
  path = H.write_json("step_breakdown", payload, args.out)
  print(f"wrote {path}")
  return results


if __name__ == "__main__":
  main()
