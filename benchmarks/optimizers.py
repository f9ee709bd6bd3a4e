"""The optimizers the benchmarks compare, their settings and tuning grids, and their steps.

Each optimizer is an optax transformation built from a settings dict; ``SETTINGS`` gives the
setting each runs with by default, per task, and ``GRIDS`` the three settings a tuning run
tries (the same budget for every optimizer). CG-FAC is ``cgfac_optax.cgfac(**settings)``:
with ``{}`` it is the library's defaults. kfac-jax runs in its own venv (``kfac_jax_runner.py``).

:func:`make_run` turns a task and a transformation into what the harness times: a first-order
optimizer takes ``jax.value_and_grad`` of the task's loss; CG-FAC takes the loss, gradients
and ``extra`` from the library's helper for the task's framework (plain JAX, Linen, NNX).
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax
import tasks as T
from flax import nnx

import cgfac_optax
from cgfac_optax import flax as cflax

# Run by default, in this order; "kfac_jax" only where its worker supports the task.
OPTIMIZERS = ("adam", "muon", "psgd_kron", "kfac_jax", "cgfac")


def _muon_spec(path, leaf):
  """Muon for hidden kernels (conv kernels as (window * in, out), attention's as matrices)."""
  MDN = optax.contrib.MuonDimensionNumbers
  names = [str(getattr(k, "key", getattr(k, "idx", k))) for k in path]
  if names[-1] != "kernel":
    return None
  if leaf.ndim == 4:
    return MDN(reduction_axis=(0, 1, 2), output_axis=3)
  if leaf.ndim == 3:  # attention: q/k/v (d, heads, head_dim), out (heads, head_dim, d)
    return MDN(reduction_axis=(0, 1), output_axis=2) if "out" in names else MDN(0, (1, 2))
  return MDN() if leaf.ndim == 2 and names[0] != "head" else None


def muon(learning_rate: float) -> optax.GradientTransformation:
  """``optax.contrib.muon`` on hidden kernels, its Adam on embeddings, heads, norms and biases."""

  def dimension_numbers(params):
    return jax.tree_util.tree_map_with_path(_muon_spec, params)

  return optax.contrib.muon(learning_rate, muon_weight_dimension_numbers=dimension_numbers)


def psgd_kron(learning_rate: float) -> optax.GradientTransformation:
  import psgdax

  return psgdax.kron(learning_rate=learning_rate)


def cgfac(**settings) -> optax.GradientTransformationExtraArgs:
  """``cgfac_optax.cgfac(**settings)``; a ``damping`` dict is ``AdaptiveDamping``'s options."""
  if isinstance(settings.get("damping"), dict):
    settings = {**settings, "damping": cgfac_optax.AdaptiveDamping(**settings["damping"])}
  return cgfac_optax.cgfac(**settings)


FACTORIES: dict[str, Callable[..., optax.GradientTransformation]] = {
  "adam": lambda learning_rate: optax.adam(learning_rate),
  "muon": muon,
  "psgd_kron": psgd_kron,
  "cgfac": cgfac,
}

SETTINGS: dict[str, dict[str, dict]] = {
  "adam": {"*": {"learning_rate": 1e-3}, "autoencoder": {"learning_rate": 3e-4}},
  "muon": {"*": {"learning_rate": 0.02}},
  "psgd_kron": {"*": {"learning_rate": 1e-3}},
  "cgfac": {"*": {}},
}

GRIDS: dict[str, dict[str, list[dict]]] = {
  "adam": {"*": [{"learning_rate": v} for v in (3e-4, 1e-3, 3e-3)]},
  "muon": {"*": [{"learning_rate": v} for v in (0.01, 0.02, 0.05)]},
  "psgd_kron": {"*": [{"learning_rate": v} for v in (3e-4, 1e-3, 3e-3)]},
  "cgfac": {"*": [{}, {"curvature_every": 1}, {"damping": {"initial": 1e-2, "minimum": 1e-3}}]},
}


def settings_for(name: str, task: str) -> dict:
  table = SETTINGS[name]
  return dict(table.get(task, table["*"]))


def grid_for(name: str, task: str) -> list[dict]:
  table = GRIDS[name]
  return [dict(s) for s in table.get(task, table["*"])]


class Run(NamedTuple):
  """What the harness times: the first carry, one step, and an evaluation of a carry."""

  init: Callable[[int], Any]  # seed -> carry
  step: Callable[[Any, Any, int], tuple[Any, jax.Array]]  # (carry, (x, y), i) -> (carry, loss)
  evaluate: Callable[[Any], dict]  # carry -> {"loss", ...}
  # The jitted (params, state, opt_state, x, y, key) -> (params, state, opt_state, loss) that
  # step calls: lower and compile it ahead of time, then stepper(compiled) steps with it.
  update: Callable


def stepper(update: Callable) -> Callable:
  """``(carry, batch, i) -> (carry, loss)`` by ``update``; the key folded with the step number."""

  def step(carry, batch, i):
    params, state, opt_state, key = carry
    params, state, opt_state, loss = update(
      params, state, opt_state, *batch, jax.random.fold_in(key, i)
    )
    return (params, state, opt_state, key), loss

  return step


def solver_names() -> list[str]:
  """Every solver CG-FAC has: the columns of ``cgfac_optax.plan``'s costs."""
  shape = lambda *s: jax.ShapeDtypeStruct(s, jnp.float32)
  stats = {"w": cgfac_optax.DenseStats(shape(2, 2), shape(2, 2))}
  return list(cgfac_optax.plan({"w": {"kernel": shape(2, 2)}}, stats)["w"].flops)


def cgfac_plan(task: T.Task, **options) -> cgfac_optax.Plan:
  """``cgfac_optax.plan`` for ``cgfac(**options)`` on ``task`` at its batch: from shapes alone.

  ``options`` that the planner does not take (the damping, ``curvature_every``) are ignored.
  """
  params, state = task.init(0)
  x, y = (a[: task.batch_size] for a in task.data[:2])
  known = inspect.signature(cgfac_optax.plan).parameters
  options = {k: v for k, v in options.items() if k in known}
  planned = []

  def trace(params, state, x, y):  # the plan reads shapes: traced, nothing computed
    extra = value_grad_and_extra(task)(params, state, x, y, jax.random.key(0))[2]
    stats = jax.eval_shape(extra["layer_stats"])
    model = extra["curvature_model"]
    planned.append(cgfac_optax.plan(params, stats, curvature_model=model, **options))

  jax.eval_shape(trace, params, state, x, y)
  return planned[0]


def _first_order(task: T.Task, tx):
  def update(params, state, opt_state, x, y, key):
    del key
    loss_fn = lambda p: T.mean_loss(task, p, state, x, y)
    (loss, state), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), state, opt_state, loss

  return update


def value_grad_and_extra(task: T.Task, **options):
  """``(params, state, x, y, key) -> (loss, grads, extra, state)`` from the library's helper."""
  if task.family == "jax":
    fn = cgfac_optax.value_grad_and_extra(task.model, loss=task.loss, **options)
    return lambda params, state, x, y, key: (*fn(params, x, y, key), state)
  if task.family == "linen":
    fn = cflax.value_grad_and_extra(task.model, loss=task.loss, **options)

    def linen(params, state, x, y, key):
      loss, grads, extra = fn(params, x, y, key, collections=state, train=True)
      return loss, grads, extra, extra.pop("collections", state)

    return linen

  def nnx_fn(params, state, x, y, key):
    model = nnx.merge(task.model, params, state)
    loss, grads, extra = cflax.nnx_value_grad_and_extra(model, x, y, key, loss=task.loss, **options)
    return loss, nnx.as_pure(grads), extra, nnx.as_pure(nnx.split(model, nnx.Param, ...)[2])

  return nnx_fn


def _curvature(task: T.Task, tx):
  helper = value_grad_and_extra(task)

  def update(params, state, opt_state, x, y, key):
    loss, grads, extra, state = helper(params, state, x, y, key)
    updates, opt_state = tx.update(grads, opt_state, params, **extra)
    return optax.apply_updates(params, updates), state, opt_state, loss

  return update


def update_fn(task: T.Task, tx, uses_curvature: bool) -> Callable:
  """``(params, state, opt_state, x, y, key) -> (params, state, opt_state, loss)``, not jitted."""
  return (_curvature if uses_curvature else _first_order)(task, tx)


def make_run(task: T.Task, tx, uses_curvature: bool, key_seed: int = 1000) -> Run:
  """The compiled step of ``tx`` on ``task`` (CG-FAC's through the helpers), and its evaluation."""
  update = jax.jit(update_fn(task, tx, uses_curvature), donate_argnums=(0, 1, 2))
  evaluate_model = T.evaluator(task)

  def init(seed):
    params, state = task.init(seed)
    # Copies: the steps donate their buffers, and a transformation may hold arrays it was
    # built with in its state (psgdax's key).
    opt_state = jax.tree.map(jnp.copy, tx.init(params))
    return params, state, opt_state, jax.random.key(seed + key_seed)

  def evaluate(carry):
    values = evaluate_model(carry[0], carry[1])
    scalars = cgfac_optax.state_scalars(carry[2])
    for name in ("damping", "step_size", "momentum"):
      if name in scalars:
        values[name] = float(scalars[name])
    return values

  return Run(init, stepper(update), evaluate, update)
