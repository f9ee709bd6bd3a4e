"""The CG-FAC settings ``step_cost.py`` measures (the sigmoid cross-entropy autoencoder).

CG-FAC is ``cgfac_optax.cgfac`` with its default KL clipping (``kl_clip=1e-3``) and
momentum (0.9). On the autoencoder its damping was picked from {0.1, 0.3, 1, 3}
(60-step runs, batch 512, MNIST): below 0.3 a 64-row curvature leaves too many
directions to the damping alone and training diverges; above it progress slows.
With the clip binding, the learning rate matters little. ``time_to_target.py``
keeps its own per-task settings (its ``BEST`` registry and tuning grids).
"""

CGFAC_DEFAULTS = {
  "autoencoder": {
    "learning_rate": 0.1,
    "damping": 0.3,
    "max_iters": 10,
    "curvature_batch_size": 64,
    "solver": "cg",
  },
}

CGFAC_LEARNING_RATE = CGFAC_DEFAULTS["autoencoder"]["learning_rate"]
CGFAC_DAMPING = CGFAC_DEFAULTS["autoencoder"]["damping"]
CURVATURE_BATCH_SIZE = CGFAC_DEFAULTS["autoencoder"]["curvature_batch_size"]
