"""Running the update on a mesh whose axes are Explicit (``jax.make_mesh``'s default).

The curvature products contract over the batch rows, which a data-parallel mesh shards; a
mesh with Explicit axes asks for an output sharding at each such contraction. With the axes
in Auto mode the partitioner places the collectives, and the update and the new state come
back in the layout of the gradients and the old state.
"""

from __future__ import annotations

import jax
import numpy as np


def _is_array(x) -> bool:
  return isinstance(x, (jax.Array, np.ndarray, np.generic))


def _in_explicit_mode(fn, params_spec):
  """``fn`` run back in Explicit mode: of no arguments, or of one laid out like ``params``."""

  def call(*args):
    in_sharding = tuple(params_spec for _ in args)
    return jax.sharding.explicit_axes(fn, in_sharding=in_sharding)(*args)

  return call


def auto_axes_on_explicit_mesh(update_fn):
  """Runs ``update_fn`` with the context mesh's axes in Auto mode when some are Explicit.

  Without a mesh, or with Auto axes only, ``update_fn`` runs as it is. The extra
  arguments' arrays pass into the Auto region; their functions (``value_fn``, the
  curvature model's ``outputs_fn``, a ``layer_stats`` function: each closes over the
  caller's explicitly sharded batch, and takes nothing or params-like arrays) run back in
  Explicit mode; anything else (a loss name) is passed as it is.
  """

  def wrapped(updates, state, params=None, **kwargs):
    if not getattr(jax.sharding.get_abstract_mesh(), "explicit_axes", ()):
      return update_fn(updates, state, params, **kwargs)
    # Specs, read against the context mesh (arrays placed without one read as replicated).
    sharding_of = lambda tree: jax.tree.map(lambda x: jax.typeof(x).sharding.spec, tree)
    out_sharding = sharding_of((updates, state))
    leaves, treedef = jax.tree.flatten(kwargs)
    arrays = [x for x in leaves if _is_array(x)]
    params_spec = sharding_of(params)

    def solve(u, s, p, arrays):
      given = iter(arrays)
      rebuilt = [
        next(given) if _is_array(x) else (_in_explicit_mode(x, params_spec) if callable(x) else x)
        for x in leaves
      ]
      return update_fn(u, s, p, **treedef.unflatten(rebuilt))

    return jax.sharding.auto_axes(solve, out_sharding=out_sharding)(updates, state, params, arrays)

  return wrapped
