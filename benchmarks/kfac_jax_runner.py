"""kfac-jax in the side-by-side runs: its venv, its settings, and the worker that trains with it.

kfac-jax 0.0.8 needs an older JAX (``jax<0.9``) than this project, so it runs in its own
virtual environment (``.kfac-venv/`` at the repository root, made on first use unless
``--no-create``) in a subprocess (``_kfac_jax_worker.py``) that builds the same task from
``tasks.py`` on the same arrays, starts from the same initial parameters (both passed in a
file), draws the same batches and is timed by the same loop (``harness.py``).
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import tasks as T

ROOT = Path(__file__).resolve().parent.parent
VENV = ROOT / ".kfac-venv"
REQUIREMENTS = ["kfac-jax==0.0.8", "jax[cpu]<0.9", "flax", "optax", "numpy"]
TASKS = ("autoencoder", "resnet")  # the transformer is an NNX model of a newer Flax

# kfac-jax's own autoencoder example: adaptive learning rate, momentum and damping.
SETTINGS = {
  "use_adaptive_learning_rate": True,
  "use_adaptive_momentum": True,
  "use_adaptive_damping": True,
  "initial_damping": 150.0,
  "min_damping": 1e-5,
  "max_damping": 1000.0,
  "damping_adaptation_interval": 5,
  "damping_adaptation_decay": 0.95,
  "curvature_ema": 0.95,
  "inverse_update_period": 5,
  "num_burnin_steps": 5,
}


def grid(task: str) -> list[dict]:
  """Three settings around the example's: its own, a smaller initial damping, slower EMA."""
  del task
  return [
    dict(SETTINGS),
    {**SETTINGS, "initial_damping": 15.0},
    {**SETTINGS, "curvature_ema": 0.99},
  ]


def add_arguments(parser) -> None:
  parser.add_argument("--kfac-venv", type=Path, default=VENV)
  parser.add_argument("--no-create", action="store_true", help="never create the kfac-jax venv")


def venv_python(venv: Path) -> Path:
  return venv / "bin" / "python"


def venv_ready(venv: Path) -> bool:
  check = [str(venv_python(venv)), "-c", "import kfac_jax, flax, jax"]
  return venv_python(venv).exists() and subprocess.run(check, capture_output=True).returncode == 0


def skip_reason(task: str, args) -> str | None:
  """Why kfac-jax cannot run on ``task`` here, or ``None`` (making its venv first if allowed)."""
  if task not in TASKS:
    return (
      f"its worker runs {', '.join(TASKS)} only: the {task} task builds its NNX model with "
      "nnx.as_pure, which the Flax that installs beside kfac-jax's JAX (<0.9) lacks"
    )
  if venv_ready(args.kfac_venv):
    return None
  if args.tiny or args.no_create:
    return f"no kfac-jax venv at {args.kfac_venv} (--tiny and --no-create never make one)"
  print(f"creating {args.kfac_venv} with {' '.join(REQUIREMENTS)} (once)", flush=True)
  subprocess.run([sys.executable, "-m", "venv", str(args.kfac_venv)], check=True)
  pip = [str(venv_python(args.kfac_venv)), "-m", "pip", "install", "--quiet"]
  subprocess.run([*pip, *REQUIREMENTS], check=True)
  return None


def run(task: str, tiny: bool, settings_list, seeds, budget: float, args) -> list[dict]:
  """Every setting on every seed, in the kfac-jax venv: the runs as ``harness.train_for``'s."""
  built = T.make(task, tiny)
  with tempfile.TemporaryDirectory() as tmp:
    tmp = Path(tmp)
    arrays = {f"data/{k}": v for k, v in built.data._asdict().items() if k != "source"}
    for seed in seeds:
      params, state = built.init(seed)
      for prefix, tree in (("params", params), ("state", state)):
        for path, leaf in _flat(tree):
          arrays[f"{seed}/{prefix}/{path}"] = np.asarray(leaf)
    np.savez(tmp / "init.npz", **arrays)
    request = {
      "task": task,
      "tiny": tiny,
      "source": built.data.source,
      "runs": [
        {"settings": s, "seed": seed, "budget": budget, "evals": args.evals}
        for s in settings_list
        for seed in seeds
      ],
      "max_steps": args.max_steps,
    }
    (tmp / "request.json").write_text(json.dumps(request))
    worker = Path(__file__).resolve().parent / "_kfac_jax_worker.py"
    paths = [str(tmp / n) for n in ("request.json", "init.npz", "out.json")]
    subprocess.run([str(venv_python(args.kfac_venv)), str(worker), *paths], check=True)
    return json.loads((tmp / "out.json").read_text())["runs"]


def _flat(tree) -> list[tuple[str, np.ndarray]]:
  import jax

  flat, _ = jax.tree_util.tree_flatten_with_path(tree)
  return [("/".join(str(getattr(k, "key", k)) for k in path), leaf) for path, leaf in flat]
