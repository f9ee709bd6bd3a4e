"""Pytree paths: naming layers the same way in params, gradients and stats."""

from __future__ import annotations

from typing import Any

import jax

from cgfac_optax._blocks import DenseStats


def key_name(key: Any) -> str:
  """The plain name of one path entry (dict key, attribute or index)."""
  for attr in ("key", "name", "idx"):
    if hasattr(key, attr):
      return str(getattr(key, attr))
  return str(key)


def path_str(path) -> str:
  """``'Dense_0/kernel'`` for a key path; NNX's trailing ``.value`` is dropped."""
  names = [key_name(k) for k in path]
  if names and names[-1] == "value" and type(path[-1]).__name__ == "GetAttrKey":
    names = names[:-1]
  return "/".join(names)


def is_stats(x: Any) -> bool:
  return isinstance(x, DenseStats)


def flatten_stats(layer_stats: Any) -> dict[str, DenseStats]:
  """``{layer path: stats}`` for every :class:`DenseStats` in ``layer_stats``."""
  flat, _ = jax.tree_util.tree_flatten_with_path(layer_stats, is_leaf=is_stats)
  out = {}
  for path, leaf in flat:
    if leaf is None:
      continue
    if not is_stats(leaf):
      raise TypeError(
        "layer_stats must hold cgfac_optax.DenseStats at each layer's path, "
        f"got {type(leaf).__name__} at {path_str(path)!r}"
      )
    out[path_str(path)] = leaf
  return out


def layer_paths(params: Any) -> list[str]:
  """Paths of the parameter dicts that hold a ``kernel``: the layers."""
  flat, _ = jax.tree_util.tree_flatten_with_path(params)
  paths = []
  for path, _ in flat:
    name = path_str(path)
    parent, _, leaf = name.rpartition("/")
    if leaf == "kernel":
      paths.append(parent)
  return paths
