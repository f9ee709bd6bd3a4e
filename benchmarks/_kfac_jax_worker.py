"""Trains the benchmark models with kfac-jax; run by ``vs_kfac_jax.run_worker`` in its venv.

Imports only jax, numpy, optax, kfac_jax and ``_timed`` (never cgfac_optax or
flax): it runs under a different JAX. Usage:
``python _kfac_jax_worker.py INPUT.npz SETTINGS.json OUTPUT.json``.

The npz holds ``x``, ``y`` (training data), ``x_eval``, ``y_eval`` (no ``y``
or ``y_eval`` when the targets are the inputs) and each
seed's initial parameters as ``param/<seed>/<layer>/<kernel|bias>``: those the
other optimizers start from. The settings give the model (layers, loss, batch
size) and the runs, each ``{"name", "kind": "kfac" | "adam", "settings", "seed",
"budget", "evals", "max_steps"}``; a run's batches are ``_timed.Batches`` of its
seed and its clock is ``_timed.train_for``, as for the other optimizers.
"""

from __future__ import annotations

import itertools
import json
import sys
import time
import warnings

import jax
import jax.numpy as jnp
import kfac_jax
import numpy as np
import optax
from _timed import Batches, train_for

ACTIVATIONS = {None: None, "tanh": jnp.tanh, "relu": jax.nn.relu}

# kfac-jax donates the batch to its steps, which XLA cannot always reuse: a note, not a fault.
warnings.filterwarnings("ignore", message="Some donated buffers were not usable")


def forward(params, x, layers):
  """The model of ``_common.predict``; convolutions as ``lax.conv``, which kfac-jax recognizes."""
  h = x
  for layer in layers:
    p = params[layer["name"]]
    if layer["window"]:
      s = layer["stride"]
      dn = ("NHWC", "HWIO", "NHWC")
      z = jax.lax.conv_general_dilated(h, p["kernel"], (s, s), "VALID", dimension_numbers=dn)
    else:
      z = h.reshape(h.shape[0], -1) @ p["kernel"]
    z = z + p["bias"]
    act = ACTIVATIONS[layer["act"]]
    h = z if act is None else act(z)
  return h


def per_example_loss(loss, outputs, targets):
  if loss == "squared_error":
    return 0.5 * jnp.sum(jnp.square(outputs - targets), axis=-1)
  if loss == "sigmoid_binary_cross_entropy":
    return jnp.sum(optax.sigmoid_binary_cross_entropy(outputs, targets), axis=-1)
  if loss == "softmax_cross_entropy":
    return optax.softmax_cross_entropy_with_integer_labels(outputs, targets)
  raise ValueError(f"unknown loss {loss!r}")


def register_loss(loss, outputs, targets):
  """Tells kfac-jax the loss, so its curvature is the Fisher of the objective being minimized."""
  if loss == "squared_error":
    # kfac-jax's squared error is weight * sum (t - y)^2 / batch: weight 0.5 matches ours.
    kfac_jax.register_squared_error_loss(outputs, targets, weight=0.5)
  elif loss == "sigmoid_binary_cross_entropy":
    kfac_jax.register_sigmoid_cross_entropy_loss(outputs, targets)
  elif loss == "softmax_cross_entropy":
    kfac_jax.register_softmax_cross_entropy_loss(outputs, targets)
  else:
    raise ValueError(f"unknown loss {loss!r}")


def main(inp, settings_path, out_path):
  settings = json.loads(open(settings_path).read())
  data = np.load(inp)
  layers, loss, batch_size = settings["layers"], settings["loss"], settings["batch_size"]
  x_train, x_eval = jnp.asarray(data["x"]), jnp.asarray(data["x_eval"])
  # Without targets in the file, the targets are the inputs (an autoencoder).
  y_train = jnp.asarray(data["y"]) if "y" in data else x_train
  y_eval = jnp.asarray(data["y_eval"]) if "y_eval" in data else x_eval

  def initial_params(seed):
    return {
      ly["name"]: {
        k: jnp.asarray(data[f"param/{seed}/{ly['name']}/{k}"]) for k in ("kernel", "bias")
      }
      for ly in layers
    }

  def loss_fn(params, batch):
    x, y = batch
    outputs = forward(params, x, layers)
    register_loss(loss, outputs, y)
    return jnp.mean(per_example_loss(loss, outputs, y))

  @jax.jit
  def eval_fn(params):
    outputs = forward(params, x_eval, layers)
    values = {"loss": jnp.mean(per_example_loss(loss, outputs, y_eval))}
    if loss == "softmax_cross_entropy":
      values["accuracy"] = jnp.mean(jnp.argmax(outputs, -1) == y_eval)
    return values

  def evaluate(carry):
    return {k: float(v) for k, v in eval_fn(carry[0]).items()}

  def make_kfac(options, seed):
    opt = kfac_jax.Optimizer(
      value_and_grad_func=jax.value_and_grad(loss_fn),
      l2_reg=0.0,
      multi_device=False,
      **options,
    )
    rng = jax.random.PRNGKey(seed)
    burnin = options.get("num_burnin_steps", 10)

    def step(carry, batch, i):
      params, state = carry
      key = jax.random.fold_in(rng, i)
      if i == 0:
        # kfac-jax draws its burn-in (curvature-only) batches from an iterator before the first
        # step's batch: those are the first batches of the same order, so that step i trains on
        # batch i as every other optimizer does.
        first = itertools.islice(Batches(x_train, y_train, batch_size, seed), burnin)
        it = itertools.chain(first, [batch])
        params, state, stats = opt.step(params, state, key, data_iterator=it, global_step_int=i)
      else:
        params, state, stats = opt.step(params, state, key, batch=batch, global_step_int=i)
      return (params, state), stats["loss"]

    def init(params):
      return opt.init(params, rng, (x_train[:batch_size], y_train[:batch_size]))

    # kfac-jax compiles one step per combination of "update the damping" and "refresh the
    # inverses" (it branches in Python on the step number): the warm-up covers every one.
    periods = (
      options.get("inverse_update_period", 5),
      options.get("damping_adaptation_interval", 5),
    )
    return step, init, max(periods) + 2

  def make_adam(options, seed):
    del seed
    tx = optax.adam(options["learning_rate"])

    @jax.jit
    def update(params, state, batch):
      value, grads = jax.value_and_grad(loss_fn)(params, batch)
      updates, state = tx.update(grads, state, params)
      return optax.apply_updates(params, updates), state, value

    def step(carry, batch, i):
      del i
      params, state, value = update(*carry, batch)
      return (params, state), value

    return step, tx.init, 2

  results = {
    "jax": jax.__version__,
    "kfac_jax": getattr(kfac_jax, "__version__", "?"),
    "device": str(jax.devices()[0]),
    "runs": [],
  }
  makers = {"kfac": make_kfac, "adam": make_adam}
  for run in settings["runs"]:
    seed = run["seed"]
    step, init, warmup_steps = makers[run["kind"]](run["settings"], seed)
    # Compile outside the clock: a few steps on another batch order, then start afresh.
    start = time.perf_counter()
    carry = (initial_params(seed), None)
    carry = (carry[0], init(carry[0]))
    warm = Batches(x_train, y_train, batch_size, seed + 1)
    for i in range(warmup_steps):
      carry, value = step(carry, next(warm), i)
    jax.block_until_ready(value)
    evaluate(carry)
    compile_s = time.perf_counter() - start
    params = initial_params(seed)
    out = train_for(
      step,
      (params, init(params)),
      Batches(x_train, y_train, batch_size, seed),
      evaluate,
      run["budget"],
      run["evals"],
      run["max_steps"],
    )
    out.update(name=run["name"], seed=seed, settings=run["settings"], compile_s=compile_s)
    results["runs"].append(out)
    print(
      f"kfac-jax worker: {run['name']} seed {seed}: {out['steps']} steps, "
      f"loss {out['curve']['loss'][-1]:.4g}",
      flush=True,
    )
  with open(out_path, "w") as f:
    json.dump(results, f)


if __name__ == "__main__":
  main(*sys.argv[1:4])
