"""CG-FAC: K-FAC natural gradients solved by conjugate gradient, as optax transformations."""

from cgfac_optax._alias import cgfac
from cgfac_optax._cg import CGResult, batched_cg
from cgfac_optax._control import StepControlState
from cgfac_optax._conv import conv_output_rows, conv_patches, conv_stats
from cgfac_optax._damping import AdaptiveDamping
from cgfac_optax._jax_capture import value_grad_and_extra
from cgfac_optax._layers import DenseStats
from cgfac_optax._logging import state_scalars
from cgfac_optax._partition import select_stats
from cgfac_optax._plan import LayerPlan, Plan, plan
from cgfac_optax._quadratic import CurvatureModel
from cgfac_optax._transform import ScaleByCGFACState, scale_by_cgfac

__version__ = "0.1.0"


def __getattr__(name: str):
  # ``cgfac_optax.flax`` is imported on first use, so ``import cgfac_optax``
  # stays light and ``cgfac.flax.value_grad_and_extra`` still works.
  if name == "flax":
    import importlib

    return importlib.import_module("cgfac_optax.flax")
  raise AttributeError(f"module 'cgfac_optax' has no attribute {name!r}")


__all__ = [
  "AdaptiveDamping",
  "CGResult",
  "CurvatureModel",
  "DenseStats",
  "LayerPlan",
  "Plan",
  "ScaleByCGFACState",
  "StepControlState",
  "batched_cg",
  "cgfac",
  "conv_output_rows",
  "conv_patches",
  "conv_stats",
  "plan",
  "scale_by_cgfac",
  "select_stats",
  "state_scalars",
  "value_grad_and_extra",
]
