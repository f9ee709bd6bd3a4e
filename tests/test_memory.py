"""Curvature memory: running factor averages and refreshed eigenbases, against explicit sums.

The oracle keeps its own running average of the float64 factors of each batch's stats (the rule
``beta_t = min(beta, t / (t + 1))`` of ``cgfac_optax._memory``) and solves the damped system with
``kron(A, G) + gamma I`` (``tests/oracles.py``).
"""

import pathlib
import re
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import cgfac_optax as cgfac
from cgfac_optax import _memory
from cgfac_optax._solvers import SOLVERS

sys.path.insert(0, str(pathlib.Path(__file__).parent))
import oracles  # noqa: E402

FACTOR_SOLVERS = [name for name, s in SOLVERS.items() if s.curvature == "factors"]
EXACT_FACTOR_SOLVERS = [name for name in FACTOR_SOLVERS if SOLVERS[name].exact]
GAMMA = 0.05
DECAY = 0.8


def batch(t: int):
  """Step ``t``'s layer: different stats each step, so the average differs from any one batch."""
  return oracles.dense_layer(seed=100 + t, d_in=4, d_out=3, lead=(7,), dtype=np.float64)


def averaged_factors(steps: int, decay: float = DECAY):
  """The oracle's running averages after ``steps`` steps, and each step's averages on the way."""
  big_a = big_g = None
  history = []
  for t in range(steps):
    _, _, stats = batch(t)
    fa, fg = oracles.factors(stats["dense"].inputs, stats["dense"].output_grads, bias=True)
    beta = min(decay, t / (t + 1))
    big_a = fa if big_a is None else beta * big_a + (1 - beta) * fa
    big_g = fg if big_g is None else beta * big_g + (1 - beta) * fg
    history.append((big_a, big_g))
  return history


def run(solver: str, steps: int, **options):
  tx = cgfac.scale_by_cgfac(
    GAMMA, solver=solver, curvature_decay=DECAY, max_iters=200, tol=1e-13, **options
  )
  params = batch(0)[0]
  state = tx.init(params)
  update = jax.jit(tx.update)
  for t in range(steps):
    _, grads, stats = batch(t)
    updates, state = update(grads, state, params, layer_stats=stats)
  return updates, state, grads


@pytest.mark.usefixtures("x64")
@pytest.mark.parametrize("solver", FACTOR_SOLVERS)
def test_state_holds_the_explicit_running_average(solver):
  _, state, _ = run(solver, 5)
  big_a, big_g = averaged_factors(5)[-1]
  memory = state.curvature["dense"]
  np.testing.assert_allclose(memory.factors.a, big_a, rtol=1e-12, atol=1e-14)
  np.testing.assert_allclose(memory.factors.g, big_g, rtol=1e-12, atol=1e-14)


@pytest.mark.usefixtures("x64")
@pytest.mark.parametrize("solver", EXACT_FACTOR_SOLVERS)
def test_fresh_basis_solves_the_averaged_system(solver):
  updates, _, grads = run(solver, 4, refresh_every=1)
  big_a, big_g = averaged_factors(4)[-1]
  expected = oracles.kron_solve(big_a, big_g, GAMMA, oracles.as_matrix(grads["dense"]))
  np.testing.assert_allclose(oracles.as_matrix(updates["dense"]), expected, rtol=1e-9, atol=1e-11)


@pytest.mark.usefixtures("x64")
def test_eigh_between_refreshes_solves_with_the_factors_of_the_last_refresh():
  # refresh_every=4: refreshes at steps 0, 1, 2, then 4; step 3 (the 4th) uses step 2's factors.
  updates, state, grads = run("eigh", 4, refresh_every=4)
  stale_a, stale_g = averaged_factors(4)[2]
  expected = oracles.kron_solve(stale_a, stale_g, GAMMA, oracles.as_matrix(grads["dense"]))
  np.testing.assert_allclose(oracles.as_matrix(updates["dense"]), expected, rtol=1e-9, atol=1e-11)
  basis = state.curvature["dense"].refreshed
  np.testing.assert_allclose(
    basis.q_a @ np.diag(basis.l_a) @ basis.q_a.T, stale_a, rtol=1e-9, atol=1e-12
  )
  current_a, current_g = averaged_factors(4)[3]
  fresh = oracles.kron_solve(current_a, current_g, GAMMA, oracles.as_matrix(grads["dense"]))
  assert not np.allclose(expected, fresh, rtol=1e-6)  # the stale solve is really a different one


@pytest.mark.usefixtures("x64")
def test_pcg_with_stale_inverses_still_solves_the_current_system():
  updates, state, grads = run("pcg", 4, refresh_every=4)
  big_a, big_g = averaged_factors(4)[-1]
  expected = oracles.kron_solve(big_a, big_g, GAMMA, oracles.as_matrix(grads["dense"]))
  np.testing.assert_allclose(oracles.as_matrix(updates["dense"]), expected, rtol=1e-8, atol=1e-10)
  assert int(state.iterations["dense"]) >= 2  # the stale preconditioner is not exact


@pytest.mark.usefixtures("x64")
def test_pcg_refresh_holds_the_factored_damping_inverses():
  _, state, _ = run("pcg", 3, refresh_every=1)
  big_a, big_g = averaged_factors(3)[-1]
  pi = np.sqrt((np.trace(big_a) / big_a.shape[0]) / (np.trace(big_g) / big_g.shape[0]))
  root = np.sqrt(GAMMA)
  inverses = state.curvature["dense"].refreshed
  expected_a = np.linalg.inv(big_a + pi * root * np.eye(big_a.shape[0]))
  expected_g = np.linalg.inv(big_g + root / pi * np.eye(big_g.shape[0]))
  np.testing.assert_allclose(inverses.a, expected_a, rtol=1e-9, atol=1e-12)
  np.testing.assert_allclose(inverses.g, expected_g, rtol=1e-9, atol=1e-12)


def test_refresh_schedule():
  due = [bool(_memory.refresh_due(jnp.asarray(t), 10)) for t in range(45)]
  expected = [t in (0, 1, 2, 4, 8, 10, 20, 30, 40) for t in range(45)]
  assert due == expected
  assert all(bool(_memory.refresh_due(jnp.asarray(t), 1)) for t in range(5))


def test_memory_state_is_stable_and_compiles_once():
  tx = cgfac.scale_by_cgfac(GAMMA, solver="pcg", curvature_decay=DECAY, refresh_every=3)
  params, grads, stats = oracles.dense_layer(d_in=4, d_out=3, lead=(7,))
  state = tx.init(params)
  update = jax.jit(tx.update)
  avals = lambda tree: jax.tree.map(lambda x: jax.typeof(x), tree)
  first = avals(state)
  for _ in range(4):
    _, state = update(grads, state, params, layer_stats=stats)
  assert avals(state) == first
  assert update._cache_size() == 1
  memory = state.curvature["dense"]
  assert memory.factors.a.shape == (5, 5) and memory.factors.g.shape == (3, 3)
  assert memory.refreshed.a.shape == (5, 5) and memory.refreshed.g.shape == (3, 3)


def test_batch_only_solvers_keep_no_memory():
  tx = cgfac.scale_by_cgfac(GAMMA, solver={"a": "cg", "b": "eigh"}, curvature_decay=DECAY)
  params = {
    "a": {"kernel": jnp.zeros((3, 2))},
    "b": {"kernel": jnp.zeros((2, 2)), "bias": jnp.zeros(2)},
  }
  state = tx.init(params)
  assert set(state.curvature) == {"b"}
  assert state.curvature["b"].factors.a.shape == (3, 3)
  assert cgfac.scale_by_cgfac(GAMMA, solver="eigh").init(params).curvature is None


@pytest.mark.parametrize(
  ("kwargs", "message"),
  [
    ({"curvature_decay": 1.0, "solver": "eigh"}, "curvature_decay must be in [0, 1), got 1.0"),
    ({"curvature_decay": -0.1, "solver": "eigh"}, "curvature_decay must be in [0, 1), got -0.1"),
    ({"refresh_every": 0, "solver": "eigh"}, "refresh_every must be an int >= 1, got 0"),
  ],
)
def test_memory_options_are_validated(kwargs, message):
  with pytest.raises(ValueError, match=re.escape(message)):
    cgfac.scale_by_cgfac(GAMMA, **kwargs)


def test_auto_solver_with_memory_names_the_layer():
  tx = cgfac.scale_by_cgfac(GAMMA, solver="auto", curvature_decay=DECAY)
  with pytest.raises(ValueError, match="layer 'dense' needs a named solver"):
    tx.init({"dense": {"kernel": jnp.zeros((3, 2))}})


def test_stats_that_do_not_fit_the_memory_name_the_layer():
  # A kernel whose outputs are not on its last axis: the memory sized at init cannot hold it.
  tx = cgfac.scale_by_cgfac(GAMMA, solver="eigh", curvature_decay=DECAY)
  params = {"dense": {"kernel": jnp.zeros((2, 3, 4))}}
  state = tx.init(params)
  stats = {"dense": cgfac.DenseStats(jnp.ones((5, 2)), jnp.ones((5, 12)))}
  with pytest.raises(ValueError, match="layer 'dense': curvature memory holds factors of widths 6"):
    tx.update({"dense": {"kernel": jnp.ones((2, 3, 4))}}, state, params, layer_stats=stats)
