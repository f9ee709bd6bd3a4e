"""The optimizer settings the benchmarks use unless told otherwise.

CG-FAC's learning rate and damping were picked with ``time_to_target.py``'s
sweep; the time-to-target runs sweep the learning rate around these values again.
"""

CGFAC_DEFAULTS = {
  "autoencoder": {
    "learning_rate": 0.1,
    "damping": 1e-2,
    "max_iters": 10,
    "curvature_batch_size": 64,
    "sgd_learning_rate": 0.01,
  },
  "cnn": {
    "learning_rate": 0.1,
    "damping": 1e-2,
    "max_iters": 10,
    "curvature_batch_size": 64,
    "sgd_learning_rate": 0.03,
  },
}

CGFAC_LEARNING_RATE = CGFAC_DEFAULTS["autoencoder"]["learning_rate"]
CGFAC_DAMPING = CGFAC_DEFAULTS["autoencoder"]["damping"]
CURVATURE_BATCH_SIZE = CGFAC_DEFAULTS["autoencoder"]["curvature_batch_size"]
