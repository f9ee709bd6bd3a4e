"""The solvers, one per module, and the table that names them (see :mod:`._base`)."""

from cgfac_optax._solvers._base import Solver
from cgfac_optax._solvers.cg import CG
from cgfac_optax._solvers.cg_materialized import CG_MATERIALIZED
from cgfac_optax._solvers.eigh import EIGH
from cgfac_optax._solvers.kfac_inverse import KFAC_INVERSE
from cgfac_optax._solvers.lowrank import LOWRANK
from cgfac_optax._solvers.pcg import PCG
from cgfac_optax._solvers.sketch import SKETCH

SOLVERS: dict[str, Solver] = {
  s.name: s for s in (CG, CG_MATERIALIZED, EIGH, LOWRANK, PCG, KFAC_INVERSE, SKETCH)
}

__all__ = ["SOLVERS", "Solver"]
