"""The optimizer settings the benchmarks use unless told otherwise.

CG-FAC is ``cgfac_optax.cgfac`` with its default KL clipping (``kl_clip=1e-3``) and
momentum (0.9). On the autoencoder its damping was picked from {0.1, 0.3, 1, 3}
(60-step runs, batch 512, MNIST): below 0.3 a 64-row curvature leaves too many
directions to the damping alone and training diverges; above it progress slows.
With the clip binding, the learning rate matters little. The time-to-target runs
sweep the learning rate around these values again.
"""

CGFAC_DEFAULTS = {
  "autoencoder": {
    "learning_rate": 0.1,
    "damping": 0.3,
    "max_iters": 10,
    "curvature_batch_size": 64,
    "solver": "cg",
    "sgd_learning_rate": 0.01,
  },
  # A convolution has one curvature row per example and output position (64 x 169 rows for
  # the first layer) but tiny factors (A is 10 x 10): materialized factors win, and the
  # low-rank solve (an eigendecomposition of the rows x rows Gram) does not apply.
  "cnn": {
    "learning_rate": 0.1,
    "damping": 1e-2,
    "max_iters": 10,
    "curvature_batch_size": 64,
    "solver": "cg_materialized",
    "lowrank": False,
    "sgd_learning_rate": 0.03,
  },
}

CGFAC_LEARNING_RATE = CGFAC_DEFAULTS["autoencoder"]["learning_rate"]
CGFAC_DAMPING = CGFAC_DEFAULTS["autoencoder"]["damping"]
CURVATURE_BATCH_SIZE = CGFAC_DEFAULTS["autoencoder"]["curvature_batch_size"]
