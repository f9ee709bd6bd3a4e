"""The one benchmark harness: batches, the timed loop, seeds, tuning, summaries, tables, plots.

Imports only the standard library, NumPy and JAX (matplotlib when plotting), never
cgfac_optax: the kfac-jax worker runs under an older JAX in its own venv and trains through
this same loop, so every optimizer sees the same batches in the same order and is timed the
same way.

A *run* trains one optimizer setting on one seed for a budget of seconds of step time
(compilation and evaluations excluded) and returns its curve (evaluation loss, and accuracy
where the task has one, against seconds and steps). :func:`summarize` turns the runs of
several optimizers into each one's best loss (median over seeds), its step time, and the
fraction of the budget it needs to reach each peer's best.
"""

from __future__ import annotations

import json
import math
import os
import platform
import statistics
import subprocess
import sys
import time
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

RESULTS = Path(__file__).resolve().parent / "results"


class Batches:
  """Endless minibatches ``(x, y)``, reshuffled every epoch from ``seed``, kept on the device."""

  def __init__(self, x: np.ndarray, y: np.ndarray, batch_size: int, seed: int = 0):
    if batch_size > len(x):
      raise ValueError(f"batch_size {batch_size} exceeds the {len(x)} examples")
    self.x, self.y = jnp.asarray(x), jnp.asarray(y)
    self.batch_size = batch_size
    self.rng = np.random.default_rng(seed)
    self._order = self.rng.permutation(len(x))
    self._pos = 0

  def __next__(self):
    if self._pos + self.batch_size > len(self._order):
      self._order = self.rng.permutation(len(self._order))
      self._pos = 0
    idx = self._order[self._pos : self._pos + self.batch_size]
    self._pos += self.batch_size
    return self.x[idx], self.y[idx]

  def __iter__(self):
    return self


def eval_schedule(budget_s: float, evals: int) -> list[float]:
  """Clock times to evaluate at: ``evals`` evenly spaced, plus halvings toward the start.

  The halvings give the early, fast-moving part of the curve (and early time-to-target
  crossings) a resolution that an even grid would not.
  """
  even = [budget_s * (k + 1) / evals for k in range(evals)]
  early = [budget_s / evals / 2**j for j in range(1, 7)]
  return sorted(set(early + even))


def train_for(
  step: Callable[[Any, Any, int], tuple[Any, Any]],
  carry: Any,
  batches: Iterator,
  evaluate: Callable[[Any], dict[str, float]],
  budget_s: float,
  evals: int,
  max_steps: int,
) -> dict:
  """Runs ``step(carry, batch, i) -> (carry, loss)`` for ``budget_s`` seconds of step time.

  Only the steps are on the clock (each ends by reading its loss back, so the device has
  finished); drawing batches and ``evaluate(carry)`` (a dict with at least ``"loss"``, at the
  times of :func:`eval_schedule`) are not. Stops early at ``max_steps``, or as diverged at a
  non-finite training or evaluated loss. A run whose last evaluated loss is above the one at
  step 0 also counts as diverged (a run stuck at a huge finite loss is not training).

  Returns:
    ``{"curve": {"time": [...], "steps": [...], <evaluate's keys>: [...]}, "steps",
    "wall_s", "step_s_mean", "diverged"}``.
  """
  curve: dict[str, list] = {"time": [], "steps": []}

  def record(clock, steps):
    values = evaluate(carry)
    curve["time"].append(clock)
    curve["steps"].append(steps)
    for k, v in values.items():
      curve.setdefault(k, []).append(float(v))
    return math.isfinite(float(values["loss"]))

  pending = eval_schedule(budget_s, evals)
  record(0.0, 0)
  clock, steps, diverged = 0.0, 0, False
  while clock < budget_s and steps < max_steps:
    batch = next(batches)
    start = time.perf_counter()
    carry, loss = step(carry, batch, steps)
    loss = float(loss)
    clock += time.perf_counter() - start
    steps += 1
    if not math.isfinite(loss):
      diverged = True
      break
    if pending and clock >= pending[0]:
      while pending and clock >= pending[0]:
        pending.pop(0)
      if not record(clock, steps):
        diverged = True
        break
  if not diverged and curve["steps"][-1] != steps:
    diverged = not record(clock, steps)
  if not diverged and curve["loss"][-1] > curve["loss"][0]:
    diverged = True
  return {
    "curve": curve,
    "steps": steps,
    "wall_s": clock,
    "step_s_mean": clock / max(steps, 1),
    "diverged": diverged,
  }


def compile_and_warm(step: Callable, carry: Any, batches: Iterator, evaluate, steps: int) -> float:
  """Seconds to run ``steps`` steps and one evaluation: compilation, off the clock."""
  start = time.perf_counter()
  for i in range(steps):
    carry, loss = step(carry, next(batches), i)
  jax.block_until_ready(loss)
  evaluate(carry)
  return time.perf_counter() - start


# ---------------------------------------------------------------------------
# Summaries


def best(run: dict, metric: str = "loss") -> float:
  values = [v for v in run["curve"].get(metric, []) if math.isfinite(v)]
  if not values:
    return math.nan
  return min(values) if metric == "loss" else max(values)


def time_to(run: dict, target: float, metric: str = "loss") -> tuple[float | None, int | None]:
  """The first evaluation at which ``metric`` reaches ``target`` (``<=`` loss, ``>=`` accuracy)."""
  c = run["curve"]
  reached = (lambda v: v <= target) if metric == "loss" else (lambda v: v >= target)
  for t, s, v in zip(c["time"], c["steps"], c[metric]):
    if reached(v):
      return t, s
  return None, None


def median(xs) -> float:
  """The median, ``nan`` and ``None`` counted as infinitely bad (``inf`` out as ``nan``)."""
  xs = [x if x is not None and math.isfinite(x) else math.inf for x in xs]
  m = float(statistics.median(xs)) if xs else math.nan
  return math.nan if math.isinf(m) else m


def _metric_summary(runs: list[dict], metric: str) -> dict:
  values = [best(r, metric) for r in runs]
  finite = [v for v in values if math.isfinite(v)] or [math.nan]
  if metric == "accuracy":  # higher is better: the median of the negated values
    return {"median": -median([-v for v in values]), "min": min(finite), "max": max(finite)}
  return {"median": median(values), "min": min(finite), "max": max(finite)}


def summarize(optimizers: dict, budget: float) -> dict:
  """Per optimizer: best loss (and accuracy), step time, steps, and time to each peer's best."""
  metrics = ["loss"]
  if all("accuracy" in o["runs"][0]["curve"] for o in optimizers.values()) and optimizers:
    metrics.append("accuracy")
  summary = {}
  for name, o in optimizers.items():
    runs = o["runs"]
    summary[name] = {
      "step_ms_mean": 1e3 * float(np.mean([r["step_s_mean"] for r in runs])),
      "steps_median": median([r["steps"] for r in runs]),
      "compile_s": float(np.mean([r.get("compile_s", math.nan) for r in runs])),
      "diverged": sum(r["diverged"] for r in runs),
      "seeds": [r["seed"] for r in runs],
      **{f"best_{m}": _metric_summary(runs, m) for m in metrics},
    }
  for m in metrics:
    for name, o in optimizers.items():
      summary[name][f"reaches_{m}"] = {
        peer: _reach(o["runs"], summary[peer][f"best_{m}"]["median"], m, budget)
        for peer in optimizers
        if peer != name
      }
  return summary


def _reach(runs: list[dict], target: float, metric: str, budget: float) -> dict:
  per_seed = []
  for r in runs:
    t, steps = time_to(r, target, metric) if math.isfinite(target) else (None, None)
    per_seed.append({"seed": r["seed"], "time_s": t, "steps": steps})
  ratio = median([None if p["time_s"] is None else p["time_s"] / budget for p in per_seed])
  return {
    "target": target,
    "budget_ratio_median": None if math.isnan(ratio) else ratio,
    "steps_median": None if math.isnan(s := median([p["steps"] for p in per_seed])) else s,
    "reached": sum(p["time_s"] is not None for p in per_seed),
    "per_seed": per_seed,
  }


def format_table(headers: list[str], rows: list[list]) -> str:
  """A GitHub-flavoured markdown table."""

  def cell(v):
    if isinstance(v, float):
      return f"{v:.3g}" if abs(v) < 1e3 else f"{v:.0f}"
    return "-" if v is None else str(v)

  lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
  lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in rows]
  return "\n".join(lines)


def table(summary: dict, settings: dict[str, str], budget: float, metric: str = "loss") -> str:
  """Best ``metric`` per optimizer and the fraction of the budget it needs for each peer's."""
  names = list(summary)
  headers = ["optimizer", "settings", f"best {metric} (median [min, max])", "ms/step", "steps"]
  headers += [f"to {p}'s best" for p in names]
  rows = []
  for name in names:
    s, b = summary[name], summary[name][f"best_{metric}"]
    value = f"{b['median']:.4g} [{b['min']:.4g}, {b['max']:.4g}]"
    value += f" ({s['diverged']} diverged)" if s["diverged"] else ""
    row = [name, settings[name], value, s["step_ms_mean"], f"{s['steps_median']:.0f}"]
    for peer in names:
      r = s[f"reaches_{metric}"].get(peer)
      ratio = None if r is None else r["budget_ratio_median"]
      cell = "" if r is None else f"{'-' if ratio is None else f'{ratio:.2f}x'}"
      row.append(cell + ("" if r is None else f" ({r['reached']}/{len(r['per_seed'])})"))
    rows.append(row)
  return format_table(headers, rows)


def brief(settings: dict) -> str:
  """Settings for a table cell."""
  if not settings:
    return "defaults"
  return ", ".join(
    f"{k}={v:g}" if isinstance(v, float) else f"{k}={v}" for k, v in settings.items()
  )


# ---------------------------------------------------------------------------
# Environment and output


def cpu_model() -> str:
  try:
    out = subprocess.run(["lscpu"], capture_output=True, text=True, check=False).stdout
    for line in out.splitlines():
      if line.lower().startswith("model name"):
        return line.split(":", 1)[1].strip()
  except OSError:
    pass
  return platform.processor() or "unknown"


def load_average() -> list[float]:
  try:
    return [round(v, 2) for v in os.getloadavg()]
  except OSError:
    return []


def environment(**versions) -> dict:
  """The device, CPU, load and package versions (``versions`` adds module names to report)."""
  dev = jax.devices()[0]
  info = {
    "device": f"{dev.platform}: {getattr(dev, 'device_kind', str(dev))}",
    "devices": len(jax.devices()),
    "cpu": cpu_model(),
    "cpu_count": os.cpu_count(),
    "load_average": load_average(),
    "python": sys.version.split()[0],
    "jax": jax.__version__,
    "numpy": np.__version__,
  }
  for name, module in versions.items():
    info[name] = getattr(module, "__version__", "?")
  return info


def print_environment(info: dict) -> None:
  print(
    f"device {info['device']} x{info['devices']} | cpu {info['cpu']} ({info['cpu_count']} cores)"
    f" | load {info['load_average']}"
  )
  skip = {"device", "devices", "cpu", "cpu_count", "load_average"}
  print(", ".join(f"{k} {v}" for k, v in info.items() if k not in skip))


def write_json(name: str, payload: dict, out_dir: Path | str | None = None) -> Path:
  out_dir = Path(out_dir or RESULTS)
  out_dir.mkdir(parents=True, exist_ok=True)
  path = out_dir / f"{name}.json"
  path.write_text(json.dumps(payload, indent=1, default=_json_default))
  return path


def _json_default(v):
  if isinstance(v, Path):
    return str(v)
  try:
    return float(v)
  except (TypeError, ValueError):
    return repr(v)


def plot_curves(results: dict, budget: float, path: Path, xlabel: str) -> Path:
  """Per task (a row): evaluation loss against seconds and steps, median of seeds, min-max band."""
  import matplotlib

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  tasks = list(results)
  fig, axes = plt.subplots(len(tasks), 2, figsize=(11, 4.0 * len(tasks)), squeeze=False)
  for (ax_t, ax_s), task in zip(axes, tasks):
    for name, o in results[task]["optimizers"].items():
      curves = [r["curve"] for r in o["runs"]]
      top = max(max(c["steps"]) for c in curves)
      grids = {"time": np.linspace(0.0, budget, 240), "steps": np.geomspace(1, max(top, 2), 240)}
      color = None
      for ax, key in ((ax_t, "time"), (ax_s, "steps")):
        ys = np.array([np.interp(grids[key], c[key], c["loss"], right=np.nan) for c in curves])
        with warnings.catch_warnings():
          warnings.simplefilter("ignore", RuntimeWarning)  # past a diverged seed's last point
          med, lo, hi = np.nanmedian(ys, 0), np.nanmin(ys, 0), np.nanmax(ys, 0)
        (line,) = ax.plot(grids[key], med, color=color, label=name, lw=1.4)
        color = line.get_color()
        ax.fill_between(grids[key], lo, hi, color=color, alpha=0.2, lw=0)
    for ax in (ax_t, ax_s):
      ax.set_yscale("log")
      ax.set_ylabel(f"evaluation loss ({results[task]['loss']})")
      ax.set_title(f"{task}: median over seeds, min-max band", fontsize=9)
    ax_t.set_xlabel(xlabel)
    ax_s.set_xlabel("steps")
    ax_s.set_xscale("log")
    ax_t.legend(fontsize=8)
  path.parent.mkdir(parents=True, exist_ok=True)
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)
  return path
