"""Trains the autoencoder with kfac-jax; run by vs_kfac_jax.py inside the kfac-jax venv.

Imports only jax, numpy and kfac_jax (never cgfac_optax or flax): it runs under a
different JAX. Usage: ``python _kfac_jax_worker.py INPUT.npz SETTINGS.json OUTPUT.json``.
The npz holds ``x`` (training images), ``x_eval`` and the initial parameters as
``param/<layer>/<kernel|bias>``; the same parameters the CG-FAC run starts from.
"""

from __future__ import annotations

import json
import math
import sys
import time

import jax
import jax.numpy as jnp
import kfac_jax
import numpy as np


def forward(params, x, names, linear):
  h = x
  for name in names:
    z = h @ params[name]["kernel"] + params[name]["bias"]
    h = z if name in linear else jnp.tanh(z)
  return h


def sigmoid_ce(logits, x):
  return jnp.mean(jnp.sum(jnp.logaddexp(0.0, logits) - x * logits, axis=-1))


def main(inp, settings_path, out_path):
  settings = json.loads(open(settings_path).read())
  data = np.load(inp)
  names, linear = settings["layers"], set(settings["linear_layers"])
  params0 = {
    n: {
      "kernel": jnp.asarray(data[f"param/{n}/kernel"]),
      "bias": jnp.asarray(data[f"param/{n}/bias"]),
    }
    for n in names
  }
  x_train, x_eval = jnp.asarray(data["x"]), jnp.asarray(data["x_eval"])
  batch_size, budget = settings["batch_size"], settings["budget"]

  def loss_fn(params, batch):
    logits = forward(params, batch, names, linear)
    kfac_jax.register_sigmoid_cross_entropy_loss(logits, batch)
    return sigmoid_ce(logits, batch)

  eval_loss = jax.jit(lambda p: sigmoid_ce(forward(p, x_eval, names, linear), x_eval))
  results = {
    "jax": jax.__version__,
    "kfac_jax": getattr(kfac_jax, "__version__", "?"),
    "device": str(jax.devices()[0]),
    "runs": {},
  }

  def batches(seed):
    rng = np.random.default_rng(seed)
    order, pos = rng.permutation(len(x_train)), 0
    while True:
      if pos + batch_size > len(order):
        order, pos = rng.permutation(len(order)), 0
      yield x_train[order[pos : pos + batch_size]]
      pos += batch_size

  def train(name, make_step, seed, warmup_steps):
    # One optimizer object, so the timed run reuses the compiled steps; state made anew.
    # kfac-jax compiles separate steps for "refresh the inverses" and "reuse them" (it
    # branches on global_step_int in Python): the warm-up covers both.
    step, init = make_step()
    params = jax.tree_util.tree_map(jnp.copy, params0)
    state, warm = init(params), batches(seed + 1)
    start = time.perf_counter()
    for i in range(warmup_steps):
      params, state, loss = step(params, state, warm, i)
    jax.block_until_ready(loss)
    compile_s = time.perf_counter() - start
    params = jax.tree_util.tree_map(jnp.copy, params0)
    state = init(params)
    it = batches(seed)
    history = [(0.0, 0, float(eval_loss(params)))]
    clock, steps, every, diverged = 0.0, 0, budget / settings["evals"], False
    next_eval = every
    step_times = []
    while clock < budget and steps < settings["max_steps"]:
      t0 = time.perf_counter()
      params, state, loss = step(params, state, it, steps)
      loss = float(loss)
      dt = time.perf_counter() - t0
      clock += dt
      step_times.append(dt)
      steps += 1
      if not math.isfinite(loss):
        diverged = True
        break
      if clock >= next_eval:
        history.append((clock, steps, float(eval_loss(params))))
        next_eval += every
    if history[-1][1] != steps and not diverged:
      history.append((clock, steps, float(eval_loss(params))))
    results["runs"][name] = {
      "compile_s": compile_s,
      "steps": steps,
      "wall_s": clock,
      "step_s_median": float(np.median(step_times[1:] or step_times)),
      "final_loss": float("nan") if diverged else history[-1][2],
      "diverged": diverged,
      "history": history,
    }
    print(f"kfac-jax worker: {name}: {steps} steps, loss {history[-1][2]:.4g}", flush=True)

  def make_kfac(period):
    def make():
      opt = kfac_jax.Optimizer(
        value_and_grad_func=jax.value_and_grad(loss_fn),
        l2_reg=0.0,
        use_adaptive_learning_rate=True,
        use_adaptive_momentum=True,
        use_adaptive_damping=True,
        initial_damping=settings["initial_damping"],
        min_damping=1e-5,
        max_damping=1000.0,
        damping_adaptation_interval=5,
        damping_adaptation_decay=0.95,
        curvature_ema=0.95,
        num_burnin_steps=5,
        inverse_update_period=period,
        multi_device=False,
      )
      rng = jax.random.PRNGKey(settings["seed"])

      def step(params, state, it, i):
        # The iterator lets kfac-jax draw its burn-in batches (num_burnin_steps) on step 0.
        params, state, stats = opt.step(
          params, state, jax.random.fold_in(rng, i), data_iterator=it, global_step_int=i
        )
        return params, state, stats["loss"]

      return step, lambda params: opt.init(params, rng, x_train[:batch_size])

    return make

  def make_adam():
    lr, b1, b2, eps = settings["adam_learning_rate"], 0.9, 0.999, 1e-8

    @jax.jit
    def step(params, state, batch, i):
      m, v, t = state
      loss, g = jax.value_and_grad(lambda p: sigmoid_ce(forward(p, batch, names, linear), batch))(
        params
      )
      t = t + 1
      m = jax.tree_util.tree_map(lambda m, g: b1 * m + (1 - b1) * g, m, g)
      v = jax.tree_util.tree_map(lambda v, g: b2 * v + (1 - b2) * g * g, v, g)
      c1, c2 = 1 - b1**t, 1 - b2**t
      params = jax.tree_util.tree_map(
        lambda p, m, v: p - lr * (m / c1) / (jnp.sqrt(v / c2) + eps), params, m, v
      )
      return params, (m, v, t), loss

    def init(params):
      zeros = jax.tree_util.tree_map(jnp.zeros_like, params)
      return zeros, zeros, jnp.zeros([], jnp.float32)

    return lambda p, s, it, i: step(p, s, next(it), i), init

  train("adam (same jax as kfac-jax)", make_adam, settings["seed"], 1)
  for period in settings["inverse_update_periods"]:
    train(f"kfac-jax (inverse every {period})", make_kfac(period), settings["seed"], period + 2)
  with open(out_path, "w") as f:
    json.dump(results, f)


if __name__ == "__main__":
  main(*sys.argv[1:4])
