"""Running the update on a mesh whose axes are Explicit (``jax.make_mesh``'s default).

The curvature products contract over the batch rows, which a data-parallel mesh shards; a
mesh with Explicit axes asks for an output sharding at each such contraction. With the axes
in Auto mode the partitioner places the collectives, and the update and the new state come
back in the layout of the gradients and the old state.
"""

from __future__ import annotations

import jax


def auto_axes_on_explicit_mesh(update_fn):
  """Runs ``update_fn`` with the context mesh's axes in Auto mode when some are Explicit.

  Without a mesh, or with Auto axes only, ``update_fn`` runs as it is. Callable extra
  arguments (``value_fn``, a function of params-like arrays that may close over the caller's
  explicitly sharded batch) run back in Explicit mode, their argument laid out like
  ``params``.
  """

  def wrapped(updates, state, params=None, **kwargs):
    if not getattr(jax.sharding.get_abstract_mesh(), "explicit_axes", ()):
      return update_fn(updates, state, params, **kwargs)
    # Specs, read against the context mesh (arrays placed without one read as replicated).
    sharding_of = lambda tree: jax.tree.map(lambda x: jax.typeof(x).sharding.spec, tree)
    out_sharding = sharding_of((updates, state))
    fns = {
      k: jax.sharding.explicit_axes(v, in_sharding=(sharding_of(params),))
      for k, v in kwargs.items()
      if callable(v)
    }
    arrays = {k: v for k, v in kwargs.items() if k not in fns}
    solve = lambda u, s, p, arrays: update_fn(u, s, p, **arrays, **fns)
    return jax.sharding.auto_axes(solve, out_sharding=out_sharding)(updates, state, params, arrays)

  return wrapped
