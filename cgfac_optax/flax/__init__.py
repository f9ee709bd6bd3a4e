"""Flax integration: CG-FAC layer stats from unchanged Linen and NNX models."""

from cgfac_optax.flax._rules import RULES, CaptureRule, find_rule, register_rule
from cgfac_optax.flax.linen import apply_gradients, curvature_model, value_grad_and_stats
from cgfac_optax.flax.nnx import nnx_curvature_model, nnx_value_grad_and_stats

__all__ = [
  "RULES",
  "CaptureRule",
  "apply_gradients",
  "curvature_model",
  "find_rule",
  "nnx_curvature_model",
  "nnx_value_grad_and_stats",
  "register_rule",
  "value_grad_and_stats",
]
