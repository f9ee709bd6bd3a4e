"""CG-FAC against kfac-jax 0.0.8 on the K-FAC autoencoder, side by side from one command.

kfac-jax needs an older JAX (``jax<0.9``) than this project, so it runs in its own
virtual environment (``.kfac-venv/`` at the repository root, created on first use
unless ``--no-create``) in a subprocess, from the same initial parameters and the
same data. It uses its adaptive learning rate, momentum and damping (the settings
of its own autoencoder example), with the inverses refreshed every 1, 5 and 10
steps. CG-FAC (this venv) runs with the benchmark defaults. Both get the same
wall-clock budget after compilation; the table gives step time, the loss reached
in the budget, and the time each needs to reach kfac-jax's best budget loss.
An Adam run in each venv anchors the step-time ratios.

Run: ``python benchmarks/vs_kfac_jax.py`` (``--tiny`` for a seconds-long check).
"""

from __future__ import annotations

import argparse
import json
import math
import subprocess
import sys
import tempfile
from pathlib import Path

import _common as C
import jax
import jax.numpy as jnp
import numpy as np
import time_to_target as T

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


def run_kfac_jax(python: Path, layers, params, x, x_eval, settings: dict) -> dict:
  with tempfile.TemporaryDirectory() as tmp:
    tmp = Path(tmp)
    arrays = {"x": x, "x_eval": x_eval}
    for name, p in params.items():
      for k, v in p.items():
        arrays[f"param/{name}/{k}"] = np.asarray(v)
    np.savez(tmp / "input.npz", **arrays)
    settings = dict(
      settings,
      layers=[ly.name for ly in layers],
      linear_layers=[ly.name for ly in layers if ly.act is None],
    )
    (tmp / "settings.json").write_text(json.dumps(settings))
    worker = Path(__file__).resolve().parent / "_kfac_jax_worker.py"
    subprocess.run(
      [
        str(python),
        str(worker),
        str(tmp / "input.npz"),
        str(tmp / "settings.json"),
        str(tmp / "out.json"),
      ],
      check=True,
    )
    return json.loads((tmp / "out.json").read_text())


def main(argv=None):
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
    default=150.0,
    help="kfac-jax initial damping (its autoencoder example's value)",
  )
  parser.add_argument("--seed", type=int, default=0)
  parser.add_argument("--evals", type=int, default=30)
  parser.add_argument("--max-steps", type=int, default=1_000_000)
  parser.add_argument("--venv", type=Path, default=VENV)
  parser.add_argument("--no-create", action="store_true", help="fail if the venv is missing")
  parser.add_argument("--out", default=None)
  parser.add_argument("--tiny", action="store_true", help="small model, seconds-long check")
  args = parser.parse_args(argv)
  if args.dataset is None:
    args.dataset = "fashion" if C.fashion_available() and not args.tiny else "mnist"
  python = ensure_venv(args.venv, create=not args.no_create)

  info = C.environment()
  C.print_environment(info)
  task = f"autoencoder-{args.dataset}"
  layers, loss, x, y = T.task_setup(task, args.seed, args.tiny)
  if args.tiny:
    args.budget, args.batch_size, args.max_steps, args.evals, args.periods = 0.5, 32, 4, 2, [2]
  x_eval = x[:2048]
  params = C.init_params(layers, jax.random.key(args.seed))

  settings = {
    "batch_size": args.batch_size,
    "budget": args.budget,
    "evals": args.evals,
    "max_steps": args.max_steps,
    "seed": args.seed,
    "initial_damping": args.initial_damping,
    "adam_learning_rate": 1e-3,
    "inverse_update_periods": args.periods,
  }
  print(f"kfac-jax in {args.venv} ...", flush=True)
  kfac = run_kfac_jax(python, layers, params, x, x_eval, settings)

  eval_data = (jnp.asarray(x_eval), jnp.asarray(x_eval))
  ours = {}
  for spec in T.optimizer_specs(task, ["adam", "cgfac", "cgfac_lowrank", "kfac_eigh"]):
    compiled, tx, compile_s = T.compile_step(layers, loss, spec, "sampled", (x, y), args.batch_size)
    run = T.Run(layers, loss, spec, compiled, tx, (x, y), eval_data, args.batch_size, args.seed)
    r = run(spec.learning_rate, args.budget, args.max_steps, args.evals)
    r["compile_s"] = compile_s
    ours[f"{spec.name} (cgfac_optax venv)" if spec.name == "adam" else spec.name] = r
    print(f"{spec.name}: {r['steps']} steps, loss {r['final_loss']:.4g}", flush=True)

  runs = dict(ours)
  runs.update(kfac["runs"])
  for r in runs.values():
    # Mean, not median: kfac-jax's inverse refreshes are its expensive steps.
    r["step_s_mean"] = r["wall_s"] / max(r["steps"], 1)
  kfac_names = [n for n in kfac["runs"] if n.startswith("kfac-jax")]
  kfac_best = min(kfac_names, key=lambda n: _finite(kfac["runs"][n]["final_loss"]))
  target = kfac["runs"][kfac_best]["final_loss"]
  target_time = T.time_to(kfac["runs"][kfac_best]["history"], target)[0]
  adam_ours = runs["adam (cgfac_optax venv)"]["step_s_mean"]
  adam_theirs = runs["adam (same jax as kfac-jax)"]["step_s_mean"]
  rows = []
  for name, r in runs.items():
    adam = adam_theirs if name in kfac["runs"] else adam_ours
    t, s = T.time_to(r["history"], target)
    rows.append(
      [
        name,
        1e3 * r["step_s_mean"],
        r["step_s_mean"] / adam,
        r["steps"],
        r["final_loss"],
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
    f"\n### {task}, batch {args.batch_size}, budget {args.budget:g} s; "
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
    h = np.array(r["history"])
    axes[0].plot(h[:, 0], h[:, 2], label=name)
    axes[1].plot(h[:, 1], h[:, 2], label=name)
  for ax, xl in zip(axes, ["wall-clock s", "steps"]):
    ax.axhline(target, color="k", ls=":", lw=0.8)
    ax.set_yscale("log")
    ax.set_xlabel(xl)
    ax.set_ylabel("training loss")
    ax.set_title(f"{task}, batch {args.batch_size} ({info['device']})")
  axes[1].set_xscale("log")
  axes[0].legend(fontsize=7)
  png = C.save_figure(fig, "vs_kfac_jax", args.out)
  print(f"wrote {path} and {png}")
  return payload


def _finite(v):
  return v if math.isfinite(v) else math.inf


if __name__ == "__main__":
  main()
