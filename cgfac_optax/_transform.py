"""``scale_by_cgfac``: the CG-FAC preconditioner as an optax transformation."""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from cgfac_optax import _blocks, _clipping, _control, _damping, _finite, _tree
from cgfac_optax._blocks import DenseStats
from cgfac_optax._cg import batched_cg
from cgfac_optax._control import StepControlState
from cgfac_optax._damping import AdaptiveDamping

PRECONDITIONERS = (None, "jacobi")


class ScaleByCGFACState(NamedTuple):
  """State of :func:`scale_by_cgfac`: arrays only.

  Attributes:
    count: number of updates so far.
    solution: the last solve's answer per parameter (the warm start of the
      next solve); zeros for parameters without curvature stats.
    iterations: CG iterations of the last solve, per layer path (0 for the
      direct solvers and for layers without stats).
    residual: relative residual ``||b - F x|| / ||b||`` of the last CG solve,
      per layer path (0 for the direct solvers, exact up to rounding; 1 for a
      skipped layer, whose update is zero).
    control: damping, KL-clipping factor and skipped-layer counts
      (:class:`StepControlState`).
  """

  count: jax.Array  # shape=(), dtype=int32
  solution: optax.Updates  # like params
  iterations: dict[str, jax.Array]  # shape=() each, dtype=int32
  residual: dict[str, jax.Array]  # shape=() each, dtype=float32
  control: StepControlState


class _Layer(NamedTuple):
  path: str
  kernel: int  # index of the kernel leaf in the flat gradients
  bias: int | None  # index of the bias leaf, if any
  stats: DenseStats


def _check_number(name: str, value: Any, ok, requirement: str) -> None:
  # Traced or array values (inject_hyperparams, schedules) are checked by the user.
  if isinstance(value, (int, float)) and not isinstance(value, bool) and not ok(value):
    raise ValueError(f"{name} must be {requirement}, got {value!r}")


def _validate(damping, max_iters, tol, solver, curvature_batch_size, preconditioner):
  if not callable(damping):
    _check_number("damping", damping, lambda d: d > 0, "> 0")
  # An integer array is allowed: optax.inject_hyperparams turns every int option into one, and
  # the CG loop takes a traced bound.
  int_array = isinstance(max_iters, (jax.Array, np.ndarray)) and (
    max_iters.ndim == 0 and jnp.issubdtype(max_iters.dtype, jnp.integer)
  )
  if isinstance(max_iters, bool) or not (isinstance(max_iters, int) or int_array):
    raise ValueError(f"max_iters must be an int >= 1, got {max_iters!r}")
  _check_number("max_iters", max_iters, lambda m: m >= 1, "an int >= 1")
  _check_number("tol", tol, lambda t: t >= 0, ">= 0")
  if solver not in _blocks.SOLVERS:
    raise ValueError(f"solver must be one of {sorted(_blocks.SOLVERS)}, got {solver!r}")
  if curvature_batch_size is not None and (
    not isinstance(curvature_batch_size, int) or curvature_batch_size < 1
  ):
    raise ValueError(
      f"curvature_batch_size must be None or an int >= 1, got {curvature_batch_size!r}"
    )
  if preconditioner not in PRECONDITIONERS:
    raise ValueError(f"preconditioner must be one of {PRECONDITIONERS}, got {preconditioner!r}")


def _match_layers(paths: list[str], leaves: list[jax.Array], layer_stats) -> list[_Layer]:
  index = {p: i for i, p in enumerate(paths)}
  layers = []
  for path, stats in _tree.flatten_stats(layer_stats).items():
    k = index.get(f"{path}/kernel" if path else "kernel")
    if k is None:
      raise ValueError(
        f"layer_stats has stats at {path!r} but the gradients have no "
        f"{path + '/kernel'!r}; stats must sit at the path of the layer's "
        "parameter dict"
      )
    b = index.get(f"{path}/bias" if path else "bias")
    kernel = leaves[k]
    a, g = stats.inputs, stats.output_grads
    if a.ndim < 2 or g.ndim < 2 or a.shape[:-1] != g.shape[:-1]:
      raise ValueError(
        f"layer {path!r}: inputs {a.shape} and output_grads {g.shape} must be "
        "(examples, ..., d) with the same leading dimensions"
      )
    d_in, d_out = a.shape[-1], g.shape[-1]
    if kernel.size != d_in * d_out or (kernel.ndim == 2 and kernel.shape[-1] != d_out):
      raise ValueError(
        f"layer {path!r}: kernel shape {kernel.shape} does not match stats with "
        f"inputs (..., {d_in}) and output_grads (..., {d_out})"
      )
    if b is not None and leaves[b].size != d_out:
      raise ValueError(
        f"layer {path!r}: bias shape {leaves[b].shape} does not match output_grads (..., {d_out})"
      )
    layers.append(_Layer(path, k, b, stats))
  return layers


def _as_matrix(leaves, layer: _Layer, dtype) -> jax.Array:
  """The layer's kernel (and bias as the last row) as one ``d_A x d_G`` matrix."""
  d_out = layer.stats.output_grads.shape[-1]
  m = leaves[layer.kernel].reshape(-1, d_out).astype(dtype)
  if layer.bias is not None:
    m = jnp.concatenate([m, leaves[layer.bias].reshape(1, d_out).astype(dtype)], 0)
  return m


def _from_matrix(out: list, leaves, layer: _Layer, m: jax.Array) -> None:
  kernel = leaves[layer.kernel]
  out[layer.kernel] = m[: kernel.size // m.shape[1]].reshape(kernel.shape).astype(kernel.dtype)
  if layer.bias is not None:
    bias = leaves[layer.bias]
    out[layer.bias] = m[-1].reshape(bias.shape).astype(bias.dtype)


def _curvature_rows(stats: DenseStats, has_bias: bool, batch_size, dtype):
  a, g = stats.inputs, stats.output_grads
  if batch_size is not None:
    a, g = a[:batch_size], g[:batch_size]
  scale_a, scale_g = _blocks.factor_scales(DenseStats(a, g))
  a = _blocks.to_rows(a).astype(dtype)
  g = _blocks.to_rows(g).astype(dtype)
  if has_bias:
    a = _blocks.append_ones(a)
  return a, g, scale_a, scale_g


def scale_by_cgfac(
  damping: float | jax.Array | optax.Schedule | AdaptiveDamping,
  *,
  max_iters: int = 10,
  tol: float = 1e-3,
  solver: str = "cg",
  warm_start: bool = True,
  curvature_batch_size: int | None = None,
  preconditioner: str | None = None,
  learning_rate: float | jax.Array | optax.Schedule | None = None,
  kl_clip: float | jax.Array | None = None,
) -> optax.GradientTransformationExtraArgs:
  r"""Preconditions gradients by the damped K-FAC Fisher, solved with CG.

  For each layer with curvature stats ``a`` (inputs) and ``g`` (per-example
  output gradients), the update is the solution of

  .. math::

    (A \otimes G + \gamma I)\, x = \nabla_W L,
    \quad A = \tfrac{1}{\text{rows}} a^\top a,\ G = \tfrac{1}{B} g^\top g,

  found by conjugate gradient with the matrix-free product
  ``A V G = a^T ((a V) g^T) g / (rows B)`` (``solver="cg"``), never forming
  ``A``, ``G`` or the Fisher, starting from the previous step's solution. All
  layers are solved in one ``lax.while_loop``. The update has the sign of the
  gradient; chain a negative learning rate after it (:func:`cgfac` does).

  Parameters whose layer has no entry in ``layer_stats`` pass through
  unchanged.

  **Step control.** With ``kl_clip=kappa`` every layer's solution is scaled by
  one common factor ``c = min(1, sqrt(kappa / (lr^2 sum_l <x_l, grad_l>)))``
  so that the step ``-lr c x`` has ``lr^2 <c x, F c x> <= kappa``, computed
  without another curvature product (``<x, (F + gamma I) x> = <x, grad>`` for
  an exact solve; see :mod:`cgfac_optax._clipping`). The clip acts before any
  momentum that follows in the chain (as kfac-pytorch's ``kl_clip``). With
  ``damping=AdaptiveDamping(...)`` the damping follows the Levenberg-Marquardt
  rule (see :class:`AdaptiveDamping`); ``update`` then also needs ``value=``
  (the loss at ``params`` on this batch) and ``value_fn=`` (``params -> loss``
  on the same batch), the extra arguments ``optax`` line searches take::

    tx = cgfac.cgfac(learning_rate=0.1, damping=cgfac.AdaptiveDamping(initial=1e-2))

    @jax.jit
    def train_step(params, opt_state, batch):
      loss, grads, stats = value_grad_and_stats(params, batch)
      updates, opt_state = tx.update(
        grads, opt_state, params, layer_stats=stats,
        value=loss, value_fn=lambda p: loss_fn(p, batch))
      return optax.apply_updates(params, updates), opt_state, loss

  **Non-finite inputs never reach the state.** A layer whose gradient or stats
  hold a NaN or an infinity, whose solve is not finite, or whose update does
  not fit the parameter dtype is *skipped*: its update is zero, its warm start
  is reset to zero and ``state.control.skipped[path]`` counts it. Every other
  layer is updated as usual, so the update is always finite for parameters
  with stats, also inside ``optax.apply_if_finite`` (which still catches
  non-finite gradients of parameters without stats). Right-hand sides are
  scaled by an exact power of two before the solve, so gradients from about
  ``1e-30`` to ``1e30`` are solved as accurately as those near 1. The math runs
  in at least float32 (float16 and bfloat16 inputs are promoted); updates and
  warm starts keep each parameter's dtype.

  Args:
    damping: ``gamma > 0``, a float, an ``optax.Schedule`` of the step count,
      or :class:`AdaptiveDamping` options for Levenberg-Marquardt adaptation.
    max_iters: most CG iterations per step.
    tol: CG stops for a layer when ``||r|| <= tol ||grad||``.
    solver: ``"cg"`` (matrix-free CG, the paper), ``"cg_materialized"`` (CG
      with ``A`` and ``G`` formed once per step), ``"eigh"`` (exact: standard
      K-FAC with eigendecomposed factors) or ``"lowrank"`` (exact: thin
      eigendecomposition from the ``rows x rows`` Gram matrices).
    warm_start: start CG from the previous solution (else from zero).
    curvature_batch_size: use only the first this-many examples of the stats
      for the curvature (the gradient always uses the full batch).
    preconditioner: ``None`` or ``"jacobi"`` (``diag(A (x) G) + gamma``).
    learning_rate: the learning rate the chain applies after this
      transformation (a float or schedule of the same step count). Used only by
      ``kl_clip`` and adaptive damping, which need it; the output is not
      scaled by it.
    kl_clip: ``None`` (no clipping) or the bound ``kappa > 0`` on
      ``lr^2 <x, F x>`` per step.

  Returns:
    An ``optax.GradientTransformationExtraArgs`` whose ``update`` takes
    ``layer_stats=`` (a pytree mirroring the params down to each layer's
    parameter dict, holding :class:`DenseStats` there), and with adaptive
    damping also ``value=`` and ``value_fn=``.

  Raises:
    ValueError: for invalid options (at construction), for missing or
      mismatched ``layer_stats`` (at update), and for a missing ``value``,
      ``value_fn`` or ``params`` with adaptive damping (at update).

  Examples:
    >>> import jax, jax.numpy as jnp, cgfac_optax as cgfac
    >>> params = {"dense": {"kernel": jnp.ones((3, 2)), "bias": jnp.zeros(2)}}
    >>> x = jax.random.normal(jax.random.key(0), (8, 3))
    >>> g = jax.random.normal(jax.random.key(1), (8, 2))
    >>> grads = {"dense": {"kernel": x.T @ g / 8, "bias": g.mean(0)}}
    >>> stats = {"dense": cgfac.DenseStats(inputs=x, output_grads=g)}
    >>> tx = cgfac.scale_by_cgfac(damping=1e-2)
    >>> state = tx.init(params)
    >>> updates, state = tx.update(grads, state, params, layer_stats=stats)
    >>> updates["dense"]["kernel"].shape
    (3, 2)

  References:
    Chen, `An iterative K-FAC algorithm for Deep Learning
    <https://arxiv.org/abs/2101.00218>`_, 2021.

    Martens & Grosse, `Optimizing Neural Networks with Kronecker-factored
    Approximate Curvature <https://arxiv.org/abs/1503.05671>`_, 2015.
  """
  _validate(damping, max_iters, tol, solver, curvature_batch_size, preconditioner)
  _control.validate(damping, learning_rate, kl_clip)
  method = _blocks.SOLVERS[solver]
  adaptive = isinstance(damping, AdaptiveDamping)

  def init_fn(params):
    paths = _tree.layer_paths(params)
    return ScaleByCGFACState(
      count=jnp.zeros([], jnp.int32),
      solution=optax.tree.zeros_like(params),
      iterations={p: jnp.zeros([], jnp.int32) for p in paths},
      residual={p: jnp.zeros([], jnp.float32) for p in paths},
      control=_control.init(damping, paths),
    )

  def update_fn(
    updates, state, params=None, *, layer_stats=None, value=None, value_fn=None, **extra_args
  ):
    del extra_args
    if layer_stats is None:
      raise ValueError(
        "scale_by_cgfac needs the layers' curvature stats: call "
        "tx.update(grads, state, params, layer_stats=stats), with stats from "
        "cgfac_optax.flax.value_grad_and_stats (Linen), "
        "cgfac_optax.flax.nnx_value_grad_and_stats (NNX), or built by hand as "
        "{layer path: cgfac_optax.DenseStats(inputs, output_grads)}"
      )
    if adaptive:
      _control.check_adaptive_args(params, value, value_fn)
    flat, treedef = jax.tree_util.tree_flatten_with_path(updates)
    paths = [_tree.path_str(p) for p, _ in flat]
    grads = [leaf for _, leaf in flat]
    sol_leaves = treedef.flatten_up_to(state.solution)
    layers = _match_layers(paths, grads, layer_stats)
    gamma = _control.damping_now(damping, state.control, state.count)

    iterations = dict(state.iterations)
    residual = dict(state.residual)
    systems, x_hats = [], []
    rhs, x0, ops, precs, iterative = [], [], [], [], []
    for layer in layers:
      dtype = jnp.promote_types(grads[layer.kernel].dtype, jnp.float32)
      a, g, sa, sg = _curvature_rows(
        layer.stats, layer.bias is not None, curvature_batch_size, dtype
      )
      start = _as_matrix(sol_leaves, layer, dtype)
      system = _finite.unit_system(
        a, g, _as_matrix(grads, layer, dtype), start if warm_start else jnp.zeros_like(start)
      )
      systems.append(system)
      gam = jnp.asarray(gamma, dtype)
      data = method.prepare(a, g, sa, sg)
      if method.iterative:
        ops.append(lambda v, data=data, gam=gam: method.apply(data, v) + gam * v)
        if preconditioner == "jacobi":
          diag = _blocks.jacobi_diagonal(a, g, sa, sg) + gam
          precs.append(lambda r, diag=diag: r / diag)
        else:
          precs.append(None)
        rhs.append(system.b)
        x0.append(system.x0)
        iterative.append(len(x_hats))
        x_hats.append(None)
      else:
        x_hats.append(method.apply(data, system.b, gam))

    ok = [system.ok for system in systems]
    if iterative:
      result = batched_cg(ops, rhs, x0, max_iters=max_iters, tol=tol, preconditioners=precs)
      for j, i in enumerate(iterative):
        x_hats[i] = result.x[j]
        ok[i] = ok[i] & jnp.isfinite(result.residual[j])
        if layers[i].path in iterations:
          iterations[layers[i].path] = result.iterations[j]
          residual[layers[i].path] = result.residual[j].astype(jnp.float32)
    ok = [o & _finite.all_finite(x) for o, x in zip(ok, x_hats)]
    x_hats = [jnp.where(o, x, 0) for o, x in zip(ok, x_hats)]
    exponents = [system.exponent for system in systems]

    lr = _control.at_count(learning_rate, state.count)
    clip = _clipping.no_clip(jnp.float32)
    if layers and (kl_clip is not None or adaptive):
      xg = _clipping.x_dot_grad(x_hats, [system.b for system in systems], exponents)
      if kl_clip is not None:
        clip = _clipping.kl_clip_factor(xg, lr, kl_clip)

    out = list(grads)
    new_sol = list(sol_leaves)
    skipped = dict(state.control.skipped)
    for layer, x_hat, e, o in zip(layers, x_hats, exponents, ok):
      written = _write_finite(
        out, grads, layer, _finite.times_pow2(x_hat * clip.mantissa, e + clip.exponent)
      )
      _write_finite(new_sol, sol_leaves, layer, _finite.times_pow2(x_hat, e))
      skip = ~(o & written)
      if layer.path in skipped:
        skipped[layer.path] = skipped[layer.path] + skip.astype(jnp.int32)
        iterations[layer.path] = jnp.where(skip, 0, iterations[layer.path])
        residual[layer.path] = jnp.where(skip, 1, residual[layer.path]).astype(jnp.float32)

    next_damping = jnp.asarray(gamma, jnp.float32)
    # A schedule may return a bad value; the state keeps the last good one.
    next_damping = jnp.where(jnp.isfinite(next_damping), next_damping, state.control.damping)
    if adaptive and layers:
      x_sq = _clipping.scaled_sum([jnp.sum(x * x) for x in x_hats], [2 * e for e in exponents])
      step = jnp.asarray(lr, jnp.float32) * clip.value()
      predicted = _damping.predicted_change(xg.value(), x_sq.value(), next_damping, step)
      probe = _probe(treedef.flatten_up_to(params), out, layers, lr, treedef)
      next_damping = _control.adapted_damping(
        damping, state.count, next_damping, value, value_fn, probe, predicted
      )

    new_state = ScaleByCGFACState(
      count=optax.safe_increment(state.count),
      solution=treedef.unflatten(new_sol),
      iterations=iterations,
      residual=residual,
      control=StepControlState(
        damping=next_damping, clip=clip.value().astype(jnp.float32), skipped=skipped
      ),
    )
    return treedef.unflatten(out), new_state

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def _write_finite(out, leaves, layer: _Layer, m: jax.Array) -> jax.Array:
  """Writes one layer's matrix in the leaves' shapes and dtypes; zeros unless all of it is finite.

  Returns whether it was finite (after the cast: 1e5 fits float32 but not float16).
  """
  cast = {}
  _from_matrix(cast, leaves, layer, m)
  finite = _finite.all_finite(*cast.values())
  for i, c in cast.items():
    out[i] = jnp.where(finite, c, jnp.zeros_like(c))
  return finite


def _probe(param_leaves, updates, layers, learning_rate, treedef):
  """``() -> params - lr * updates`` on the layers with stats (the adaptive-damping probe point)."""
  moved = {i for layer in layers for i in (layer.kernel, layer.bias) if i is not None}

  def probe():
    leaves = [
      (p - learning_rate * u).astype(p.dtype) if i in moved else p
      for i, (p, u) in enumerate(zip(param_leaves, updates))
    ]
    return treedef.unflatten(leaves)

  return probe
