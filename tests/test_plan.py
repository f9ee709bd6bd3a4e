"""Solver "auto": the cost model, the choice per layer, and the printed plan."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import cgfac_optax as cgfac
from cgfac_optax import _blocks, _plan


def shape(*s, dtype=jnp.float32):
  return jax.ShapeDtypeStruct(s, dtype)


def dense(examples, positions, d_in, d_out, bias=True):
  """Params and stats (shapes only) of one dense layer applied at ``positions`` per example."""
  params = {"kernel": shape(d_in, d_out)}
  if bias:
    params["bias"] = shape(d_out)
  lead = (examples, *positions)
  return params, cgfac.DenseStats(shape(*lead, d_in), shape(*lead, d_out))


def _xla_flops(fn, *shapes):
  cost = jax.jit(fn).lower(*[jnp.ones(s) for s in shapes]).compile().cost_analysis()
  cost = cost[0] if isinstance(cost, list) else cost
  return cost["flops"]


@pytest.mark.parametrize("rows, d_a, d_g", [(64, 40, 300), (200, 30, 20)])
def test_flop_counts_match_xla_cost_analysis(rows, d_a, d_g):
  """Matmul flops of each solver (eigendecompositions aside) as XLA counts them."""
  a, g, v = (rows, d_a), (rows, d_g), (d_a, d_g)
  flops = _plan.solver_flops(rows, d_a, d_g, cg_iters=0)  # one product
  eig = _plan.EIGH_FLOPS * (d_a**3 + d_g**3)
  eig_rows = 2 * _plan.EIGH_FLOPS * rows**3

  def product(solver):
    s = _blocks.SOLVERS[solver]
    return lambda a, g, v: s.apply(s.prepare(a, g, 1.0, 1.0), v)

  def solve(solver):
    s = _blocks.SOLVERS[solver]
    return lambda a, g, v: s.apply(s.prepare(a, g, 1.0, 1.0), v, 0.1)

  np.testing.assert_allclose(_xla_flops(product("cg"), a, g, v), flops["cg"], rtol=1e-3)
  np.testing.assert_allclose(
    _xla_flops(product("cg_materialized"), a, g, v), flops["cg_materialized"], rtol=1e-3
  )
  # The solves add elementwise work the model leaves out: within a few percent.
  np.testing.assert_allclose(_xla_flops(solve("eigh"), a, g, v), flops["eigh"] - eig, rtol=0.05)
  np.testing.assert_allclose(
    _xla_flops(solve("lowrank"), a, g, v), flops["lowrank"] - eig_rows, rtol=0.05
  )


def test_cg_counts_one_product_per_iteration_plus_the_warm_start():
  one = _plan.solver_flops(100, 30, 20, cg_iters=0)
  four = _plan.solver_flops(100, 30, 20, cg_iters=3)
  assert four["cg"] == pytest.approx(4 * one["cg"])
  form = 2 * 100 * (30**2 + 20**2)
  assert four["cg_materialized"] - form == pytest.approx(4 * (one["cg_materialized"] - form))


def test_few_rows_and_wide_layers_go_matrix_free():
  # A vocabulary projection over all tokens: G (50257^2 floats) cannot be stored.
  params, stats = dense(16, (512,), 512, 50257)
  head = cgfac.plan({"head": params}, {"head": stats})["head"]
  assert head.rows == 8192 and head.d_a == 513 and head.d_g == 50257
  assert not head.fits["cg_materialized"] and not head.fits["eigh"]
  assert head.solver == "cg" and head.matrix_free
  # Few rows, wide layer: the exact low-rank solve costs about two and a half products.
  params, stats = dense(64, (), 2048, 2048)
  wide = cgfac.plan({"w": params}, {"w": stats})["w"]
  assert wide.solver == "lowrank" and wide.matrix_free
  assert wide.flops["lowrank"] < wide.flops["cg"] < wide.flops["cg_materialized"]


@pytest.mark.parametrize(
  "examples, positions, d_in, d_out",
  [(128, (8, 8), 9, 16), (128, (4, 4), 144, 32), (32, (256,), 64, 64)],
)
def test_many_rows_and_narrow_layers_go_materialized(examples, positions, d_in, d_out):
  params, stats = dense(examples, positions, d_in, d_out)
  lp = cgfac.plan({"l": params}, {"l": stats})["l"]
  assert lp.rows > 10 * max(lp.d_a, lp.d_g)
  assert lp.solver in ("cg_materialized", "eigh") and not lp.matrix_free


def test_memory_limit_decides_between_fitting_solvers():
  # Many rows, one wide side: fewest flops is matrix-free CG, but its rows x rows
  # middle matrix (16384^2 floats, 1 GiB) does not fit the default limit.
  params, stats = dense(16384, (), 127, 8192)
  unlimited = cgfac.plan({"l": params}, {"l": stats}, memory_limit=2**60)["l"]
  default = cgfac.plan({"l": params}, {"l": stats})["l"]
  assert unlimited.solver == "cg"
  assert default.memory_bytes["cg"] == 4 * (16384 * (128 + 8192) + 16384**2) > 2**30
  assert not default.fits["cg"] and default.solver == "cg_materialized"
  # Nothing fits: the least memory wins.
  none = cgfac.plan({"l": params}, {"l": stats}, memory_limit=1)["l"]
  assert not any(none.fits.values())
  assert none.solver == min(none.memory_bytes, key=none.memory_bytes.get)


def test_curvature_batch_size_and_dtype_enter_the_plan():
  params, stats = dense(256, (4,), 100, 50, bias=False)
  lp = cgfac.plan({"l": params}, {"l": stats}, curvature_batch_size=32)["l"]
  assert (lp.rows, lp.d_a, lp.d_g) == (128, 100, 50)
  params64 = {"kernel": shape(100, 50, dtype=jnp.float64)}
  lp64 = cgfac.plan({"l": params64}, {"l": stats}, curvature_batch_size=32)["l"]
  assert lp64.memory_bytes["cg"] == 2 * lp.memory_bytes["cg"]


def test_plan_prints_one_line_per_layer():
  layers = {"Conv_0": dense(128, (8, 8), 9, 16), "Dense_0": dense(128, (), 512, 10)}
  params = {k: v[0] for k, v in layers.items()}
  stats = {k: v[1] for k, v in layers.items()}
  p = cgfac.plan(params, stats)
  text = str(p)
  print(text)
  lines = text.splitlines()
  assert len(lines) == 3 and "solver" in lines[0]
  for line, (path, lp) in zip(lines[1:], p.items()):
    assert line.split()[:5] == [path, str(lp.rows), str(lp.d_a), str(lp.d_g), lp.solver]
  assert p.solvers() == {k: lp.solver for k, lp in p.items()}


def test_auto_runs_the_planned_solver_per_layer():
  """The transformation follows the plan: CG layers report iterations, direct ones do not."""
  kx, kg, kh = jax.random.split(jax.random.key(0), 3)
  # "wide": few rows, wide -> lowrank (direct); "tall": many rows, narrow -> materialized.
  x_w, g_w = jax.random.normal(kx, (4, 64)), jax.random.normal(kg, (4, 48))
  x_t, g_t = jax.random.normal(kh, (64, 8, 3)), jax.random.normal(kg, (64, 8, 2))
  params = {"wide": {"kernel": jnp.zeros((64, 48))}, "tall": {"kernel": jnp.zeros((3, 2))}}
  stats = {"wide": cgfac.DenseStats(x_w, g_w), "tall": cgfac.DenseStats(x_t, g_t)}
  grads = {
    "wide": {"kernel": x_w.T @ g_w / 4},
    "tall": {"kernel": jnp.einsum("btd,bte->de", x_t, g_t) / 64},
  }
  p = cgfac.plan(params, stats)
  assert p["wide"].solver == "lowrank" and p["tall"].solver == "cg_materialized"

  def run(solver):
    tx = cgfac.scale_by_cgfac(0.1, solver=solver, max_iters=20, tol=1e-10)
    return jax.jit(lambda g, s: tx.update(g, s, layer_stats=stats))(grads, tx.init(params))

  auto_updates, auto_state = run("auto")
  assert int(auto_state.iterations["wide"]) == 0
  assert int(auto_state.iterations["tall"]) > 0
  fixed_updates, fixed_state = run({"wide": "lowrank", "tall": "cg_materialized"})
  for path in p:
    np.testing.assert_array_equal(auto_updates[path]["kernel"], fixed_updates[path]["kernel"])
    assert auto_state.iterations[path] == fixed_state.iterations[path]
  # A dict overrides per layer; the layers it leaves out stay "auto".
  _, over = run({"wide": "cg"})
  assert int(over.iterations["wide"]) > 0 and int(over.iterations["tall"]) > 0


def test_solver_option_errors_name_the_value():
  with pytest.raises(ValueError, match="'bogus'"):
    cgfac.scale_by_cgfac(0.1, solver="bogus")
  with pytest.raises(ValueError, match="'lu'"):
    cgfac.scale_by_cgfac(0.1, solver={"a": "lu"})
  tx = cgfac.scale_by_cgfac(0.1, solver={"nope": "cg"})
  params = {"l": {"kernel": jnp.zeros((2, 2))}}
  stats = {"l": cgfac.DenseStats(jnp.ones((3, 2)), jnp.ones((3, 2)))}
  with pytest.raises(ValueError, match=r"\['nope'\]"):
    tx.update(params, tx.init(params), layer_stats=stats)
  with pytest.raises(ValueError, match="'other'"):
    cgfac.plan(params, {"other": stats["l"]})
