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

# solver="auto_memory" takes, per layer, the first of these whose curvature memory fits the
# memory limit: K-FAC's preconditioned CG on averaged factors, else their sketches.
AUTO_MEMORY: tuple[str, ...] = (PCG.name, SKETCH.name)

__all__ = ["AUTO_MEMORY", "SOLVERS", "Solver"]
