"""The options of :func:`scale_by_cgfac`: their types, and one check of them at construction.

Python values are checked here, once, when the transformation is built, with the
offending value in the message. Arrays (what ``optax.inject_hyperparams`` turns
options into) and schedules are traced values that cannot be checked here.
"""

from __future__ import annotations

import numbers
from collections.abc import Callable, Mapping
from typing import Any, Literal, get_args

import jax
import jax.numpy as jnp
import numpy as np

from cgfac_optax._cg import SKIPS, Skip
from cgfac_optax._solvers import AUTO_MEMORY, SOLVERS
from cgfac_optax._solvers._base import SOLVER_OPTIONS, MatmulPrecision

Preconditioner = Literal["jacobi"]
PRECONDITIONERS = (None, *get_args(Preconditioner))

Fallback = Literal["diagonal", "identity", "error"]
FALLBACKS = get_args(Fallback)

PRECISIONS = (None, *get_args(MatmulPrecision))

CurvatureDtype = Literal["bfloat16"]
CURVATURE_DTYPES = (None, *get_args(CurvatureDtype))

WeightSharing = Literal["reduce", "expand", "auto"]
WEIGHT_SHARINGS = get_args(WeightSharing)

CGSkip = Skip

# A solver name (a key of SOLVERS), a rule that picks one per layer, or {layer path: either}.
SolverRule = Literal["auto", "auto_memory"]
RULES: tuple[str, ...] = get_args(SolverRule)
SolverOption = str | Mapping[str, str]


def is_number(value: Any) -> bool:
  """A Python (or NumPy scalar) real number, not a bool: a value that can be checked now."""
  return isinstance(value, numbers.Real) and not isinstance(value, (bool, np.bool_))


def is_int(value: Any) -> bool:
  return isinstance(value, numbers.Integral) and not isinstance(value, (bool, np.bool_))


def check_number(
  name: str, value: Any, ok: Callable[[Any], bool], requirement: str, *, traced_ok: bool = True
) -> None:
  """Raises ``ValueError`` when ``value`` is a number for which ``ok`` fails.

  Anything that is not a number (an array, a schedule) passes when ``traced_ok``, and
  fails otherwise.
  """
  if (not is_number(value) and not traced_ok) or (is_number(value) and not ok(value)):
    raise ValueError(f"{name} must be {requirement}, got {value!r}")


def check_int(name: str, value: Any, minimum: int, *, optional: bool = False) -> None:
  """Raises unless ``value`` is an int ``>= minimum`` (or None when ``optional``)."""
  if optional and value is None:
    return
  if not is_int(value) or value < minimum:
    none = "None or " if optional else ""
    raise ValueError(f"{name} must be {none}an int >= {minimum}, got {value!r}")


def check_int_or_array(name: str, value: Any, minimum: int) -> None:
  """An int ``>= minimum``, or a scalar integer array (checked later, where it is used).

  optax.inject_hyperparams turns every int option into an array; the options that take one
  are used as traced values.
  """
  if isinstance(value, (jax.Array, np.ndarray)):
    if value.ndim == 0 and jnp.issubdtype(value.dtype, jnp.integer):
      return
    raise ValueError(f"{name} must be an int >= {minimum}, got {value!r}")
  check_int(name, value, minimum)


def check_static_int(name: str, value: Any, why: str) -> None:
  """An int ``>= 1`` that must stay a Python value (it decides shapes or choices at trace time)."""
  if isinstance(value, (jax.Array, np.ndarray)):
    raise ValueError(
      f"{name} {why} and must be a Python int, got {value!r}; "
      f"under optax.inject_hyperparams pass static_args=({name!r},)"
    )
  check_int(name, value, 1)


def check_solver(solver: Any) -> None:
  """A ``solver`` option: a name in the solver table, a rule, or ``{layer path: either}``."""
  allowed = (*SOLVERS, *RULES)
  if isinstance(solver, Mapping):
    bad = {p: s for p, s in solver.items() if s not in allowed}
    if bad:
      raise ValueError(
        f"solver values must be 'auto', 'auto_memory' or one of {list(SOLVERS)}, got {bad!r}"
      )
  elif not isinstance(solver, str) or solver not in allowed:
    raise ValueError(
      f"solver must be 'auto', one of {list(SOLVERS)}, or a dict of them by layer path (the "
      f"rule 'auto_memory' is accepted too), got {solver!r}"
    )


def batch_only(curvature_decay, refresh_every) -> bool:
  """Whether the options say, as Python values, that no layer keeps curvature memory."""
  refresh_each_step = is_int(refresh_every) and refresh_every == 1
  return refresh_each_step and is_number(curvature_decay) and curvature_decay == 0


def memory_requested(curvature_decay, refresh_every) -> bool:
  """Whether the options ask, as Python values, for curvature memory."""
  decays = is_number(curvature_decay) and curvature_decay > 0
  return decays or (is_int(refresh_every) and refresh_every > 1)


def solvers_of(solver: Any) -> set[str]:
  """The solvers a ``solver`` option may run on some layer (decided at construction)."""
  if isinstance(solver, Mapping):
    # Layers the dict leaves out use "auto".
    return set().union(*map(solvers_of, solver.values()), solvers_of("auto"))
  if solver == "auto":
    return {k for k, s in SOLVERS.items() if s.exact}
  if solver == "auto_memory":
    return set(AUTO_MEMORY)
  return {solver}


# What the solvers that read each solver-specific option do with it.
_READERS_DO = {
  "curvature_decay": "keep curvature memory",
  "refresh_every": "refresh something computed from the factors on a schedule",
  "sketch_rank": "keep sketches of the factors",
  "preconditioner": "run CG without a preconditioner of their own",
}


def check_read(solver: Any, passed: Mapping[str, Any], *, default: bool = False) -> None:
  """Raises naming each solver-specific option in ``passed`` that no solver it may run reads.

  ``passed`` holds only the options the user set (a ``None`` means unset; so does a
  ``curvature_decay`` of 0, which every solver honours as "no memory"); ``default``:
  ``solver`` is the mode's default, not the user's.
  """
  may_run = [SOLVERS[k] for k in sorted(solvers_of(solver))]
  problems = []
  for option in SOLVER_OPTIONS:
    value = passed.get(option)
    if value is None or (option == "curvature_decay" and is_number(value) and value == 0):
      continue
    if not any(s.reads(option) for s in may_run):
      readers = [k for k, s in SOLVERS.items() if s.reads(option)]
      problems.append(
        f"{option}={value!r} does nothing with {'the default ' if default else ''}"
        f"solver={solver!r}: only {readers} read it "
        f"(they {_READERS_DO[option]}); leave {option} unset, or pass one of those solvers"
      )
  if problems:
    raise ValueError("; ".join(problems))


def _check_step_control(damping, learning_rate, kl_clip, adaptive_step) -> None:
  from cgfac_optax._damping import AdaptiveDamping  # it checks its own fields with this module

  adaptive = isinstance(damping, AdaptiveDamping)
  if kl_clip is not None:
    check_number("kl_clip", kl_clip, lambda k: k > 0, "None or > 0")
  if learning_rate is not None and adaptive and not adaptive_step:
    # The Levenberg-Marquardt rule compares the loss at the step with its prediction.
    check_number("learning_rate", learning_rate, lambda lr: lr > 0, "> 0 with adaptive damping")
  elif learning_rate is not None:
    check_number("learning_rate", learning_rate, lambda lr: lr >= 0, ">= 0")
  if adaptive_step and (learning_rate is not None or kl_clip is not None):
    raise ValueError(
      "adaptive_step chooses the step size from the quadratic model: learning_rate and "
      f"kl_clip must be None, got learning_rate={learning_rate!r}, kl_clip={kl_clip!r}"
    )
  needs = "adaptive damping" if adaptive and not adaptive_step else None
  needs = needs or ("kl_clip" if kl_clip is not None else None)
  if needs and learning_rate is None:
    raise ValueError(
      f"{needs} needs the learning rate that the chain applies after scale_by_cgfac: "
      "pass scale_by_cgfac(..., learning_rate=lr) (cgfac_optax.cgfac does this)"
    )


def _check_curvature_every(curvature_every, curvature_decay, refresh_every) -> None:
  if curvature_every is None:
    return
  check_static_int("curvature_every", curvature_every, "decides which steps read the stats")
  if curvature_every > 1 and batch_only(curvature_decay, refresh_every):
    raise ValueError(
      f"curvature_every={curvature_every} reads the stats on every {curvature_every}-th step "
      "only, so the steps between need curvature memory: pass curvature_decay > 0 (or a "
      "refresh_every > 1), or leave curvature_every at 1"
    )


def _check_choices(**options) -> None:
  """Options that take one of a few values."""
  allowed = {
    "preconditioner": PRECONDITIONERS,
    "fallback": FALLBACKS,
    "precision": PRECISIONS,
    "curvature_dtype": CURVATURE_DTYPES,
    "cg_skip": (None, *SKIPS),
    "weight_sharing": WEIGHT_SHARINGS,
  }
  for name, value in options.items():
    if value not in allowed[name]:
      raise ValueError(f"{name} must be one of {allowed[name]}, got {value!r}")


def validate(
  *,
  damping,
  max_iters,
  tol,
  solver,
  warm_start,
  curvature_batch_size,
  preconditioner,
  learning_rate,
  kl_clip,
  fallback,
  fallback_decay,
  curvature_decay,
  refresh_every,
  sketch_rank,
  memory_limit,
  adaptive_step,
  precision,
  curvature_dtype,
  cg_skip,
  curvature_every=1,
  weight_sharing="expand",
) -> None:
  """Checks every option of :func:`scale_by_cgfac` that is a Python value."""
  if not callable(damping):
    check_number("damping", damping, lambda d: d > 0, "> 0")
  check_int_or_array("max_iters", max_iters, 1)
  check_number("tol", tol, lambda t: t >= 0, ">= 0")
  check_number(
    "tol", tol, lambda t: t < 1, "< 1 (CG stops before its first iteration when tol >= 1)"
  )
  check_solver(solver)
  check_int("curvature_batch_size", curvature_batch_size, 1, optional=True)
  _check_choices(preconditioner=preconditioner)
  _check_step_control(damping, learning_rate, kl_clip, adaptive_step)
  _check_choices(fallback=fallback)
  if isinstance(fallback_decay, bool):
    raise ValueError(f"fallback_decay must be a float in [0, 1), got {fallback_decay!r}")
  check_number("fallback_decay", fallback_decay, lambda b: 0 <= b < 1, "a float in [0, 1)")
  check_number("curvature_decay", curvature_decay, lambda b: 0 <= b < 1, "in [0, 1)")
  check_int_or_array("refresh_every", refresh_every, 1)
  if sketch_rank is not None:
    check_static_int("sketch_rank", sketch_rank, "sets the shapes of the sketches")
  if memory_limit is not None:
    check_static_int("memory_limit", memory_limit, "chooses the solvers when tracing")
  _check_curvature_every(curvature_every, curvature_decay, refresh_every)
  _check_choices(weight_sharing=weight_sharing)
  if weight_sharing == "auto" and not adaptive_step:
    raise ValueError(
      "weight_sharing='auto' chooses from the outputs of the curvature model, which only "
      "adaptive_step=True reads: pass weight_sharing='expand' or 'reduce'"
    )
  _check_choices(precision=precision, curvature_dtype=curvature_dtype, cg_skip=cg_skip)
