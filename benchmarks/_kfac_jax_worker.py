"""Trains a benchmark task with kfac-jax; run by ``kfac_jax_runner.run`` in the kfac-jax venv.

Imports only JAX, Flax, optax, NumPy, kfac_jax and the benchmarks' ``tasks``/``harness``
(never cgfac_optax): it runs under an older JAX. Usage:
``python _kfac_jax_worker.py REQUEST.json INIT.npz OUTPUT.json``, the request naming the
task and the runs (settings, seed, budget, evaluations), the npz the task's arrays and each
seed's initial parameters and model state as the other optimizers start from them.
"""

from __future__ import annotations

import itertools
import json
import sys
import warnings

import harness as H
import jax
import jax.numpy as jnp
import kfac_jax
import numpy as np
import tasks as T

# kfac-jax donates the batch to its steps, which XLA cannot always reuse: a note, not a fault.
warnings.filterwarnings("ignore", message="Some donated buffers were not usable")


def register_loss(loss: str, outputs, targets) -> None:
  """Tells kfac-jax the loss, so its curvature is the Fisher of the objective minimized."""
  if loss == "squared_error":  # kfac-jax's is weight * sum (t - y)^2 / batch: weight 0.5 is ours
    kfac_jax.register_squared_error_loss(outputs, targets, weight=0.5)
  else:
    kfac_jax.register_softmax_cross_entropy_loss(outputs, targets)


def loaded(task: T.Task, seed: int, arrays) -> tuple:
  """The seed's initial params and state, from the file, in the task's own structure."""
  out = []
  for prefix, tree in zip(("params", "state"), task.init(seed)):
    flat, treedef = jax.tree_util.tree_flatten_with_path(tree)
    keys = ["/".join(str(getattr(k, "key", k)) for k in path) for path, _ in flat]
    out.append(treedef.unflatten([jnp.asarray(arrays[f"{seed}/{prefix}/{k}"]) for k in keys]))
  return tuple(out)


def optimizer(task: T.Task, options: dict):
  """kfac-jax on the task's mean loss, its model state (BatchNorm) as kfac-jax's func_state."""

  def loss_fn(params, state, batch):
    x, y = batch
    outputs, state = task.apply(params, state, x, True)
    register_loss(task.loss, outputs, y)
    return jnp.mean(T.per_example_loss(task.loss, outputs, y)), state

  return kfac_jax.Optimizer(
    value_and_grad_func=jax.value_and_grad(loss_fn, has_aux=True),
    l2_reg=0.0,
    value_func_has_state=True,
    multi_device=False,
    **options,
  )


def blocks(opt) -> dict[str, int]:
  """How many curvature blocks of each kind kfac-jax's graph matcher made (after ``init``)."""
  estimator = getattr(opt, "_estimator", None)
  kinds = [type(b).__name__ for b in getattr(estimator, "blocks", None) or ()]
  return {k: kinds.count(k) for k in sorted(set(kinds))}


def trainer(task: T.Task, options: dict, seed: int):
  """``(init, step, warm-up steps, optimizer)`` for the harness's loop."""
  opt = optimizer(task, options)
  rng = jax.random.PRNGKey(seed)
  x, y = task.data[:2]

  def init(params_state):
    params, state = params_state
    return params, opt.init(params, rng, (x[: task.batch_size], y[: task.batch_size]), state), state

  def step(carry, batch, i):
    params, opt_state, state = carry
    key = jax.random.fold_in(rng, i)
    kwargs = {"batch": batch}
    if i == 0:
      # kfac-jax draws its burn-in (curvature-only) batches from an iterator before the first
      # step's: the first batches of the same order, so that step i trains on batch i.
      burnin = options.get("num_burnin_steps", 10)
      first = itertools.islice(H.Batches(x, y, task.batch_size, seed), burnin)
      kwargs = {"data_iterator": itertools.chain(first, [batch])}
    params, opt_state, state, stats = opt.step(
      params, opt_state, key, func_state=state, global_step_int=i, **kwargs
    )
    return (params, opt_state, state), stats["loss"]

  # kfac-jax compiles one step per combination of "adapt the damping" and "refresh the
  # inverses" (it branches in Python on the step number): the warm-up covers every one.
  warm = max(options.get("inverse_update_period", 5), options.get("damping_adaptation_interval", 5))
  return init, step, warm + 2, opt


def main(request_path: str, init_path: str, out_path: str) -> None:
  request = json.loads(open(request_path).read())
  arrays = np.load(init_path)
  fields = [arrays[f"data/{k}"] for k in ("x", "y", "x_eval", "y_eval")]
  task = T.make(request["task"], request["tiny"], T.Data(*fields, request["source"]))
  evaluate_model = T.evaluator(task)
  evaluate = lambda carry: evaluate_model(carry[0], carry[2])
  x, y = task.data[:2]
  runs = []
  for spec in request["runs"]:
    seed = spec["seed"]
    init, step, warm, opt = trainer(task, spec["settings"], seed)
    batches = H.Batches(x, y, task.batch_size, seed + 1)
    compile_s = H.compile_and_warm(step, init(loaded(task, seed, arrays)), batches, evaluate, warm)
    out = H.train_for(
      step,
      init(loaded(task, seed, arrays)),
      H.Batches(x, y, task.batch_size, seed),
      evaluate,
      spec["budget"],
      spec["evals"],
      request["max_steps"],
    )
    out.update(seed=seed, settings=spec["settings"], compile_s=compile_s, blocks=blocks(opt))
    runs.append(out)
  env = {"jax": jax.__version__, "kfac_jax": getattr(kfac_jax, "__version__", "?")}
  with open(out_path, "w") as f:
    json.dump({"environment": env, "runs": runs}, f)


if __name__ == "__main__":
  main(*sys.argv[1:4])
