"""Trains with CG-FAC, saving or restoring the optimizer state with orbax; for test_checkpoint.py.

Started by the tests in fresh processes, so that nothing but the checkpoint carries over (the
tests also import its model and training loop):

  python tests/checkpoint_worker.py first DIR   # STEPS steps straight through, and SAVE_AT steps
                                                # then a checkpoint, for every configuration
  python tests/checkpoint_worker.py resume DIR  # restore each checkpoint, train to STEPS

Each writes the parameters and optimizer state, leaf by leaf, to ``{config}_straight.npz`` and
``{config}_saved.npz`` (at the checkpoint), or ``{config}_resumed.npz``.
"""

from __future__ import annotations

import sys
from pathlib import Path

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp

import cgfac_optax as cgfac
from cgfac_optax import flax as cflax

STEPS, SAVE_AT, BATCH = 12, 7, 64
LOSS = "softmax_cross_entropy"

# Step sizes from the quadratic model, adaptive damping (adapted at steps 0, 5, 10) and curvature
# memory (refreshed at steps 0, 1, 2, 4, 8): the save at step 7 falls between two of each.
CONFIGS = {"default": lambda: cgfac.cgfac(curvature_batch_size=32)}


class MLP(nn.Module):
  @nn.compact
  def __call__(self, x):
    return nn.Dense(4)(nn.tanh(nn.Dense(16)(x)))


def batches():
  rng = np.random.default_rng(0)
  teacher = rng.normal(size=(8, 4))
  for _ in range(STEPS):
    x = rng.normal(size=(BATCH, 8)).astype(np.float32)
    yield x, np.argmax(x @ teacher, axis=-1).astype(np.int32)


def make_step(model, tx):
  # The curvature (stats and quadratic model) of the first 32 examples, as the optimizer's
  # curvature_batch_size says.
  fn = cflax.value_grad_and_extra(model, loss=LOSS, curvature_batch_size=32)

  @jax.jit
  def step(params, opt_state, x, y, i):
    _, grads, extra = fn(params, x, y, jax.random.fold_in(jax.random.key(1), i))
    updates, opt_state = tx.update(grads, opt_state, params, **extra)
    return optax.apply_updates(params, updates), opt_state

  return step


def train(step, params, opt_state, start, stop):
  for i, (x, y) in enumerate(batches()):
    if start <= i < stop:
      params, opt_state = step(params, opt_state, x, y, i)
  return params, opt_state


def save_npz(path: Path, tree) -> None:
  np.savez(path, *[np.asarray(leaf) for leaf in jax.tree.leaves(tree)])


def main(mode: str, out: Path) -> None:
  model = MLP()
  x0 = jnp.zeros((1, 8))
  for name, make_tx in CONFIGS.items():
    tx = make_tx()
    step = make_step(model, tx)
    params = model.init(jax.random.key(0), x0)["params"]
    checkpoints = ocp.StandardCheckpointer()
    path = (out / f"{name}_checkpoint").resolve()
    if mode == "first":
      save_npz(out / f"{name}_straight.npz", train(step, params, tx.init(params), 0, STEPS))
      state = train(step, params, tx.init(params), 0, SAVE_AT)
      checkpoints.save(path, {"params": state[0], "opt_state": state[1]})
      save_npz(out / f"{name}_saved.npz", state)
    else:
      # The structure comes from a fresh init; the values from the checkpoint.
      abstract = jax.eval_shape(lambda p, init=tx.init: {"params": p, "opt_state": init(p)}, params)
      restored = checkpoints.restore(path, abstract)
      state = train(step, restored["params"], restored["opt_state"], SAVE_AT, STEPS)
      save_npz(out / f"{name}_resumed.npz", state)
    checkpoints.wait_until_finished()
    checkpoints.close()


if __name__ == "__main__":
  main(sys.argv[1], Path(sys.argv[2]))
