"""The two modes of :func:`cgfac_optax.cgfac` and their defaults, applied by one function.

``cgfac(learning_rate)`` takes fixed-rate steps; ``cgfac()`` takes its step sizes
from the quadratic model. Each mode has its own defaults (:data:`FIXED_RATE_DEFAULTS`,
:data:`ADAPTIVE_DEFAULTS`); :func:`resolve` fills in the options a caller left
unset, for :func:`cgfac_optax.cgfac` and for :func:`cgfac_optax.plan` alike, so the
plan shows what the optimizer runs.
"""

from __future__ import annotations

from typing import Any

import jax
import numpy as np

from cgfac_optax._damping import AdaptiveDamping
from cgfac_optax._options import batch_only


class _Unset:
  """The default of an option for which every value, ``None`` included, means something."""

  def __repr__(self) -> str:
    return "UNSET"


UNSET: Any = _Unset()


class Default(float):
  """A float default that :func:`cgfac_optax.cgfac` tells apart from the same number passed.

  It is compared by identity; being a float, ``optax.inject_hyperparams`` still makes it
  a hyperparameter, cast as it casts a float (it reads the ``dtype``).
  """

  def __repr__(self) -> str:
    return repr(float(self))

  @property
  def dtype(self) -> np.dtype:
    return np.dtype(float)


# The fixed-rate mode's momentum and KL bound (kfac-pytorch's default bound).
MOMENTUM = Default(0.9)
KL_CLIP = Default(1e-3)


def passed(value, default) -> bool:
  """Whether the caller set an option whose default is ``default``.

  An array is not counted: ``optax.inject_hyperparams`` turns every number into one,
  defaults included, so it cannot be told apart.
  """
  return value is not default and not isinstance(value, (jax.Array, np.ndarray))


def default_solver(curvature_decay, refresh_every) -> str:
  """``"auto"`` for batch-only curvature, else ``"auto_memory"`` (see :mod:`._plan`)."""
  return "auto" if batch_only(curvature_decay, refresh_every) else "auto_memory"


# Each mode's defaults; "solver" is what default_solver gives for the mode's own curvature
# options (with others, resolve applies the rule to them).
FIXED_RATE_DEFAULTS = {
  "damping": 1e-3,
  "max_iters": 10,
  "curvature_decay": 0.0,
  "refresh_every": 1,
  "curvature_batch_size": None,
  "curvature_every": 1,
  "weight_sharing": "expand",
}
ADAPTIVE_DEFAULTS = {
  "damping": AdaptiveDamping(initial=1e-2, minimum=1e-5),
  "max_iters": 1,
  "curvature_decay": 0.95,
  "refresh_every": 20,
  "curvature_batch_size": None,
  "curvature_every": 10,
  "weight_sharing": "auto",
}
for _defaults in (FIXED_RATE_DEFAULTS, ADAPTIVE_DEFAULTS):
  _defaults["solver"] = default_solver(_defaults["curvature_decay"], _defaults["refresh_every"])


def resolve(learning_rate, **options) -> dict[str, Any]:
  """``options`` with each one left unset (``None``) replaced by the mode's default.

  Takes ``damping``, ``solver``, ``max_iters``, ``curvature_batch_size`` (unset:
  ``"default"``), ``curvature_decay``, ``refresh_every``, ``curvature_every`` and
  ``weight_sharing``; the mode is
  ``learning_rate is None`` (adaptive) or not (fixed rate). The solver's default
  follows the curvature (:func:`default_solver`), and so does ``curvature_every``'s:
  1 when no layer keeps memory.
  """
  defaults = ADAPTIVE_DEFAULTS if learning_rate is None else FIXED_RATE_DEFAULTS
  out = {k: defaults[k] if options.get(k) is None else options[k] for k in defaults}
  del out["solver"]  # chosen below, for the curvature options resolved
  size = options.get("curvature_batch_size", "default")
  if isinstance(size, str):
    if size != "default":
      raise ValueError(f"curvature_batch_size must be None, an int >= 1 or 'default', got {size!r}")
    size = defaults["curvature_batch_size"]
  out["curvature_batch_size"] = size
  solver = options.get("solver")
  out["solver"] = (
    default_solver(out["curvature_decay"], out["refresh_every"]) if solver is None else solver
  )
  if options.get("curvature_every") is None and batch_only(
    out["curvature_decay"], out["refresh_every"]
  ):
    out["curvature_every"] = 1  # without memory, the stats are read on every step
  return out
