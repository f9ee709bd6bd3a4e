"""``scale_by_cgfac`` on several layers at once against the dense solve, and its errors."""

import pathlib
import re
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import cgfac_optax as cgfac
from cgfac_optax._solvers import SOLVERS

sys.path.insert(0, str(pathlib.Path(__file__).parent))
import oracles  # noqa: E402

GAMMA = 0.05
# Layer name -> (d_in, d_out, has bias, leading dims of its stats or None for no stats).
# Dense_0 has fewer rows than d_A and d_G, Dense_1 more, Dense_3 is applied at 4 positions of
# each of 2 examples; Dense_2 has no stats and LayerNorm_0 holds no kernel.
LAYERS = {
  "Dense_0": (5, 4, True, (3,)),
  "Dense_1": (4, 3, False, (12,)),
  "Dense_2": (3, 2, True, None),
  "Dense_3": (3, 2, True, (2, 4)),
}
WITH_STATS = ["Dense_0", "Dense_1", "Dense_3"]


def _setup(seed=0, dtype=np.float64):
  rng = np.random.default_rng(seed)
  params, grads, stats = {}, {}, {}
  for name, (d_in, d_out, bias, lead) in LAYERS.items():
    params[name] = {"kernel": rng.normal(size=(d_in, d_out)).astype(dtype)}
    grads[name] = {"kernel": rng.normal(size=(d_in, d_out)).astype(dtype)}
    if bias:
      params[name]["bias"] = rng.normal(size=d_out).astype(dtype)
      grads[name]["bias"] = rng.normal(size=d_out).astype(dtype)
    if lead is not None:
      stats[name] = cgfac.DenseStats(
        rng.normal(size=(*lead, d_in)).astype(dtype), rng.normal(size=(*lead, d_out)).astype(dtype)
      )
  params["LayerNorm_0"] = {"scale": np.ones(4, dtype)}
  grads["LayerNorm_0"] = {"scale": rng.normal(size=4).astype(dtype)}
  to_jnp = lambda t: jax.tree.map(jnp.asarray, t)
  return to_jnp(params), to_jnp(grads), to_jnp(stats)


def _dense_update(grads, stats, gamma=GAMMA):
  """The damped K-FAC solve for every layer with stats, by ``np.linalg.solve``.

  Parameters without stats get the default ``fallback="diagonal"``: ``g / (g^2 + gamma)`` when
  every step so far had the same gradient (the bias-corrected EMA of ``g^2`` is then ``g^2``).
  """
  out = jax.tree.map(lambda g: np.asarray(g) / (np.square(g) + gamma), grads)
  for name, st in stats.items():
    out[name] = oracles.from_matrix(oracles.layer_solve(st, grads[name], gamma), grads[name])
  return out


def _assert_trees_close(got, want, rtol):
  jax.tree.map(lambda g, w: np.testing.assert_allclose(g, w, rtol=rtol, atol=rtol), got, want)


# Every exact solver in the table, iterative ones run to convergence; Jacobi-preconditioned CG
# too for the iterative solvers that offer a diagonal. (A solver that damps otherwise has its own
# oracle in tests/test_solvers.py.)
SOLVER_OPTIONS = {
  **{
    n: {"max_iters": 200, "tol": 1e-13} if s.iterative else {}
    for n, s in SOLVERS.items()
    if s.exact
  },
  **{
    f"{n}_jacobi": {"max_iters": 200, "tol": 1e-13, "preconditioner": "jacobi"}
    for n, s in SOLVERS.items()
    if s.diagonal is not None
  },
}


@pytest.mark.usefixtures("x64")
@pytest.mark.parametrize("solver", sorted(SOLVER_OPTIONS))
def test_solvers_agree_with_dense_solve(solver):
  params, grads, stats = _setup()
  options = dict(SOLVER_OPTIONS[solver])
  method = SOLVERS[solver.removesuffix("_jacobi")]
  tx = cgfac.scale_by_cgfac(GAMMA, solver=method.name, **options)
  state = tx.init(params)
  updates, state = jax.jit(tx.update)(grads, state, params, layer_stats=stats)
  # Every layer with stats is the dense Kronecker solve, and so is the warm start kept in the
  # state (this step's solution).
  assert sorted(stats) == WITH_STATS
  for name in WITH_STATS:
    want = oracles.layer_solve(stats[name], grads[name], GAMMA)
    np.testing.assert_allclose(oracles.as_matrix(updates[name]), want, rtol=1e-8, atol=1e-8)
    np.testing.assert_allclose(oracles.as_matrix(state.solution[name]), want, rtol=1e-8, atol=1e-8)
    # The K-FAC step is not the fallback's diagonal step, so the check above can fail.
    diagonal = oracles.as_matrix(jax.tree.map(lambda g: g / (g * g + GAMMA), grads[name]))
    assert not np.allclose(want, diagonal, rtol=1e-2)
    if method.iterative:
      assert 1 <= state.iterations[name] <= 200
      assert state.residual[name] <= 1e-12
    else:
      assert int(state.iterations[name]) == 0 and float(state.residual[name]) == 0
  # No stats: the default fallback's damped diagonal step (checked in _dense_update), which
  # tests/test_fallback.py checks over several steps and against fallback="identity"; no
  # iterations and a zero warm start.
  _assert_trees_close(updates, _dense_update(grads, stats), rtol=1e-8)
  assert sorted(state.iterations) == ["Dense_0", "Dense_1", "Dense_2", "Dense_3"]
  assert state.iterations["Dense_2"] == 0
  assert not any(bool(jnp.any(x)) for x in jax.tree.leaves(state.solution["Dense_2"]))
  assert int(state.count) == 1


@pytest.mark.usefixtures("x64")
def test_curvature_batch_size_uses_the_first_examples():
  params, grads, stats = _setup(seed=1)
  k = 2
  first_k = {n: cgfac.DenseStats(s.inputs[:k], s.output_grads[:k]) for n, s in stats.items()}
  tx = cgfac.scale_by_cgfac(GAMMA, solver="lowrank", curvature_batch_size=k)
  updates, _ = jax.jit(tx.update)(grads, tx.init(params), params, layer_stats=stats)
  _assert_trees_close(updates, _dense_update(grads, first_k), rtol=1e-8)
  # The full batch gives a different answer, so the check above can fail.
  full = _dense_update(grads, stats)
  assert not np.allclose(updates["Dense_1"]["kernel"], full["Dense_1"]["kernel"], rtol=1e-3)
  # A size past the batch uses all of it.
  tx = cgfac.scale_by_cgfac(GAMMA, solver="lowrank", curvature_batch_size=100)
  updates, _ = jax.jit(tx.update)(grads, tx.init(params), params, layer_stats=stats)
  _assert_trees_close(updates, full, rtol=1e-8)


@pytest.mark.usefixtures("x64")
@pytest.mark.parametrize("solver", [n for n, s in SOLVERS.items() if s.iterative])
def test_warm_start_converges_at_once_on_the_same_inputs(solver):
  params, grads, stats = _setup(seed=2)
  tx = cgfac.scale_by_cgfac(GAMMA, solver=solver, max_iters=100, tol=1e-6)
  update = jax.jit(tx.update)
  state = tx.init(params)
  first, state = update(grads, state, params, layer_stats=stats)
  # From zero, plain CG needs several iterations; a solver with its own preconditioner may
  # need only one (an exact one).
  least = 1 if SOLVERS[solver].preconditioner is not None else 3
  assert all(int(state.iterations[n]) >= least for n in stats)
  second, state = update(grads, state, params, layer_stats=stats)
  assert all(int(state.iterations[n]) in (0, 1) for n in stats), state.iterations
  assert all(float(state.residual[n]) <= 1e-6 for n in stats)
  _assert_trees_close(second, _dense_update(grads, stats), rtol=1e-5)


@pytest.mark.usefixtures("x64")
def test_without_warm_start_every_solve_starts_from_zero():
  params, grads, stats = _setup(seed=3)
  tx = cgfac.scale_by_cgfac(GAMMA, max_iters=3, tol=1e-10, warm_start=False)
  update = jax.jit(tx.update)
  first, state = update(grads, tx.init(params), params, layer_stats=stats)
  second, state2 = update(grads, state, params, layer_stats=stats)
  for n in stats:  # the layers without stats carry the fallback's moment from step to step
    jax.tree.map(np.testing.assert_array_equal, second[n], first[n])
  assert all(int(state2.iterations[n]) == 3 for n in stats)
  # With the warm start the second call improves on the first (same iteration budget).
  tx = cgfac.scale_by_cgfac(GAMMA, max_iters=3, tol=1e-10)
  update = jax.jit(tx.update)
  _, state = update(grads, tx.init(params), params, layer_stats=stats)
  _, state = update(grads, state, params, layer_stats=stats)
  assert all(float(state.residual[n]) < float(state2.residual[n]) for n in stats)


def test_stats_may_be_a_single_layer_at_the_root():
  params, grads, stats = oracles.dense_layer(4, 3, 2, (6,), name=None, random_grads=True)
  params, grads, stats = jax.tree.map(jnp.asarray, (params, grads, stats))
  tx = cgfac.scale_by_cgfac(GAMMA, solver="eigh")
  updates, state = jax.jit(tx.update)(grads, tx.init(params), params, layer_stats=stats)
  want = oracles.from_matrix(oracles.layer_solve(stats, grads, GAMMA), grads)
  _assert_trees_close(updates, want, rtol=1e-4)
  assert list(state.iterations) == [""]


@pytest.mark.parametrize("solver", list(SOLVERS))
def test_non_finite_input_skips_the_layer_and_keeps_the_state_finite(solver):
  # Every solver skips a layer with a non-finite gradient (Dense_0) or non-finite stats
  # (Dense_1): zero update, zero warm start, counted; the other layers are untouched, and the
  # state never holds a non-finite value.
  params, grads, stats = _setup(seed=5, dtype=np.float32)
  tx = cgfac.scale_by_cgfac(GAMMA, solver=solver)
  update = jax.jit(tx.update)
  clean, _ = update(grads, tx.init(params), params, layer_stats=stats)
  grads["Dense_0"]["kernel"] = grads["Dense_0"]["kernel"].at[0, 0].set(jnp.nan)
  stats["Dense_1"] = stats["Dense_1"]._replace(
    output_grads=stats["Dense_1"].output_grads.at[1, 2].set(jnp.inf)
  )
  updates, state = update(grads, tx.init(params), params, layer_stats=stats)
  for name in ("Dense_0", "Dense_1"):
    assert not np.any(updates[name]["kernel"]) and not np.any(state.solution[name]["kernel"])
    assert int(state.control.skipped[name]) == 1
    assert float(state.residual[name]) == 1.0
  assert all(bool(jnp.all(jnp.isfinite(x))) for x in jax.tree.leaves(state))
  jax.tree.map(np.testing.assert_array_equal, updates["Dense_3"], clean["Dense_3"])


# Errors.


def _update(tx=None, params=None, grads=None, **kwargs):
  p, g, _ = _setup(seed=6, dtype=np.float32)
  params = p if params is None else params
  grads = g if grads is None else grads
  tx = tx or cgfac.scale_by_cgfac(GAMMA)
  return tx.update(grads, tx.init(params), params, **kwargs)


def test_missing_layer_stats():
  with pytest.raises(
    ValueError, match=r"needs layer_stats at update.*value_grad_and_extra.*DenseStats"
  ):
    _update()


def test_stats_without_a_kernel():
  stats = {"LayerNorm_0": cgfac.DenseStats(jnp.ones((4, 4)), jnp.ones((4, 4)))}
  with pytest.raises(ValueError, match=r"stats at 'LayerNorm_0'.*no 'LayerNorm_0/kernel'"):
    _update(layer_stats=stats)


def test_stats_of_the_wrong_type():
  # A plain (inputs, output_grads) tuple is a pytree node: the leaf found is its first array.
  msg = "layer_stats must hold cgfac_optax.DenseStats at each layer's path, got ArrayImpl at"
  with pytest.raises(TypeError, match=re.escape(msg) + " 'Dense_0/0'"):
    _update(layer_stats={"Dense_0": (jnp.ones((4, 5)), jnp.ones((4, 4)))})


@pytest.mark.parametrize(
  ("d_in", "d_out"),
  [(6, 4), (5, 3), (4, 5)],  # wrong d_in, wrong d_out, same size but transposed
)
def test_kernel_shape_mismatch(d_in, d_out):
  stats = {"Dense_0": cgfac.DenseStats(jnp.ones((4, d_in)), jnp.ones((4, d_out)))}
  msg = (
    f"layer 'Dense_0': kernel shape (5, 4) does not match stats with inputs (..., {d_in}) "
    f"and output_grads (..., {d_out})"
  )
  with pytest.raises(ValueError, match=re.escape(msg)):
    _update(layer_stats=stats)


def test_bias_shape_mismatch():
  params, grads, _ = _setup(seed=7, dtype=np.float32)
  params["Dense_0"]["bias"] = jnp.zeros(3)
  grads["Dense_0"]["bias"] = jnp.zeros(3)
  stats = {"Dense_0": cgfac.DenseStats(jnp.ones((4, 5)), jnp.ones((4, 4)))}
  msg = "layer 'Dense_0': bias shape (3,) does not match output_grads (..., 4)"
  with pytest.raises(ValueError, match=re.escape(msg)):
    _update(params=params, grads=grads, layer_stats=stats)


@pytest.mark.parametrize(
  ("a_shape", "g_shape"), [((4, 5), (3, 4)), ((2, 3, 5), (2, 4, 4)), ((5,), (4,))]
)
def test_leading_dims_mismatch(a_shape, g_shape):
  stats = {"Dense_0": cgfac.DenseStats(jnp.ones(a_shape), jnp.ones(g_shape))}
  msg = (
    f"layer 'Dense_0': inputs {a_shape} and output_grads {g_shape} must be "
    "(examples, ..., d) with the same leading dimensions"
  )
  with pytest.raises(ValueError, match=re.escape(msg)):
    _update(layer_stats=stats)


@pytest.mark.parametrize(
  ("kwargs", "msg"),
  [
    ({"damping": 0.0}, "damping must be > 0, got 0.0"),
    ({"damping": -1}, "damping must be > 0, got -1"),
    ({"max_iters": 0}, "max_iters must be an int >= 1, got 0"),
    ({"max_iters": 2.5}, "max_iters must be an int >= 1, got 2.5"),
    ({"max_iters": True}, "max_iters must be an int >= 1, got True"),
    ({"max_iters": jnp.asarray(2.0)}, "max_iters must be an int >= 1, got Array(2."),
    ({"tol": -1e-3}, "tol must be >= 0, got -0.001"),
    ({"solver": "qr"}, f"solver must be 'auto', one of {list(SOLVERS)}, or a dict"),
    ({"curvature_batch_size": 0}, "curvature_batch_size must be None or an int >= 1, got 0"),
    ({"curvature_batch_size": 8.0}, "curvature_batch_size must be None or an int >= 1, got 8.0"),
    ({"preconditioner": "ilu"}, "preconditioner must be one of (None, 'jacobi'), got 'ilu'"),
  ],
)
def test_bad_options(kwargs, msg):
  kwargs = {"damping": 1e-3, **kwargs}
  damping = kwargs.pop("damping")
  with pytest.raises(ValueError, match=re.escape(msg)):
    cgfac.scale_by_cgfac(damping, **kwargs)
  with pytest.raises(ValueError, match=re.escape(msg)):
    cgfac.cgfac(0.1, damping, **kwargs)


def test_unknown_option_is_a_type_error():
  with pytest.raises(TypeError, match="max_iter"):
    cgfac.cgfac(0.1, 1e-3, max_iter=3)
