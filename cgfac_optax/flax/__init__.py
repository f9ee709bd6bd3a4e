"""Flax integration: everything ``update`` reads, from unchanged Linen and NNX models."""

from cgfac_optax.flax._rules import RULES, CaptureRule, find_rule, register_rule
from cgfac_optax.flax.linen import TrainState, value_grad_and_extra
from cgfac_optax.flax.nnx import nnx_value_grad_and_extra

__all__ = [
  "RULES",
  "CaptureRule",
  "TrainState",
  "find_rule",
  "nnx_value_grad_and_extra",
  "register_rule",
  "value_grad_and_extra",
]
