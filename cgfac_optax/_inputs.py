"""What ``update`` reads beyond the gradients, and one message naming everything missing.

Each part of the transformation says which extra arguments it needs (the
preconditioner: ``layer_stats``; the quadratic model's step: ``params`` and
``curvature_model``; adaptive damping: ``params``, ``value`` and ``value_fn``).
Every one that is missing is named in one ``ValueError``, with the helpers that
return them all.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

# The arguments, in the order messages name them.
ORDER = ("params", "layer_stats", "curvature_model", "value", "value_fn")

HELPERS = (
  "they all come from the helpers: "
  "`loss, grads, extra = cgfac_optax.flax.value_grad_and_extra(model, loss=...)"
  "(params, x, y, key)` (Linen), "
  "`loss, grads, extra = cgfac_optax.flax.nnx_value_grad_and_extra(model, x, y, key, "
  "loss=...)` (NNX) or "
  "`loss, grads, extra = cgfac_optax.value_grad_and_extra(apply_fn, loss=...)"
  "(params, x, y, key)` (pure JAX), then `tx.update(grads, state, params, **extra)`"
)
BY_HAND = (
  "; layer_stats can also be built by hand as "
  "{layer path: cgfac_optax.DenseStats(inputs, output_grads)}"
)


def merge(*parts: Mapping[str, str]) -> dict[str, list[str]]:
  """``{argument: [who needs it]}`` from each part's ``{argument: who}``."""
  out: dict[str, list[str]] = {}
  for part in parts:
    for name, who in part.items():
      out.setdefault(name, []).append(who)
  return out


def _join(words: list[str]) -> str:
  return words[0] if len(words) == 1 else f"{', '.join(words[:-1])} and {words[-1]}"


def check(needs: Mapping[str, list[str]], given: Mapping[str, Any]) -> None:
  """Raises unless every argument in ``needs`` (``{name: [who needs it]}``) is in ``given``.

  Raises:
    ValueError: naming every missing argument and what needs it, with the call to make.
    TypeError: for a ``value_fn`` that is not callable.
  """
  missing = [n for n in ORDER if n in needs and given.get(n) is None]
  if missing:
    who = list(dict.fromkeys(w for n in missing for w in needs[n]))
    verb = "needs" if len(who) == 1 else "need"
    hint = BY_HAND if "layer_stats" in missing else ""
    raise ValueError(f"{_join(who)} {verb} {', '.join(missing)} at update: {HELPERS}{hint}")
  value_fn = given.get("value_fn")
  if "value_fn" in needs and not callable(value_fn):
    raise TypeError(f"value_fn must be a callable params -> loss, got {type(value_fn).__name__}")
