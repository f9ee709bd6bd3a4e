"""kfac-jax 0.0.8 against CG-FAC on the K-FAC autoencoder, and the venv kfac-jax runs in.

kfac-jax needs an older JAX (``jax<0.9``) than this project, so it runs in its own
virtual environment (``.kfac-venv/`` at the repository root, created on first use
unless ``--no-create``) in a subprocess (``_kfac_jax_worker.py``), from the same
initial parameters, on the same batches, timed by the same loop (``_timed.py``).
This module holds that venv and worker plumbing for ``time_to_target.py``, which
compares Adam, Muon, kfac-jax and CG-FAC. Run as a script, it compares kfac-jax's
inverse refresh periods (1, 5 and 10 steps; otherwise its autoencoder example's
adaptive settings) with CG-FAC (``time_to_target.BEST``) on the squared-error
autoencoder, with an Adam run in each venv to anchor the step-time ratios; the
table gives step time, the loss reached in the budget, and the time each needs to
reach kfac-jax's best budget loss.

Run: ``python benchmarks/vs_kfac_jax.py`` (``--tiny`` for a seconds-long check).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

import _common as C
import numpy as np

ROOT = Path(__file__).resolve().parent.parent
VENV = ROOT / ".kfac-venv"
REQUIREMENTS = ["kfac-jax==0.0.8", "jax[cpu]<0.9", "numpy"]


def venv_python(venv: Path) -> Path:
  return venv / "bin" / "python"


def venv_ready(venv: Path) -> bool:
  python = venv_python(venv)
  if not python.exists():
    return False
  check = subprocess.run(
    [str(python), "-c", "import kfac_jax, jax; print(jax.__version__)"],
    capture_output=True,
    text=True,
    check=False,
  )
  return check.returncode == 0


def ensure_venv(venv: Path, create: bool) -> Path:
  """The kfac-jax venv's python, creating the venv when missing and ``create``."""
  if venv_ready(venv):
    return venv_python(venv)
  if not create:
    raise FileNotFoundError(
      f"no kfac-jax venv at {venv}; run without --no-create to make it "
      f"(pip install {' '.join(REQUIREMENTS)})"
    )
  print(f"creating {venv} with {' '.join(REQUIREMENTS)} (once)", flush=True)
  subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
  pip = [str(venv_python(venv)), "-m", "pip", "install", "--quiet"]
  subprocess.run([*pip, "--upgrade", "pip"], check=True)
  subprocess.run([*pip, *REQUIREMENTS], check=True)
  return venv_python(venv)


def run_worker(python: Path, layers, loss: str, batch_size: int, data, params: dict, runs) -> dict:
  """Runs ``_kfac_jax_worker.py`` in the kfac-jax venv and returns its results.

  ``data`` is ``(x, y, x_eval, y_eval)``, ``params`` maps each seed to its initial
  parameters, ``runs`` is the worker's list of runs (see its docstring).
  """
  with tempfile.TemporaryDirectory() as tmp:
    tmp = Path(tmp)
    x, y, x_eval, y_eval = data
    arrays = {"x": x, "x_eval": x_eval}
    # An autoencoder's targets are its inputs: not written twice.
    if y is not x:
      arrays["y"] = y
    if y_eval is not x_eval:
      arrays["y_eval"] = y_eval
    for seed, tree in params.items():
      for name, p in tree.items():
        for k, v in p.items():
          arrays[f"param/{seed}/{name}/{k}"] = np.asarray(v)
    np.savez(tmp / "input.npz", **arrays)
    settings = {
      "layers": C.layer_specs(layers),
      "loss": loss,
      "batch_size": batch_size,
      "runs": runs,
    }
    (tmp / "settings.json").write_text(json.dumps(settings))
    worker = Path(__file__).resolve().parent / "_kfac_jax_worker.py"
    paths = [str(tmp / n) for n in ("input.npz", "settings.json", "out.json")]
    subprocess.run([str(python), str(worker), *paths], check=True)
    return json.loads((tmp / "out.json").read_text())


def main(argv=None):
  import time_to_target as T

  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--dataset", default=None, help="fashion (default when installed) or mnist")
  parser.add_argument("--budget", type=float, default=60.0, help="seconds per run after compile")
  parser.add_argument("--batch-size", type=int, default=512)
  parser.add_argument(
    "--periods", type=int, nargs="+", default=[1, 5, 10], help="kfac-jax inverse refresh periods"
  )
  parser.add_argument(
    "--initial-damping",
    type=float,
    default=T.KFAC_JAX_EXAMPLE["initial_damping"],
    help="kfac-jax initial damping (its autoencoder example's value)",
  )
  parser.add_argument("--seed", type=int, default=0)
  parser.add_argument("--evals", type=int, default=30)
  parser.add_argument("--max-steps", type=int, default=10_000_000)
  parser.add_argument("--venv", type=Path, default=VENV)
  parser.add_argument("--no-create", action="store_true", help="fail if the venv is missing")
  parser.add_argument("--out", default=None)
  parser.add_argument("--tiny", action="store_true", help="small model, seconds-long check")
  args = parser.parse_args(argv)
  if args.dataset is None:
    args.dataset = "fashion" if C.fashion_available() and not args.tiny else "mnist"
  if args.tiny:
    args.budget, args.batch_size, args.max_steps, args.evals, args.periods = 0.5, 32, 4, 2, [2]
  python = ensure_venv(args.venv, create=not args.no_create)

  info = C.environment()
  C.print_environment(info)
  task = T.Task(f"autoencoder-{args.dataset}", args.tiny, args.batch_size, None)
  common = {"seed": args.seed, "budget": args.budget, "evals": args.evals}
  common["max_steps"] = args.max_steps
  kfac_runs = [
    {"name": "adam (same jax as kfac-jax)", "kind": "adam", "settings": {"learning_rate": 1e-3}}
  ]
  for period in args.periods:
    settings = dict(T.KFAC_JAX_EXAMPLE, inverse_update_period=period)
    settings["initial_damping"] = args.initial_damping
    kfac_runs.append(
      {"name": f"kfac-jax (inverse every {period})", "kind": "kfac", "settings": settings}
    )
  print(f"kfac-jax in {args.venv} ...", flush=True)
  kfac = T.run_kfac_jax(task, python, [dict(r, **common) for r in kfac_runs])

  runs = {r["name"]: r for r in kfac["runs"]}
  compiled = T.Compiled(task, "sampled")
  for name in ("adam", "cgfac"):
    settings = T.settings_for(name, task.model)
    r = T.run_here(task, compiled, name, settings, args.seed, args.budget, args)
    runs["adam (cgfac_optax venv)" if name == "adam" else name] = r
    print(f"{name}: {r['steps']} steps, loss {T.final_loss(r):.4g}", flush=True)

  kfac_names = [n for n in runs if n.startswith("kfac-jax")]
  kfac_best = min(kfac_names, key=lambda n: T._finite(T.final_loss(runs[n])))
  target = T.final_loss(runs[kfac_best])
  target_time = T.time_to(runs[kfac_best], target)[0]
  adam_ours = runs["adam (cgfac_optax venv)"]["step_s_mean"]
  adam_theirs = runs["adam (same jax as kfac-jax)"]["step_s_mean"]
  rows = []
  for name, r in runs.items():
    adam = adam_theirs if name in {k["name"] for k in kfac_runs} else adam_ours
    t, _ = T.time_to(r, target)
    rows.append(
      [
        name,
        1e3 * r["step_s_mean"],
        r["step_s_mean"] / adam,
        r["steps"],
        T.final_loss(r),
        t,
        None if t is None or not target_time else target_time / t,
      ]
    )
  table = C.format_table(
    [
      "optimizer",
      "mean step ms",
      "x Adam step (same venv)",
      f"steps in {args.budget:g} s",
      f"loss at {args.budget:g} s",
      "s to best kfac-jax loss",
      "speed-up vs best kfac-jax",
    ],
    rows,
  )
  print(
    f"\n### {task.name} ({task.loss}), batch {task.batch_size}, budget {args.budget:g} s; "
    f"kfac-jax {kfac['kfac_jax']} on jax {kfac['jax']}, best: {kfac_best}, "
    f"loss {target:.4g}\n"
  )
  print(table + "\n")
  payload = {
    "environment": info,
    "kfac_jax_environment": {k: kfac[k] for k in ("jax", "kfac_jax", "device")},
    "settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
    "target": target,
    "kfac_best": kfac_best,
    "runs": runs,
    "table": table,
  }
  path = C.write_json("vs_kfac_jax", payload, args.out)
  fig, axes = C.new_figure(2, width=5.5)
  for name, r in runs.items():
    c = r["curve"]
    axes[0].plot(c["time"], c["loss"], label=name)
    axes[1].plot(c["steps"], c["loss"], label=name)
  for ax, xl in zip(axes, ["wall-clock s", "steps"]):
    ax.axhline(target, color="k", ls=":", lw=0.8)
    ax.set_yscale("log")
    ax.set_xlabel(xl)
    ax.set_ylabel("evaluation loss")
    ax.set_title(f"{task.name}, batch {task.batch_size} ({info['device']})")
  axes[1].set_xscale("log")
  axes[0].legend(fontsize=7)
  png = C.save_figure(fig, "vs_kfac_jax", args.out)
  print(f"wrote {path} and {png}")
  return payload


if __name__ == "__main__":
  main()
