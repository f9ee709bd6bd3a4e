"""CG-FAC: K-FAC natural gradients solved by conjugate gradient, as optax transformations."""

from cgfac_optax._alias import cgfac
from cgfac_optax._blocks import DenseStats
from cgfac_optax._cg import CGResult, batched_cg
from cgfac_optax._control import StepControlState
from cgfac_optax._damping import AdaptiveDamping
from cgfac_optax._transform import ScaleByCGFACState, scale_by_cgfac

__version__ = "0.1.0"

__all__ = [
  "AdaptiveDamping",
  "CGResult",
  "DenseStats",
  "ScaleByCGFACState",
  "StepControlState",
  "batched_cg",
  "cgfac",
  "scale_by_cgfac",
]
