"""References the tests compare the library against, written independently of it (NumPy, float64).

- **The dense Kronecker solve.** A layer's damped K-FAC system as the explicit
  ``(d_A d_G) x (d_A d_G)`` matrix ``kron(A, G) + gamma I``, solved by ``np.linalg.solve``.
  It acts on the row-major ``vec`` of a ``d_A x d_G`` matrix ``V`` (the layer's kernel, its
  bias appended as the last row): ``kron(A, G) vec(V) = vec(A V G)`` for symmetric ``G``, the
  layout of the library's ``A V G`` (``tests/test_solvers.py`` checks that this is the layout of
  the kernel and bias gradients).
- **The factors of a layer's stats**, by the rule of the ``cgfac_optax._layers`` docstring:
  ``A = a^T a / rows`` (a column of ones appended for a bias) and ``G = g^T g / examples``.
- **A hand-made dense layer**: random stats and the params and gradient that go with them.

Tests import this module as ``import oracles`` after putting ``tests/`` on ``sys.path`` (pytest
runs with ``--import-mode=importlib``, which does not).
"""

from __future__ import annotations

import numpy as np

import cgfac_optax as cgfac


def factors(inputs, output_grads, bias: bool) -> tuple[np.ndarray, np.ndarray]:
  """``(A, G)`` in float64 from stats ``(examples, ..., d)``: ``a^T a / rows``, ``g^T g / B``.

  With ``bias``, a column of ones is appended to the input rows.
  """
  a = np.asarray(inputs, np.float64)
  g = np.asarray(output_grads, np.float64)
  examples = a.shape[0]
  a, g = a.reshape(-1, a.shape[-1]), g.reshape(-1, g.shape[-1])
  if bias:
    a = np.hstack([a, np.ones((a.shape[0], 1))])
  return a.T @ a / a.shape[0], g.T @ g / examples


def kron_matrix(big_a, big_g, damping: float = 0.0) -> np.ndarray:
  """``kron(A, G) + damping I``: the damped block as an explicit matrix on row-major ``vec``."""
  big_a, big_g = np.asarray(big_a, np.float64), np.asarray(big_g, np.float64)
  return np.kron(big_a, big_g) + float(damping) * np.eye(big_a.shape[0] * big_g.shape[0])


def kron_solve(big_a, big_g, damping: float, v) -> np.ndarray:
  """``(A (x) G + damping I)^{-1} V`` for a ``d_A x d_G`` matrix ``V``: the reference solve."""
  v = np.asarray(v, np.float64)
  x = np.linalg.solve(kron_matrix(big_a, big_g, damping), v.reshape(-1))
  return x.reshape(v.shape)


def as_matrix(layer) -> np.ndarray:
  """A layer's ``{"kernel", "bias"?}`` as the float64 ``d_A x d_G`` matrix, bias as the last row."""
  kernel = np.asarray(layer["kernel"], np.float64)
  m = kernel.reshape(-1, kernel.shape[-1])
  if "bias" in layer:
    m = np.vstack([m, np.asarray(layer["bias"], np.float64).reshape(1, -1)])
  return m


def from_matrix(m, like) -> dict:
  """``m`` split back into the kernel (and bias) shapes of the layer ``like``."""
  kernel_shape = np.shape(like["kernel"])
  out = {"kernel": m[: int(np.prod(kernel_shape[:-1]))].reshape(kernel_shape)}
  if "bias" in like:
    out["bias"] = m[-1].reshape(np.shape(like["bias"]))
  return out


def layer_solve(stats, grad_layer, damping: float) -> np.ndarray:
  """The damped K-FAC solve of one layer as a ``d_A x d_G`` matrix (bias as in ``grad_layer``)."""
  big_a, big_g = factors(stats.inputs, stats.output_grads, "bias" in grad_layer)
  return kron_solve(big_a, big_g, damping, as_matrix(grad_layer))


def dense_layer(
  seed: int = 0,
  d_in: int = 3,
  d_out: int = 2,
  lead: tuple[int, ...] = (6,),
  *,
  bias: bool = True,
  name: str | None = "dense",
  scale_a: float = 1.0,
  scale_g: float = 1.0,
  random_grads: bool = False,
  dtype=np.float32,
):
  """One dense layer at zero: ``(params, grads, stats)``.

  The stats are ``a`` (``lead + (d_in,)``) and ``g`` (``lead + (d_out,)``), normal times
  ``scale_a`` and ``scale_g``, drawn in that order from ``default_rng(seed)``; ``lead`` is
  ``(examples,)`` or ``(examples, positions...)``. The gradient is the batch-mean gradient those
  stats give (each example's ``a^T g`` summed over its positions, the bias its summed ``g``,
  then the mean over examples), computed in float64 before the cast to ``dtype``, unless
  ``random_grads`` (then drawn after the stats). Each of the three is ``{name: layer}``, or the
  layer itself when ``name`` is None.
  """
  rng = np.random.default_rng(seed)
  a = rng.normal(size=(*lead, d_in)) * scale_a
  g = rng.normal(size=(*lead, d_out)) * scale_g
  examples = lead[0]
  params = {"kernel": np.zeros((d_in, d_out), dtype)}
  if random_grads:
    grads = {"kernel": rng.normal(size=(d_in, d_out)).astype(dtype)}
    if bias:
      grads["bias"] = rng.normal(size=d_out).astype(dtype)
  else:
    a2, g2 = a.reshape(-1, d_in), g.reshape(-1, d_out)
    grads = {"kernel": (a2.T @ g2 / examples).astype(dtype)}
    if bias:
      grads["bias"] = (g2.sum(0) / examples).astype(dtype)
  if bias:
    params["bias"] = np.zeros(d_out, dtype)
  stats = cgfac.DenseStats(inputs=a.astype(dtype), output_grads=g.astype(dtype))
  if name is None:
    return params, grads, stats
  return {name: params}, {name: grads}, {name: stats}


# The solver table as scale_by_cgfac drives it (library code, not a reference).


def prepare(solver, rows, damping):
  """A solver's data for one batch's ``CurvatureRows``, as a step without curvature memory has it.

  A solver prepares from the rows themselves or from the batch's factors (with what its
  ``refresh`` computes of them): see ``cgfac_optax._solvers._base``.
  """
  from cgfac_optax import _memory

  return solver.prepare(_memory.batch_curvature(solver, rows, damping), damping)


def apply_inverse(solver, data, v, *, max_iters=500, tol=1e-14):
  """``(F + damping I)^{-1} V`` by the solver: its direct solve, or CG on its operator to ``tol``.

  CG uses the solver's own preconditioner, or else its Jacobi diagonal. Returns ``(x, result)``,
  ``result`` the ``CGResult`` (None for a direct solver).
  """
  if not solver.iterative:
    return solver.solve(data, v), None
  own = getattr(solver, "preconditioner", None)
  if own is not None:
    precondition = lambda r: own(data, r)
  else:
    diagonal = solver.diagonal(data)
    precondition = lambda r: r / diagonal
  result = cgfac.batched_cg(
    [lambda x: solver.operator(data, x)],
    [v],
    [v * 0],
    max_iters=max_iters,
    tol=tol,
    preconditioners=[precondition],
  )
  return result.x[0], result


# The Flax helpers as the tests call them (library code, not a reference).


def with_stats(helper):
  """A helper returning ``(loss, grads, extra)`` as one returning ``(loss, grads, stats)``.

  The stats function of ``extra`` is called within the helper's call, so the result can be
  jitted (``extra`` itself holds functions, which a jitted function cannot return).
  """

  def call(*args, **kwargs):
    loss, grads, extra = helper(*args, **kwargs)
    return loss, grads, extra["layer_stats"]()

  return call
