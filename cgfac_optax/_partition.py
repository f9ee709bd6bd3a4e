"""``select_stats``: the layer stats of the parameters that ``optax.partition`` routes to CG-FAC.

``optax.partition`` hands every transformation the same extra arguments, so the
CG-FAC branch receives the stats of every captured layer, also of layers whose
parameters another optimizer updates; those parameters are masked out of its
gradients, and :func:`scale_by_cgfac` refuses stats without a kernel. Selecting
the stats by the same labels keeps the two consistent.
"""

from __future__ import annotations

from typing import Any

import jax

from cgfac_optax._layers import DenseStats, child, flatten_stats, leaf_paths, path_str


def select_stats(layer_stats: Any, param_labels: Any, label: Any = "cgfac") -> Any:
  """The stats of the layers whose ``kernel`` is labelled ``label``; the others become ``None``.

  Args:
    layer_stats: stats keyed by layer path (``stats["Dense_0"]``, NNX:
      ``stats["layers"][0]``), or a function returning them, as the helpers
      return ``extra["layer_stats"]``.
    param_labels: a pytree shaped like the parameters with a label at each leaf,
      the ``param_labels`` given to ``optax.partition`` (call it first if it is a
      function of the parameters), or a boolean mask as ``optax.masked`` takes
      (then ``label=True``). Plain dicts, Flax ``FrozenDict`` and ``nnx.State``
      all work: layers are matched by path.
    label: the label of the CG-FAC branch.

  Returns:
    ``layer_stats`` with the same structure, ``None`` in place of the stats of
    every layer routed elsewhere (``None`` entries are ignored by
    :func:`scale_by_cgfac`); for a function, a function that selects from what
    it returns, so the stats are still computed only when ``update`` reads them.

  Raises:
    ValueError: when ``param_labels`` has no ``kernel`` for a layer with stats.

  Examples:
    >>> import jax.numpy as jnp
    >>> import cgfac_optax as cgfac
    >>> s = cgfac.DenseStats(jnp.ones((4, 3)), jnp.ones((4, 2)))
    >>> labels = {"a": {"kernel": "cgfac"}, "b": {"kernel": "adam"}}
    >>> cgfac.select_stats({"a": s, "b": s}, labels)["b"] is None
    True
  """
  if callable(param_labels):
    raise TypeError(
      "param_labels must be a pytree of labels shaped like the parameters; for a function of "
      "the parameters, pass param_labels(params)"
    )
  if callable(layer_stats):
    return lambda: select_stats(layer_stats(), param_labels, label)
  paths, labels, _ = leaf_paths(param_labels)
  by_path = dict(zip(paths, labels))
  for path in flatten_stats(layer_stats):
    if child(path, "kernel") not in by_path:
      known = sorted({p.rpartition("/")[0] for p in paths if p.endswith("/kernel")})
      raise ValueError(
        f"layer_stats has stats at {path!r} but param_labels has no {child(path, 'kernel')!r}; "
        f"its layers are {known}"
      )

  def keep(path, stats):
    if not isinstance(stats, DenseStats):
      return stats
    return stats if by_path[child(path_str(path), "kernel")] == label else None

  return jax.tree_util.tree_map_with_path(
    keep, layer_stats, is_leaf=lambda x: isinstance(x, DenseStats)
  )
