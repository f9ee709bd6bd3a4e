"""CG-FAC, Adam and Muon train a small decoder-only transformer (Flax NNX) on characters.

The model: token and position embeddings, ``--layers`` pre-norm blocks (``nnx.LayerNorm``,
``nnx.MultiHeadAttention`` with a causal mask, an ``nnx.Linear`` MLP of width ``4 d``) and a final
LayerNorm and ``nnx.Linear`` head, trained to predict the next character. The text is the
Python standard library's own sources on this machine (no download): its top-level ``*.py``
files in sorted order, as ASCII (other characters become ``?``, 128 tokens); the last tenth is
held out.

Each optimizer trains the same initialisation on the same batches for ``--seconds`` of compiled
training steps (compilation and evaluations excluded): CG-FAC as ``cgfac_optax.cgfac()`` (its
defaults) on every parameter, the layers without curvature stats taking its fallback; Adam; and
``optax.contrib.muon`` on the hidden matrices (attention and MLP kernels, the attention kernels
as matrices of their input and output axes), with Adam on embeddings, head, norms and biases.
The script prints which parameters CG-FAC captures and which take the fallback, then a table
(steps, tokens/s, final train and validation loss), and writes ``transformer.json`` and
``transformer.png`` (validation loss against time) to ``--out``.

  python benchmarks/transformer.py                 # 90 s per optimizer
  python benchmarks/transformer.py --tiny --out /tmp/t  # a smoke run (the tests)
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import platform
import sysconfig
import time

import flax
import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

import cgfac_optax
from cgfac_optax import flax as cflax
from cgfac_optax._alias import ADAPTIVE_DEFAULTS

DEFAULT_OUT = pathlib.Path(__file__).resolve().parent / "results" / "transformer"
LOSS = "softmax_cross_entropy"
VOCAB = 128
# One learning rate each, not tuned on this task: Adam 3e-3; Muon 0.02 (the demo's), with Adam's
# 3e-3 for its Adam part. CG-FAC chooses its own step sizes.
ADAM_LR = 3e-3
MUON_LR = 0.02


def load_text(chars: int) -> tuple[str, np.ndarray]:
  """The first ``chars`` characters of the standard library's top-level sources, as tokens."""
  stdlib = pathlib.Path(sysconfig.get_paths()["stdlib"])
  parts, total = [], 0
  for path in sorted(stdlib.glob("*.py")):
    text = path.read_text(encoding="utf-8", errors="replace")
    parts.append(text)
    total += len(text)
    if total >= chars:
      break
  text = "".join(parts)[:chars]
  tokens = np.frombuffer(text.encode("ascii", errors="replace"), np.uint8).astype(np.int32)
  return str(stdlib), tokens


class Block(nnx.Module):
  def __init__(self, d: int, heads: int, *, rngs: nnx.Rngs):
    self.norm1 = nnx.LayerNorm(d, rngs=rngs)
    self.attention = nnx.MultiHeadAttention(heads, d, decode=False, rngs=rngs)
    self.norm2 = nnx.LayerNorm(d, rngs=rngs)
    self.up = nnx.Linear(d, 4 * d, rngs=rngs)
    self.down = nnx.Linear(4 * d, d, rngs=rngs)

  def __call__(self, x, mask):
    x = x + self.attention(self.norm1(x), mask=mask)
    return x + self.down(jax.nn.gelu(self.up(self.norm2(x))))


class CharTransformer(nnx.Module):
  def __init__(self, d: int, heads: int, layers: int, context: int, *, rngs: nnx.Rngs):
    self.embed = nnx.Embed(VOCAB, d, rngs=rngs)
    self.position = nnx.Param(0.02 * jax.random.normal(rngs.params(), (context, d)))
    self.blocks = nnx.List([Block(d, heads, rngs=rngs) for _ in range(layers)])
    self.norm = nnx.LayerNorm(d, rngs=rngs)
    self.head = nnx.Linear(d, VOCAB, rngs=rngs)

  def __call__(self, tokens):
    x = self.embed(tokens) + self.position[: tokens.shape[1]]
    mask = nnx.make_causal_mask(tokens)
    for block in self.blocks:
      x = block(x, mask)
    return self.head(self.norm(x))


def mean_loss(model, x, y):
  return optax.softmax_cross_entropy_with_integer_labels(model(x), y).mean()


def muon_dimension_numbers(params):
  """Muon for the hidden matrices; ``None`` (Adam) for embeddings, head, norms and biases."""
  MDN = optax.contrib.MuonDimensionNumbers

  def spec(path, p):
    names = [str(getattr(k, "key", getattr(k, "idx", k))) for k in path]
    if names[-1] != "kernel" or names[0] == "head":
      return None
    if "attention" in names:  # q/k/v: (d, heads, head_dim); out: (heads, head_dim, d)
      return MDN(reduction_axis=(0, 1), output_axis=2) if "out" in names else MDN(0, (1, 2))
    return MDN()

  # An NNX Variable is a node: its path ends at it, and its dimension numbers stand for its value.
  is_variable = lambda x: isinstance(x, nnx.Variable)
  return jax.tree_util.tree_map_with_path(spec, params, is_leaf=is_variable)


def optimizers(damping_floor: float | None = None) -> dict[str, optax.GradientTransformation]:
  """The three optimizers; ``damping_floor`` replaces ``cgfac()``'s adaptive damping floor.

  With a floor, the damping starts at the larger of it and ``cgfac()``'s initial damping.
  """
  damping = None
  if damping_floor is not None:
    initial = max(damping_floor, ADAPTIVE_DEFAULTS["damping"].initial)
    damping = cgfac_optax.AdaptiveDamping(initial=initial, minimum=damping_floor)
  return {
    "CG-FAC": cgfac_optax.cgfac(damping=damping),
    "Adam": optax.adam(ADAM_LR),
    "Muon": optax.contrib.muon(
      MUON_LR, adam_learning_rate=ADAM_LR, muon_weight_dimension_numbers=muon_dimension_numbers
    ),
  }


def make_step(name: str):
  if name == "CG-FAC":

    @nnx.jit
    def step(model, optimizer, x, y, key):
      loss, grads, stats = cflax.nnx_value_grad_and_stats(model, x, y, key, loss=LOSS)
      graphdef, _, rest = nnx.split(model, nnx.Param, ...)
      optimizer.update(
        model,
        grads,
        layer_stats=stats,
        curvature_model=cflax.nnx_curvature_model(model, x, loss=LOSS),
        value=loss,
        value_fn=lambda p: mean_loss(nnx.merge(graphdef, p, rest), x, y),
      )
      return loss

  else:

    @nnx.jit
    def step(model, optimizer, x, y, key):
      del key
      loss, grads = nnx.value_and_grad(mean_loss)(model, x, y)
      optimizer.update(model, grads)
      return loss

  return step


def windows(tokens: np.ndarray, starts: np.ndarray, context: int):
  idx = starts[:, None] + np.arange(context + 1)[None]
  chunk = tokens[idx]
  return jnp.asarray(chunk[:, :-1]), jnp.asarray(chunk[:, 1:])


def capture_report(model, x, y) -> dict:
  """Which parameters get CG-FAC's Kronecker-factored solve and which its fallback."""
  # Shapes only: nothing is computed.
  graphdef, state = nnx.split(model)
  stats = jax.eval_shape(
    lambda s: cflax.nnx_value_grad_and_stats(nnx.merge(graphdef, s), x, y, jax.random.key(0))[2],
    state,
  )
  params = nnx.state(model, nnx.Param)
  layers = set(cgfac_optax.plan(params, stats))
  captured, fallback = [], []
  for path, leaf in jax.tree_util.tree_flatten_with_path(nnx.to_pure_dict(params))[0]:
    name = "/".join(str(getattr(k, "key", getattr(k, "idx", k))) for k in path)
    layer = name.rpartition("/")[0]
    (captured if layer in layers else fallback).append((name, int(np.size(leaf))))
  return {"captured": captured, "fallback": fallback, "layers": sorted(layers)}


def train(name, tx, args, data):
  """Trains a fresh model with ``tx`` for ``args.seconds`` of steps; the curve and the rates."""
  train_tokens, val_tokens = data
  steps_cap = args.max_steps or 10**9
  val_starts = np.random.default_rng(123).integers(
    0, len(val_tokens) - args.context - 1, size=args.val_batches * args.batch
  )
  val_x, val_y = windows(val_tokens, val_starts, args.context)
  fresh = lambda: CharTransformer(
    args.d_model, args.heads, args.layers, args.context, rngs=nnx.Rngs(args.seed)
  )
  step = make_step(name)
  evaluate = nnx.jit(mean_loss)
  key = jax.random.key(args.seed + 1)

  def batch(i):
    """Batch ``i``: the same for every optimizer."""
    starts = np.random.default_rng([args.seed, i]).integers(
      0, len(train_tokens) - args.context - 1, size=args.batch
    )
    return windows(train_tokens, starts, args.context)

  # Compile (and run once) on a throwaway copy before the clock starts.
  warm = fresh()
  x0, y0 = batch(0)
  jax.block_until_ready(step(warm, nnx.Optimizer(warm, tx, wrt=nnx.Param), x0, y0, key))
  jax.block_until_ready(evaluate(warm, val_x, val_y))
  del warm

  model = fresh()
  optimizer = nnx.Optimizer(model, tx, wrt=nnx.Param)
  initial = float(evaluate(model, val_x, val_y))
  curve = {"time": [0.0], "step": [0], "train_loss": [initial], "val_loss": [initial]}
  clock, steps, smoothed = 0.0, 0, None
  next_eval = args.seconds / args.evals
  while clock < args.seconds and steps < steps_cap:
    x, y = batch(steps)
    start = time.perf_counter()
    loss = float(
      jax.block_until_ready(step(model, optimizer, x, y, jax.random.fold_in(key, steps)))
    )
    clock += time.perf_counter() - start
    steps += 1
    smoothed = loss if smoothed is None else 0.9 * smoothed + 0.1 * loss
    if clock >= next_eval or clock >= args.seconds or steps == steps_cap:
      next_eval = (int(clock * args.evals / args.seconds) + 1) * args.seconds / args.evals
      curve["time"].append(clock)
      curve["step"].append(steps)
      curve["train_loss"].append(smoothed)
      curve["val_loss"].append(float(evaluate(model, val_x, val_y)))
  result = {
    "optimizer": name,
    "steps": steps,
    "seconds": clock,
    "tokens_per_s": steps * args.batch * args.context / clock,
    "step_ms": 1e3 * clock / steps,
    "train_loss": curve["train_loss"][-1],
    "val_loss": curve["val_loss"][-1],
    "curve": curve,
  }
  if name == "CG-FAC":
    # The logging helper's scalars of the last step (per-layer entries left out).
    scalars = cgfac_optax.state_scalars(nnx.as_pure(optimizer.opt_state))
    result["last_step"] = {k: float(v) for k, v in scalars.items() if "/" not in k}
  print(
    f"{name:<8}{steps:>7}{clock:>9.1f}{result['tokens_per_s']:>11.0f}{result['step_ms']:>10.1f}"
    f"{result['train_loss']:>12.3f}{result['val_loss']:>10.3f}",
    flush=True,
  )
  return result


def plot(results, path: pathlib.Path, title: str) -> None:
  import matplotlib

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  fig, ax = plt.subplots(figsize=(7, 4.5))
  for r in results:
    c = r["curve"]
    (line,) = ax.plot(c["time"], c["val_loss"], ".-", label=f"{r['optimizer']} (validation)")
    ax.plot(c["time"][1:], c["train_loss"][1:], "--", color=line.get_color(), alpha=0.6)
  ax.set_xlabel("wall-clock time of the training steps (s)")
  ax.set_ylabel("cross-entropy per character (dashed: train, smoothed)")
  ax.set_title(title)
  ax.legend()
  ax.grid(alpha=0.3)
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)


def parse_args(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--seconds", type=float, default=90.0, help="training time per optimizer")
  parser.add_argument(
    "--max-steps", type=int, default=0, help="at most this many steps (0: no cap)"
  )
  parser.add_argument("--chars", type=int, default=2_000_000, help="characters of text")
  parser.add_argument("--d-model", type=int, default=128)
  parser.add_argument("--heads", type=int, default=4)
  parser.add_argument("--layers", type=int, default=2)
  parser.add_argument("--context", type=int, default=64)
  parser.add_argument("--batch", type=int, default=32)
  parser.add_argument("--evals", type=int, default=20, help="evaluations per run")
  parser.add_argument("--val-batches", type=int, default=8)
  parser.add_argument("--seed", type=int, default=0)
  parser.add_argument("--optimizers", default="CG-FAC,Adam,Muon")
  parser.add_argument(
    "--damping-floor",
    type=float,
    default=None,
    help="CG-FAC's adaptive damping floor (default: cgfac()'s own)",
  )
  parser.add_argument("--out", type=pathlib.Path, default=DEFAULT_OUT)
  parser.add_argument("--tiny", action="store_true", help="a seconds-long smoke run")
  args = parser.parse_args(argv)
  if args.tiny:
    args.seconds, args.max_steps, args.chars, args.evals = 30.0, 3, 50_000, 2
    args.d_model, args.heads, args.layers, args.context, args.batch = 16, 2, 1, 8, 8
    args.val_batches = 1
  return args


def main(argv=None):
  args = parse_args(argv)
  load_before = os.getloadavg()
  source, tokens = load_text(args.chars)
  cut = int(0.9 * len(tokens))
  data = tokens[:cut], tokens[cut:]
  print(
    f"device {jax.devices()[0].device_kind} ({jax.default_backend()}), jax {jax.__version__}, "
    f"flax {flax.__version__}, optax {optax.__version__}, cgfac_optax {cgfac_optax.__version__}, "
    f"python {platform.python_version()}, load average {load_before[0]:.2f}"
  )
  print(f"text: {len(tokens):,} characters of {source}/*.py ({cut:,} train)")
  model = CharTransformer(args.d_model, args.heads, args.layers, args.context, rngs=nnx.Rngs(0))
  x, y = windows(data[0], np.arange(args.batch), args.context)
  report = capture_report(model, x, y)
  n_params = sum(n for _, n in report["captured"] + report["fallback"])
  n_captured = sum(n for _, n in report["captured"])
  print(
    f"model: d={args.d_model}, {args.heads} heads, {args.layers} blocks, context {args.context}, "
    f"{n_params:,} parameters; batch {args.batch}"
  )
  print(f"CG-FAC captures {len(report['layers'])} layers ({n_captured:,} parameters):")
  print("  " + ", ".join(report["layers"]))
  print(f"fallback (diagonal) for {n_params - n_captured:,} parameters:")
  print("  " + ", ".join(name for name, _ in report["fallback"]))
  head = f"{'':<8}{'steps':>7}{'train s':>9}{'tokens/s':>11}{'ms/step':>10}"
  head += f"{'train loss':>12}{'val loss':>10}"
  print(head + "\n" + "-" * len(head))
  results = [
    train(name, tx, args, data)
    for name, tx in optimizers(args.damping_floor).items()
    if name in args.optimizers.split(",")
  ]
  load_after = os.getloadavg()
  print(f"load average before {load_before}, after {load_after}")
  args.out.mkdir(parents=True, exist_ok=True)
  title = f"char transformer ({n_params:,} params), {args.seconds:g} s per optimizer"
  plot(results, args.out / "transformer.png", title)
  record = {
    "config": {k: (str(v) if isinstance(v, pathlib.Path) else v) for k, v in vars(args).items()},
    "device": jax.devices()[0].device_kind,
    "versions": {
      "jax": jax.__version__,
      "flax": flax.__version__,
      "optax": optax.__version__,
      "cgfac_optax": cgfac_optax.__version__,
      "python": platform.python_version(),
    },
    "cpu_count": os.cpu_count(),
    "load_average": {"before": load_before, "after": load_after},
    "text": {"source": source, "characters": len(tokens)},
    "parameters": n_params,
    "capture": report,
    "results": results,
  }
  (args.out / "transformer.json").write_text(json.dumps(record, indent=1))
  print(f"wrote {args.out / 'transformer.json'} and {args.out / 'transformer.png'}")
  return record


if __name__ == "__main__":
  main()
