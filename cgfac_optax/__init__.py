"""CG-FAC: K-FAC natural gradients solved by conjugate gradient, as optax transformations."""

from cgfac_optax._alias import cgfac
from cgfac_optax._blocks import DenseStats
from cgfac_optax._cg import CGResult, batched_cg
from cgfac_optax._conv import conv_output_rows, conv_patches, conv_stats
from cgfac_optax._plan import LayerPlan, Plan, plan
from cgfac_optax._transform import ScaleByCGFACState, scale_by_cgfac

__version__ = "0.1.0"

__all__ = [
  "CGResult",
  "DenseStats",
  "LayerPlan",
  "Plan",
  "ScaleByCGFACState",
  "batched_cg",
  "cgfac",
  "conv_output_rows",
  "conv_patches",
  "conv_stats",
  "plan",
  "scale_by_cgfac",
]
