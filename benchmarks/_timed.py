"""The batch order and the timed training loop every optimizer in the benchmarks runs through.

Imports only numpy and JAX (never cgfac_optax): the kfac-jax worker, which runs
under an older JAX in its own venv, uses this same module, so every optimizer
sees the same batches in the same order and is timed by the same loop.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterator
from typing import Any

import jax.numpy as jnp
import numpy as np


class Batches:
  """Endless minibatches ``(x, y)``, reshuffled every epoch from ``seed``, kept on the device."""

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


def eval_schedule(budget_s: float, evals: int) -> list[float]:
  """Clock times to evaluate at: ``evals`` evenly spaced, plus halvings toward the start.

  The halvings give the early, fast-moving part of the curve (and early
  time-to-target crossings) a resolution that an even grid would not.
  """
  even = [budget_s * (k + 1) / evals for k in range(evals)]
  early = [budget_s / evals / 2**j for j in range(1, 7)]
  return sorted(set(early + even))


def train_for(
  step: Callable[[Any, Any, int], tuple[Any, Any]],
  carry: Any,
  batches: Iterator,
  evaluate: Callable[[Any], dict[str, float]],
  budget_s: float,
  evals: int,
  max_steps: int,
) -> dict:
  """Runs ``step(carry, batch, i) -> (carry, loss)`` for ``budget_s`` seconds of step time.

  Only the steps are on the clock (each ends by reading its loss back, so the
  device has finished); drawing batches and ``evaluate(carry)`` (a dict with at
  least ``"loss"``, at the times of :func:`eval_schedule`) are not. Stops early
  at ``max_steps``, or as diverged at a non-finite training or evaluated loss. A
  run whose last evaluated loss is above the one at step 0 also counts as
  diverged (a run stuck at a huge finite loss is not training), while a rise
  above the start on the way (the first steps of Adam on an autoencoder) is not.

  Returns:
    ``{"curve": {"time": [...], "steps": [...], <evaluate's keys>: [...]}, "steps",
    "wall_s", "step_s_mean", "diverged"}``; the curve starts at step 0 and ends at
    the last step unless the run diverged.
  """
  curve: dict[str, list] = {"time": [], "steps": []}

  def record(clock, steps):
    values = evaluate(carry)
    curve["time"].append(clock)
    curve["steps"].append(steps)
    for k, v in values.items():
      curve.setdefault(k, []).append(float(v))
    return math.isfinite(float(values["loss"]))

  pending = eval_schedule(budget_s, evals)
  record(0.0, 0)
  clock, steps, diverged = 0.0, 0, False
  while clock < budget_s and steps < max_steps:
    batch = next(batches)
    start = time.perf_counter()
    carry, loss = step(carry, batch, steps)
    loss = float(loss)
    clock += time.perf_counter() - start
    steps += 1
    if not math.isfinite(loss):
      diverged = True
      break
    if pending and clock >= pending[0]:
      while pending and clock >= pending[0]:
        pending.pop(0)
      if not record(clock, steps):
        diverged = True
        break
  if not diverged and curve["steps"][-1] != steps:
    diverged = not record(clock, steps)
  if not diverged and curve["loss"][-1] > curve["loss"][0]:
    diverged = True
  return {
    "curve": curve,
    "steps": steps,
    "wall_s": clock,
    "step_s_mean": clock / max(steps, 1),
    "diverged": diverged,
  }
