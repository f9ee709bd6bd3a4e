"""The benchmark models: an autoencoder in plain JAX, a Linen ResNet, an NNX transformer.

Imports only JAX, Flax and NumPy (never cgfac_optax), so that the kfac-jax worker, which
runs under an older JAX in its own venv, trains exactly the same functions.

- :func:`autoencoder_apply`: the deep autoencoder of the K-FAC papers, a plain function of a
  ``{"Dense_i": {"kernel", "bias"}}`` tree (784-1000-500-250-30-250-500-1000-784 on
  Fashion-MNIST; tanh after every layer but the 30-unit code and the output).
- :class:`ResNet`: a residual network of the kind that classifies ImageNet, thinned for
  28x28 images: a 3x3 stem, stages of basic blocks (two 3x3 convolutions, BatchNorm after
  each, a 1x1 projection where the shape changes) with 16, 32 and 64 filters, global average
  pooling and a dense head.
- :class:`CharTransformer`: a decoder-only transformer on characters: token and position
  embeddings, pre-norm blocks (causal ``nnx.MultiHeadAttention``, a GELU MLP of width
  ``4 d``), a final LayerNorm and a dense head.
"""

from __future__ import annotations

from collections.abc import Sequence
from functools import partial

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

AUTOENCODER_SIZES = (784, 1000, 500, 250, 30, 250, 500, 1000, 784)


def autoencoder_init(key: jax.Array, sizes: Sequence[int] = AUTOENCODER_SIZES) -> dict:
  """LeCun-normal kernels and zero biases (what ``nn.Dense`` would start from)."""
  params = {}
  for i, (k, d_in, d_out) in enumerate(
    zip(jax.random.split(key, len(sizes) - 1), sizes, sizes[1:])
  ):
    kernel = jax.nn.initializers.lecun_normal()(k, (d_in, d_out), jnp.float32)
    params[f"Dense_{i}"] = {"kernel": kernel, "bias": jnp.zeros((d_out,), jnp.float32)}
  return params


def autoencoder_apply(params: dict, x: jax.Array) -> jax.Array:
  """The reconstruction (predicted means) of ``x``; linear code and output layers."""
  n = len(params)
  code = int(np.argmin([params[f"Dense_{i}"]["kernel"].shape[1] for i in range(n)]))
  h = x
  for i in range(n):
    layer = params[f"Dense_{i}"]
    h = h @ layer["kernel"] + layer["bias"]
    if i not in (code, n - 1):
      h = jnp.tanh(h)
  return h


class BasicBlock(nn.Module):
  """Two 3x3 convolutions with BatchNorm, and the identity (or a 1x1 projection) added."""

  filters: int
  strides: int = 1

  @nn.compact
  def __call__(self, x, train: bool):
    norm = partial(nn.BatchNorm, use_running_average=not train, momentum=0.9)
    conv = partial(nn.Conv, use_bias=False)
    y = conv(self.filters, (3, 3), self.strides)(x)
    y = nn.relu(norm()(y))
    y = conv(self.filters, (3, 3))(y)
    y = norm(scale_init=nn.initializers.zeros)(y)
    if x.shape != y.shape:
      x = norm()(conv(self.filters, (1, 1), self.strides)(x))
    return nn.relu(x + y)


class ResNet(nn.Module):
  """Stem, stages of :class:`BasicBlock` (the first block of a stage strides by 2), head."""

  stages: Sequence[int] = (1, 1, 1)
  filters: int = 16
  classes: int = 10

  @nn.compact
  def __call__(self, x, train: bool = True):
    x = nn.Conv(self.filters, (3, 3), use_bias=False)(x)
    x = nn.relu(nn.BatchNorm(use_running_average=not train, momentum=0.9)(x))
    for i, blocks in enumerate(self.stages):
      for j in range(blocks):
        strides = 2 if i > 0 and j == 0 else 1
        x = BasicBlock(self.filters * 2**i, strides)(x, train)
    return nn.Dense(self.classes)(jnp.mean(x, axis=(1, 2)))


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
  def __init__(self, vocab: int, d: int, heads: int, layers: int, context: int, *, rngs):
    self.embed = nnx.Embed(vocab, d, rngs=rngs)
    self.position = nnx.Param(0.02 * jax.random.normal(rngs.params(), (context, d)))
    self.blocks = nnx.List([Block(d, heads, rngs=rngs) for _ in range(layers)])
    self.norm = nnx.LayerNorm(d, rngs=rngs)
    self.head = nnx.Linear(d, vocab, rngs=rngs)

  def __call__(self, tokens):
    x = self.embed(tokens) + self.position[: tokens.shape[1]]
    mask = nnx.make_causal_mask(tokens)
    for block in self.blocks:
      x = block(x, mask)
    return self.head(self.norm(x))
