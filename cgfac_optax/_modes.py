"""The two modes of :func:`cgfac_optax.cgfac` and their defaults, applied by one function.

``cgfac(learning_rate)`` takes fixed-rate steps; ``cgfac()`` takes its step sizes
from the quadratic model. Each mode has its own defaults (:data:`FIXED_RATE_DEFAULTS`,
:data:`ADAPTIVE_DEFAULTS`); :func:`resolve` fills in the options a caller left
unset, for :func:`cgfac_optax.cgfac` and for :func:`cgfac_optax.plan` alike, so the
plan shows what the optimizer runs.
"""

from __future__ import annotations

from typing import Any

from cgfac_optax._damping import AdaptiveDamping
from cgfac_optax._options import batch_only

# The fixed-rate mode's momentum and KL bound (kfac-pytorch's default bound).
MOMENTUM = 0.9
KL_CLIP = 1e-3


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
}
ADAPTIVE_DEFAULTS = {
  "damping": AdaptiveDamping(initial=1e-2, minimum=1e-5),
  "max_iters": 1,
  "curvature_decay": 0.95,
  "refresh_every": 20,
  "curvature_batch_size": 512,
}
for _defaults in (FIXED_RATE_DEFAULTS, ADAPTIVE_DEFAULTS):
  _defaults["solver"] = default_solver(_defaults["curvature_decay"], _defaults["refresh_every"])


def resolve(learning_rate, **options) -> dict[str, Any]:
  """``options`` with each one left unset (``None``) replaced by the mode's default.

  Takes ``damping``, ``solver``, ``max_iters``, ``curvature_batch_size`` (unset:
  ``"default"``), ``curvature_decay`` and ``refresh_every``; the mode is
  ``learning_rate is None`` (adaptive) or not (fixed rate). The solver's default
  follows the curvature: :func:`default_solver`.
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
  return out
