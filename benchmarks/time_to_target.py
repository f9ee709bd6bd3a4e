"""Loss against wall-clock time: Adam, Muon, PSGD Kron, kfac-jax and CG-FAC side by side.

Every optimizer trains the same initial parameters on the same batches in the same order
(both follow the seed), one after the other, for ``--budget`` seconds of step time after
compilation; evaluations happen with the clock paused. With ``--tune`` each optimizer first
runs each of its three ``GRIDS`` settings (``optimizers.py``) on the first seed for
``--tune-budget`` seconds and keeps the one with the lowest final evaluation loss: the same
budget for all. The tables give each optimizer's best evaluation loss (median over seeds),
its step time, and the fraction of the budget it needs to reach each peer's best; the
classification tasks add the same for the test accuracy. Tasks: ``tasks.py``. kfac-jax
trains in its own venv (``kfac_jax_runner.py``) on the tasks its worker supports; a task it
skips says why, in the output and in the JSON's ``skipped``. Each task's JSON and PNG go to
``<--out>/<task>/time_to_target.{json,png}``.

  python benchmarks/time_to_target.py --tasks resnet --tune   # ~45 min per task on 2 cores
  python benchmarks/time_to_target.py --tiny                  # a seconds-long check

``--settings NAME=JSON`` runs one optimizer with the given settings in place of its default
(``SETTINGS`` in ``optimizers.py``), e.g. an option of ``cgfac()`` at equal steps with Adam:

  python benchmarks/time_to_target.py --tasks transformer --optimizers adam cgfac --seeds 1 \\
    --budget 600 --max-steps 400 --settings 'cgfac={"curvature_every": 1, "damping": 0.001}'
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

import harness as H
import jax
import kfac_jax_runner
import optax
import optimizers as O
import tasks as T

import cgfac_optax


def one_run(task: T.Task, name: str, settings: dict, seed: int, budget: float, args) -> dict:
  """Compiles (off the clock) and trains one setting of one optimizer on one seed."""
  tx = O.FACTORIES[name](**settings)
  run = O.make_run(task, tx, uses_curvature=name.startswith("cgfac"))
  x, y = task.data[:2]
  compile_s = H.compile_and_warm(
    run.step, run.init(seed), H.Batches(x, y, task.batch_size, seed + 1), run.evaluate, 2
  )
  out = H.train_for(
    run.step,
    run.init(seed),
    H.Batches(x, y, task.batch_size, seed),
    run.evaluate,
    budget,
    args.evals,
    args.max_steps,
  )
  out.update(seed=seed, settings=settings, compile_s=compile_s)
  return out


def final_loss(run: dict) -> float:
  return math.inf if run["diverged"] else run["curve"]["loss"][-1]


def run_optimizer(task: T.Task, name: str, args) -> dict:
  """Tunes (``--tune``) on the first seed, then runs the chosen setting on every seed."""
  seeds = list(range(args.seed, args.seed + args.seeds))

  def runs(settings_list, seed_list, budget):
    if name == "kfac_jax":
      return kfac_jax_runner.run(task.name, args.tiny, settings_list, seed_list, budget, args)
    return [one_run(task, name, s, seed, budget, args) for s in settings_list for seed in seed_list]

  out = {"tuning": None}
  if args.tune:
    tried = runs(grid_for(name, task.name), seeds[:1], args.tune_budget)
    chosen = min(tried, key=final_loss)
    out["tuning"] = [{"settings": r["settings"], "final_loss": final_loss(r)} for r in tried]
    for r in tried:
      mark = "*" if r is chosen else " "
      print(f"  {mark} tune {name} {H.brief(r['settings'])}: {final_loss(r):.4g}", flush=True)
    settings = chosen["settings"]
  else:
    settings = args.settings.get(name, settings_for(name, task.name))
  out["settings"] = settings
  out["runs"] = runs([settings], seeds, args.budget)
  for r in out["runs"]:
    print(
      f"  {name} seed {r['seed']}: {r['steps']} steps, best loss {H.best(r):.4g}, "
      f"{1e3 * r['step_s_mean']:.1f} ms/step, compiled in {r['compile_s']:.1f} s"
      + (" (diverged)" if r["diverged"] else ""),
      flush=True,
    )
  if "blocks" in out["runs"][0]:  # what kfac-jax's graph matcher made of the model
    print(f"  kfac_jax curvature blocks: {H.brief(out['runs'][0]['blocks'])}", flush=True)
  return out


def settings_for(name, task):
  return kfac_jax_runner.SETTINGS if name == "kfac_jax" else O.settings_for(name, task)


def grid_for(name, task):
  return kfac_jax_runner.grid(task) if name == "kfac_jax" else O.grid_for(name, task)


def settings_cell(name: str, settings: dict) -> str:
  if name == "kfac_jax":  # its example's dozen options: only those a tuning changed
    changed = {k: v for k, v in settings.items() if kfac_jax_runner.SETTINGS.get(k) != v}
    return "its example's" + (f", {H.brief(changed)}" if changed else "")
  return H.brief(settings)


def run_task(name: str, args) -> dict:
  task = T.make(name, args.tiny)
  skipped = {}
  if "kfac_jax" in args.optimizers and (reason := kfac_jax_runner.skip_reason(name, args)):
    skipped["kfac_jax"] = reason
    print(f"kfac_jax SKIPPED on {name}: {reason}", flush=True)
  names = [n for n in args.optimizers if n not in skipped]
  print(f"\n## {task.description}: batch {task.batch_size}; {', '.join(names)}", flush=True)
  results = {n: run_optimizer(task, n, args) for n in names}
  summary = H.summarize(results, args.budget)
  settings = {n: settings_cell(n, r["settings"]) for n, r in results.items()}
  metrics = [m for m in ("loss", "accuracy") if f"best_{m}" in next(iter(summary.values()))]
  tables = {m: H.table(summary, settings, args.budget, m) for m in metrics}
  plan = capture(task, results["cgfac"]["settings"]) if "cgfac" in results else None
  return {
    "description": task.description,
    "loss": task.loss,
    "batch_size": task.batch_size,
    "examples": {"train": len(task.data[0]), "eval": len(task.data[2])},
    "optimizers": results,
    "summary": summary,
    "tables": tables,
    "skipped": skipped,
    "cgfac_plan": plan,
  }


def capture(task: T.Task, settings: dict) -> dict:
  """What CG-FAC runs on each layer (``cgfac_optax.plan``) and which parameters it leaves to
  its fallback, printed and as a record."""
  import numpy as np

  plan = O.cgfac_plan(task, **settings)
  print(f"\nCG-FAC ({H.brief(settings)}) on each layer:\n{plan}", flush=True)
  params = task.init(0)[0]
  total = sum(int(np.size(p)) for p in jax.tree.leaves(params))
  fallback = sum(int(np.prod(f.shape)) for f in plan.fallback)
  return {
    "layers": {path: layer.solver for path, layer in plan.items()},
    "fallback": [f.path for f in plan.fallback],
    "parameters": {"layers": total - fallback, "fallback": fallback},
  }


def parse_args(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--tasks", nargs="+", default=list(T.TASKS), choices=T.TASKS)
  parser.add_argument(
    "--optimizers", nargs="+", default=list(O.OPTIMIZERS), choices=[*O.OPTIMIZERS]
  )
  parser.add_argument("--budget", type=float, default=120.0, help="seconds per run after compile")
  parser.add_argument("--seeds", type=int, default=3)
  parser.add_argument("--seed", type=int, default=0, help="first seed")
  parser.add_argument("--tune", action="store_true", help="pick each optimizer's setting first")
  parser.add_argument("--tune-budget", type=float, default=30.0, help="seconds per tuning run")
  parser.add_argument("--evals", type=int, default=40, help="evenly spaced evaluations per run")
  parser.add_argument("--max-steps", type=int, default=10**9)
  kfac_jax_runner.add_arguments(parser)
  parser.add_argument("--out", type=Path, default=H.RESULTS, help="writes <out>/<task>/")
  parser.add_argument("--tiny", action="store_true", help="tiny data and models, seconds-long")
  parser.add_argument(
    "--settings",
    action="append",
    default=[],
    metavar="NAME=JSON",
    help="run optimizer NAME with these settings (a JSON object) instead of its default",
  )
  args = parser.parse_args(argv)
  args.settings = _given_settings(parser, args)
  if args.tiny:
    args.budget, args.tune_budget, args.seeds, args.evals, args.max_steps = 0.5, 0.2, 1, 4, 6
  return args


def _given_settings(parser, args) -> dict[str, dict]:
  """``--settings``' ``NAME=JSON`` pairs as ``{name: settings}``, each checked."""
  out = {}
  for given in args.settings:
    name, _, text = given.partition("=")
    if name not in O.OPTIMIZERS:
      parser.error(f"--settings {given!r}: {name!r} is not one of {', '.join(O.OPTIMIZERS)}")
    try:
      settings = json.loads(text)
    except json.JSONDecodeError as e:
      parser.error(f"--settings {given!r}: the settings are not JSON ({e})")
    if not isinstance(settings, dict):
      parser.error(f"--settings {given!r}: the settings must be a JSON object, got {text}")
    if name in out:
      parser.error(f"--settings names {name!r} twice")
    out[name] = settings
  if out and args.tune:
    parser.error("--settings and --tune exclude each other: --tune picks the settings")
  return out


def main(argv=None) -> dict:
  args = parse_args(argv)
  import flax
  import psgdax

  info = H.environment(optax=optax, flax=flax, cgfac_optax=cgfac_optax, psgdax=psgdax)
  H.print_environment(info)
  results = {}
  for name in args.tasks:
    results[name] = run_task(name, args)
    info["load_average_end"] = H.load_average()
    out = args.out / name
    payload = {"environment": info, "settings": vars(args), "task": results[name]}
    path = H.write_json("time_to_target", payload, out)
    png = H.plot_curves(
      {name: results[name]}, args.budget, Path(out) / "time_to_target.png", _x(info)
    )
    print(f"\n### {results[name]['description']}: {args.budget:g} s per run, {args.seeds} seed(s)")
    for table in results[name]["tables"].values():
      print("\n" + table)
    print(f"\nload average {info['load_average']} -> {info['load_average_end']}")
    print(f"wrote {path} and {png}", flush=True)
  return results


def _x(info: dict) -> str:
  return f"seconds after compilation ({info['device']}, {info['cpu_count']} cores)"


if __name__ == "__main__":
  main()
