"""Step control: plain CG-FAC diverges at a too-large learning rate, the default does not.

Trains a 64-32-10 tanh MLP on sklearn's digits (1500 training images, minibatches of 128,
empirical-Fisher stats computed by hand) with ``cgfac(learning_rate, damping=1e-3,
momentum=0.9)`` twice per learning rate: without KL clipping (``kl_clip=None``) and with the
default step control (``kl_clip=1e-3``). Prints a summary of each loss curve (full training
set, every step) and the test accuracy, and writes JSON (and a PNG if matplotlib is installed).

Usage: ``python benchmarks/step_control.py [--lrs 0.1 1 3] [--steps 200] [--adaptive]``.
"""

from __future__ import annotations

import argparse
import json
import platform
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
from sklearn.datasets import load_digits

import cgfac_optax as cgfac

RESULTS = Path(__file__).resolve().parent / "results"


def mlp_init(seed, sizes=(64, 32, 10)):
  keys = jax.random.split(jax.random.key(seed), len(sizes) - 1)
  return {
    f"layer{i}": {"kernel": jax.random.normal(k, (m, n)) / np.sqrt(m), "bias": jnp.zeros(n)}
    for i, (k, m, n) in enumerate(zip(keys, sizes[:-1], sizes[1:]))
  }


def forward(params, x, eps=None):
  h, inputs = x, {}
  names = sorted(params)
  for i, name in enumerate(names):
    inputs[name] = h
    z = h @ params[name]["kernel"] + params[name]["bias"]
    if eps is not None:
      z = z + eps[name]  # a zero perturbation: its gradient is the output gradient
    h = jnp.tanh(z) if i < len(names) - 1 else z
  return h, inputs


def mean_loss(params, x, y):
  return optax.softmax_cross_entropy_with_integer_labels(forward(params, x)[0], y).mean()


def loss_grads_stats(params, x, y):
  """Mean loss, its gradient and each layer's DenseStats (per-example output gradients)."""
  eps = {k: jnp.zeros((x.shape[0], p["bias"].shape[0])) for k, p in params.items()}

  def total(params, eps):
    logits, inputs = forward(params, x, eps)
    per_example = optax.softmax_cross_entropy_with_integer_labels(logits, y)
    return per_example.sum(), (per_example.mean(), inputs)

  (_, (loss, inputs)), (g_params, g_out) = jax.value_and_grad(total, (0, 1), has_aux=True)(
    params, eps
  )
  grads = jax.tree.map(lambda t: t / x.shape[0], g_params)
  return loss, grads, {k: cgfac.DenseStats(inputs[k], g_out[k]) for k in params}


def train(tx, data, steps, batch, seed=0):
  x_train, y_train, x_test, y_test = data
  n = x_train.shape[0]

  @jax.jit
  def step(params, opt_state, i):
    idx = jax.random.choice(jax.random.fold_in(jax.random.key(seed + 1), i), n, (batch,), False)
    x, y = x_train[idx], y_train[idx]
    loss, grads, stats = loss_grads_stats(params, x, y)
    updates, opt_state = tx.update(
      grads,
      opt_state,
      params,
      layer_stats=stats,
      value=loss,
      value_fn=lambda p: mean_loss(p, x, y),
    )
    return optax.apply_updates(params, updates), opt_state

  evaluate = jax.jit(mean_loss)
  params = mlp_init(seed)
  opt_state = tx.init(params)
  losses = [float(evaluate(params, x_train, y_train))]
  for i in range(steps):
    params, opt_state = step(params, opt_state, i)
    losses.append(float(evaluate(params, x_train, y_train)))
  logits = forward(params, x_test)[0]
  accuracy = float(jnp.mean(jnp.argmax(logits, -1) == y_test))
  return np.array(losses), accuracy, opt_state[0]


def summary(losses):
  finite = losses[np.isfinite(losses)]
  return {
    "initial": float(losses[0]),
    "min": float(finite.min()) if finite.size else float("nan"),
    "max": float(finite.max()) if finite.size else float("nan"),
    "final": float(losses[-1]),
    "mean_last_20": float(np.mean(losses[-20:])),
    "diverged": bool(not np.isfinite(losses[-1]) or np.mean(losses[-20:]) > losses[0]),
  }


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--lrs", type=float, nargs="+", default=[0.1, 1.0, 3.0])
  parser.add_argument("--steps", type=int, default=200)
  parser.add_argument("--batch", type=int, default=128)
  parser.add_argument("--damping", type=float, default=1e-3)
  parser.add_argument("--adaptive", action="store_true", help="also run adaptive damping")
  parser.add_argument("--out", default=str(RESULTS), help="output folder")
  args = parser.parse_args()

  print(
    f"device: {jax.devices()[0].device_kind} | python {platform.python_version()} | "
    f"jax {jax.__version__} | optax {optax.__version__} | cgfac_optax {cgfac.__version__}"
  )
  x, y = load_digits(return_X_y=True)
  x = jnp.asarray(x / 16.0, jnp.float32)
  y = jnp.asarray(y)
  data = (x[:1500], y[:1500], x[1500:], y[1500:])

  configs = {
    "plain (kl_clip=None)": {"kl_clip": None},
    "default (kl_clip=1e-3)": {},
  }
  if args.adaptive:
    configs["default + AdaptiveDamping"] = {"damping": cgfac.AdaptiveDamping(initial=args.damping)}

  results = []
  header = f"{'lr':>5} {'run':<27} {'initial':>8} {'min':>8} {'max':>10} {'final':>10}"
  print(header + f" {'last20':>9} {'test acc':>8} {'clip':>8}  diverged")
  for lr in args.lrs:
    for name, options in configs.items():
      options = {"damping": args.damping, **options}
      tx = cgfac.cgfac(lr, momentum=0.9, **options)
      losses, accuracy, state = train(tx, data, args.steps, args.batch)
      s = summary(losses)
      clip = float(state.control.clip)
      print(
        f"{lr:>5g} {name:<27} {s['initial']:>8.3f} {s['min']:>8.3f} {s['max']:>10.3g} "
        f"{s['final']:>10.3g} {s['mean_last_20']:>9.3g} {accuracy:>8.3f} {clip:>8.3g}  "
        f"{s['diverged']}"
      )
      results.append(
        {"learning_rate": lr, "run": name, **s, "test_accuracy": accuracy, "last_clip": clip}
        | {"losses": losses.tolist(), "final_damping": float(state.control.damping)}
      )

  out = Path(args.out)
  out.mkdir(parents=True, exist_ok=True)
  settings = {k: v for k, v in vars(args).items() if k != "out"}
  payload = {"settings": settings, "jax": jax.__version__, "results": results}
  (out / "step_control.json").write_text(json.dumps(payload, indent=2))
  try:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
  except ImportError:
    print(f"wrote {out / 'step_control.json'}")
    return
  fig, axes = plt.subplots(1, len(args.lrs), figsize=(4 * len(args.lrs), 3.2), squeeze=False)
  for ax, lr in zip(axes[0], args.lrs):
    for r in results:
      if r["learning_rate"] == lr:
        ax.semilogy(r["losses"], label=r["run"])
    ax.set_title(f"learning rate {lr:g}")
    ax.set_xlabel("step")
  axes[0][0].set_ylabel("training loss")
  axes[0][0].legend(fontsize=7)
  fig.tight_layout()
  fig.savefig(out / "step_control.png", dpi=110)
  print(f"wrote {out / 'step_control.json'} and {out / 'step_control.png'}")


if __name__ == "__main__":
  main()
