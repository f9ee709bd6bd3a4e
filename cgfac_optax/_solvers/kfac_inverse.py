r"""``"kfac_inverse"``: K-FAC's own solve, the factored-damping inverses applied directly.

.. math::

  x = (A + \pi \sqrt{\gamma} I)^{-1}\, V\, (G + \tfrac{\sqrt{\gamma}}{\pi} I)^{-1},
  \qquad \pi = \sqrt{\frac{\operatorname{tr}(A) / d_A}{\operatorname{tr}(G) / d_G}}
  \quad \text{(Martens \& Grosse 2015, sec. 6.3)},

the preconditioner of ``"pcg"`` (:mod:`cgfac_optax._solvers.pcg`) used as the
answer: two matmuls a step, the inverses formed on the refresh schedule. It is
not the solution of ``(A (x) G + gamma I) x = V``: factored damping adds
``pi sqrt(gamma) I (x) G + sqrt(gamma)/pi A (x) I`` to the Kronecker product
where exact damping adds ``gamma I``, and between refreshes the inverses are of
older factors. ``"pcg"`` with ``m`` iterations corrects both toward the exact
solution; ``m = 1`` from a zero start gives this direction scaled by CG's step.
Flops per step: forming the factors, ``2 d_A d_G (d_A + d_G)``, and the inverses
counted whole (``2 (d_A^3 + d_G^3)``); memory ``2 (d_A^2 + d_G^2)``.
"""

from __future__ import annotations

from typing import NamedTuple

import jax

from cgfac_optax._layers import LayerShape
from cgfac_optax._solvers import cg_materialized, pcg
from cgfac_optax._solvers._base import (
  ACCURATE,
  Arithmetic,
  FactorCurvature,
  Solver,
  form_factors_flops,
)
from cgfac_optax._solvers.pcg import Inverses


class InversesData(NamedTuple):
  inverses: Inverses
  arithmetic: Arithmetic


def prepare(curvature: FactorCurvature, damping, arithmetic: Arithmetic = ACCURATE) -> InversesData:
  del damping  # in the inverses since their refresh
  return InversesData(curvature.refreshed, arithmetic)


def solve(data: InversesData, v: jax.Array) -> jax.Array:
  return pcg.apply_inverses(data.inverses, v, data.arithmetic)


def flops(shape: LayerShape, cg_iters: int, data_shards: int) -> float:
  n = float(shape.d_a) * shape.d_g
  # An LU inverse, 2 k^3, and the shift, trace and symmetrization, a few k^2.
  invert = 2.0 * (shape.d_a**3 + shape.d_g**3) + 4.0 * (shape.d_a**2 + shape.d_g**2)
  return form_factors_flops(shape, data_shards) + invert + 2 * n * (shape.d_a + shape.d_g)


KFAC_INVERSE = Solver(
  name="kfac_inverse",
  curvature="factors",
  refresh=pcg.factored_inverses,
  prepare=prepare,
  operator=None,
  preconditioner=None,
  diagonal=None,
  solve=solve,
  flops=flops,
  memory=pcg.memory,
  communication=cg_materialized.communication,
  matrix_free=False,
  exact=False,
)
