"""Solver "auto": the cost model, the choice per layer, and the printed plan."""

import pathlib
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import cgfac_optax as cgfac
from cgfac_optax._layers import CurvatureRows, LayerShape
from cgfac_optax._solvers import SOLVERS, _base

sys.path.insert(0, str(pathlib.Path(__file__).parent))
import oracles  # noqa: E402

# The plans of cgfac(LR): its default solver, "auto", is what these tests are about.
LR = 0.1


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


# The model's count of each matrix decomposition, by the jaxpr primitive that runs it: a symmetric
# eigendecomposition with vectors is EIGH_FLOPS k^3, an inverse by LU (with its triangular
# solves, which count nothing more) 2 k^3.
DECOMPOSITION_FLOPS = {"eigh": _base.eig_flops, "lu": lambda k: 2.0 * k**3}


def _decomposition_flops(fn, *shapes):
  """The model's count of the decompositions ``fn`` runs, read from its jaxpr.

  XLA's cost analysis leaves them out (LAPACK calls on CPU), so they are found and counted
  here with the model's convention (``DECOMPOSITION_FLOPS``).
  """

  def walk(jaxpr):
    total = 0.0
    for eqn in jaxpr.eqns:
      if eqn.primitive.name in DECOMPOSITION_FLOPS:
        total += DECOMPOSITION_FLOPS[eqn.primitive.name](eqn.invars[0].aval.shape[-1])
      for param in eqn.params.values():
        for sub in param if isinstance(param, (tuple, list)) else (param,):
          inner = getattr(sub, "jaxpr", sub)
          if hasattr(inner, "eqns"):
            total += walk(inner)
    return total

  return walk(jax.make_jaxpr(fn)(*[jnp.ones(s) for s in shapes]).jaxpr)


def _one_step(method):
  """What the model counts at ``cg_iters=0``: prepare, then one operator application (and one
  of the solver's own preconditioner) for an iterative solver, or the solve for a direct one."""

  def step(a, g, v):
    data = oracles.prepare(method, CurvatureRows(a, g, 1.0, 1.0), 0.1)
    if not method.iterative:
      return method.solve(data, v)
    if method.preconditioner is None:
      return method.operator(data, v)
    return method.operator(data, v), method.preconditioner(data, v)

  return step


@pytest.mark.parametrize("solver", list(SOLVERS))
@pytest.mark.parametrize("rows, d_a, d_g", [(64, 40, 300), (200, 30, 20)])
def test_flop_counts_match_xla_cost_analysis(solver, rows, d_a, d_g):
  """Matmul flops of each solver (decompositions aside) as XLA counts them."""
  shapes = (rows, d_a), (rows, d_g), (d_a, d_g)
  method = SOLVERS[solver]
  model = method.flops(LayerShape(rows, d_a, d_g), 0, 1)  # one product
  xla = _xla_flops(_one_step(method), *shapes)
  eig = _decomposition_flops(_one_step(method), *shapes)
  # The probe finds the eigendecompositions the model counts for the solvers that have them.
  expected_eig = {
    "eigh": _base.EIGH_FLOPS * (d_a**3 + d_g**3),
    "lowrank": 2 * _base.EIGH_FLOPS * rows**3,
    "cg": 0.0,
    "cg_materialized": 0.0,
  }
  if solver in expected_eig:
    assert eig == expected_eig[solver]
  if eig == 0 and method.iterative:
    # Matmuls only. The operator is F V + damping V: a multiply and an add per entry of V,
    # which the model leaves out.
    np.testing.assert_allclose(xla - 2 * d_a * d_g, model, rtol=1e-3)
  else:
    # The solves add elementwise work the model leaves out: within a few percent.
    np.testing.assert_allclose(xla, model - eig, rtol=0.05)


def test_cg_counts_one_product_per_iteration_plus_the_warm_start():
  shape = LayerShape(100, 30, 20)
  one = {k: s.flops(shape, 0, 1) for k, s in SOLVERS.items()}
  four = {k: s.flops(shape, 3, 1) for k, s in SOLVERS.items()}
  assert four["cg"] == pytest.approx(4 * one["cg"])
  form = 2 * 100 * (30**2 + 20**2)
  assert four["cg_materialized"] - form == pytest.approx(4 * (one["cg_materialized"] - form))
  # Every solver: iterative ones cost a fixed part plus the same amount per iteration, the
  # direct ones do not depend on the iterations.
  for name, s in SOLVERS.items():
    per_iteration = s.flops(shape, 1, 1) - one[name]
    if s.iterative:
      assert 0 < per_iteration <= one[name], name
      assert four[name] - one[name] == pytest.approx(3 * per_iteration), name
    else:
      assert per_iteration == 0 and four[name] == one[name], name


def test_few_rows_and_wide_layers_go_matrix_free():
  # A vocabulary projection over all tokens: G (50257^2 floats) cannot be stored.
  params, stats = dense(16, (512,), 512, 50257)
  head = cgfac.plan({"head": params}, {"head": stats}, learning_rate=LR)["head"]
  assert head.rows == 8192 and head.d_a == 513 and head.d_g == 50257
  assert not head.fits["cg_materialized"] and not head.fits["eigh"]
  assert head.solver == "cg" and head.matrix_free
  # Few rows, wide layer: the exact low-rank solve costs about two and a half products.
  params, stats = dense(64, (), 2048, 2048)
  wide = cgfac.plan({"w": params}, {"w": stats}, learning_rate=LR)["w"]
  assert wide.solver == "lowrank" and wide.matrix_free
  assert wide.flops["lowrank"] < wide.flops["cg"] < wide.flops["cg_materialized"]


@pytest.mark.parametrize(
  "examples, positions, d_in, d_out",
  [(128, (8, 8), 9, 16), (128, (4, 4), 144, 32), (32, (256,), 64, 64)],
)
def test_many_rows_and_narrow_layers_go_materialized(examples, positions, d_in, d_out):
  params, stats = dense(examples, positions, d_in, d_out)
  lp = cgfac.plan({"l": params}, {"l": stats}, learning_rate=LR)["l"]
  assert lp.rows > 10 * max(lp.d_a, lp.d_g)
  assert lp.solver in ("cg_materialized", "eigh") and not lp.matrix_free


def test_memory_limit_decides_between_fitting_solvers():
  # Many rows, one wide side: fewest flops is matrix-free CG, but its rows x rows
  # middle matrix (16384^2 floats, 1 GiB) does not fit the default limit.
  params, stats = dense(16384, (), 127, 8192)
  unlimited = cgfac.plan({"l": params}, {"l": stats}, learning_rate=LR, memory_limit=2**60)["l"]
  default = cgfac.plan({"l": params}, {"l": stats}, learning_rate=LR)["l"]
  assert unlimited.solver == "cg"
  assert default.memory_bytes["cg"] == 4 * (16384 * (128 + 8192) + 16384**2) > 2**30
  assert not default.fits["cg"] and default.solver == "cg_materialized"
  # Nothing fits: the least memory wins.
  none = cgfac.plan({"l": params}, {"l": stats}, learning_rate=LR, memory_limit=1)["l"]
  assert not any(none.fits.values())
  exact = {k: v for k, v in none.memory_bytes.items() if SOLVERS[k].exact}
  assert none.solver == min(exact, key=exact.get)


def test_curvature_batch_size_and_dtype_enter_the_plan():
  params, stats = dense(256, (4,), 100, 50, bias=False)
  reduce = {"curvature_batch_size": 32, "weight_sharing": "reduce"}
  lp = cgfac.plan({"l": params}, {"l": stats}, **reduce)["l"]
  assert (lp.rows, lp.d_a, lp.d_g) == (32, 100, 50)  # a row per example
  expand = {"curvature_batch_size": 32, "weight_sharing": "expand"}
  assert cgfac.plan({"l": params}, {"l": stats}, **expand)["l"].rows == 32 * 4
  params64 = {"kernel": shape(100, 50, dtype=jnp.float64)}
  lp64 = cgfac.plan({"l": params64}, {"l": stats}, **reduce)["l"]
  assert lp64.memory_bytes["cg"] == 2 * lp.memory_bytes["cg"]


def test_plan_prints_one_line_per_layer():
  layers = {"Conv_0": dense(128, (8, 8), 9, 16), "Dense_0": dense(128, (), 512, 10)}
  params = {k: v[0] for k, v in layers.items()}
  stats = {k: v[1] for k, v in layers.items()}
  p = cgfac.plan(params, stats)
  text = str(p)
  print(text)
  lines = text.splitlines()
  # The layers, then how the conv's positions were counted: cgfac()'s "auto" without the
  # curvature model it chooses from counts "expand"'s rows.
  assert len(lines) == 5 and "solver" in lines[0] and not lines[3]
  assert lines[4].startswith("weight_sharing: auto (rows counted as 'expand'")
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
  p = cgfac.plan(params, stats, learning_rate=LR)
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
