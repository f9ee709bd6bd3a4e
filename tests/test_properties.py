"""Property tests of the solves on random problems (hypothesis).

Every example is one dense layer with ``d_in`` in 1..4 inputs (plus, at random, the
homogeneous coordinate of a bias), ``d_out`` in 1..4 outputs and 1 to ``3 x width`` rows, a
damping in ``[1e-8, 1e2]`` and scales of inputs, output gradients and gradient over many decades.
To compile each solver once, every example is embedded in fixed ``15 x 5`` / ``15 x 4`` arrays
by zero padding: padded rows and columns add exact zeros to ``A``, ``G`` and the gradient, so the
padded system is block diagonal with the example's system as one block and ``gamma x = 0`` as the
other, and every solver returns the example's solution there (the bias is an explicit column of
ones on the real rows; the normalisation is ``1 / 15``, a rescaling of the example's data).

The examples are derandomized (the same 200 every run); a failure prints the reproducing blob.
"""

import functools
import pathlib
import sys

import jax
import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

import cgfac_optax as cgfac
from cgfac_optax._solvers import SOLVERS

sys.path.insert(0, str(pathlib.Path(__file__).parent))
import oracles  # noqa: E402

ROWS, D_A, D_G = 15, 5, 4
EPS = float(np.finfo(np.float32).eps)
SETTINGS = settings(
  max_examples=200, deadline=None, derandomize=True, print_blob=True, database=None
)


@st.composite
def problems(draw):
  d_in = draw(st.integers(1, 4))
  bias = draw(st.booleans())
  d_out = draw(st.integers(1, 4))
  rows = draw(st.integers(1, 3 * max(d_in + bias, d_out)))
  rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
  scale_a = 10.0 ** draw(st.floats(-3, 3))
  scale_g = 10.0 ** draw(st.floats(-3, 3))
  a = np.zeros((ROWS, D_A), np.float32)
  g = np.zeros((ROWS, D_G), np.float32)
  a[:rows, :d_in] = rng.normal(size=(rows, d_in)) * scale_a
  if bias:
    a[:rows, d_in] = 1.0
  g[:rows, :d_out] = rng.normal(size=(rows, d_out)) * scale_g
  grad_scale = 10.0 ** draw(st.floats(-20, 20))
  if draw(st.booleans()):  # the batch gradient: in the range of F
    b = a.astype(np.float64).T @ g.astype(np.float64) / ROWS
    b = b / max(np.abs(b).max(), 1e-300)
  else:  # any gradient
    b = np.zeros((D_A, D_G))
    b[: d_in + bias, :d_out] = rng.normal(size=(d_in + bias, d_out))
  b = (b * grad_scale).astype(np.float32)
  damping = np.float32(10.0 ** draw(st.floats(-8, 2)))
  return a, g, b, damping


@functools.cache
def solve_fn(solver, preconditioner=None, kl_clip=False):
  """A jitted single step of ``scale_by_cgfac`` taking the damping and clip bound as arrays."""
  params = {"dense": {"kernel": np.zeros((D_A, D_G), np.float32)}}

  def step(a, g, b, damping, bound):
    options = {"learning_rate": 1.0, "kl_clip": bound} if kl_clip else {}
    tx = cgfac.scale_by_cgfac(
      damping,
      solver=solver,
      preconditioner=preconditioner,
      warm_start=False,
      max_iters=8,
      tol=1e-4,
      **options,
    )
    stats = {"dense": cgfac.DenseStats(a, g)}
    updates, state = tx.update({"dense": {"kernel": b}}, tx.init(params), layer_stats=stats)
    return updates["dense"]["kernel"], state

  return jax.jit(step)


def explicit(a, g, damping):
  """``F + gamma I`` in float64, and its condition number."""
  big_a, big_g = oracles.factors(a, g, bias=False)  # ROWS rows, ROWS examples: both / ROWS
  fisher = oracles.kron_matrix(big_a, big_g)
  top = np.linalg.eigvalsh(fisher)[-1]
  return oracles.kron_matrix(big_a, big_g, damping), (max(top, 0) + damping) / damping


def gram_condition(x):
  """Largest over smallest eigenvalue of ``x x^T`` that the low-rank solve keeps (float32)."""
  s = np.linalg.eigvalsh((x @ x.T).astype(np.float32))
  kept = s[s > EPS * x.shape[0] * np.abs(s).max()]
  return kept.max() / kept.min() if kept.size else 1.0


def finite(tree):
  return all(np.all(np.isfinite(np.asarray(x))) for x in jax.tree.leaves(tree))


@SETTINGS
@given(problems())
def test_solves_are_finite_and_the_exact_ones_agree(problem):
  a, g, b, damping = problem
  _, cond = explicit(a, g, damping)
  xs = {}
  for solver in SOLVERS:
    x, state = solve_fn(solver)(a, g, b, damping, 0.0)
    assert finite((x, state)), solver
    assert int(state.control.skipped["dense"]) == 0, solver
    xs[solver] = np.asarray(x, np.float64)
  # eigh's forward error is ~ eps x the condition number of F + gamma I. The low-rank solve
  # builds its bases from the Gram matrices a a^T and g g^T, which square the singular values:
  # its error also grows with their condition number (largest over smallest kept eigenvalue).
  reference = oracles.kron_solve(*oracles.factors(a, g, bias=False), damping, b)
  scale = np.linalg.norm(reference)
  eigh_bound = 50 * EPS * cond * scale
  lowrank_bound = 30 * EPS * cond * max(gram_condition(a), gram_condition(g)) * scale
  assert np.linalg.norm(xs["eigh"] - reference) <= eigh_bound
  assert np.linalg.norm(xs["lowrank"] - reference) <= lowrank_bound
  assert np.linalg.norm(xs["lowrank"] - xs["eigh"]) <= eigh_bound + lowrank_bound


@SETTINGS
@given(problems(), st.sampled_from([None, "jacobi"]))
def test_cg_reports_its_residual_truthfully(problem, preconditioner):
  a, g, b, damping = problem
  damped, cond = explicit(a, g, damping)
  x, state = solve_fn("cg", preconditioner)(a, g, b, damping, 0.0)
  b64 = b.astype(np.float64).ravel()
  norm_b = np.linalg.norm(b64)
  true = 0.0 if norm_b == 0 else np.linalg.norm(b64 - damped @ np.asarray(x, np.float64).ravel())
  true = true / norm_b if norm_b else 0.0
  reported = float(state.residual["dense"])
  # The recurrence drifts from the true residual by about eps x iterations x condition number.
  assert abs(reported - true) <= 1e-5 + 10 * EPS * 8 * cond * max(1.0, true), (reported, true)
  assert int(state.iterations["dense"]) <= 8


@SETTINGS
@given(problems(), st.floats(-6, 0), st.sampled_from(["eigh", "cg"]))
def test_kl_clip_bounds_the_fisher_norm_of_the_step(problem, log_bound, solver):
  a, g, b, damping = problem
  bound = np.float32(10.0**log_bound)
  damped, cond = explicit(a, g, damping)
  x, state = solve_fn(solver, kl_clip=True)(a, g, b, damping, bound)
  assert finite((x, state))
  x = np.asarray(x, np.float64).ravel()
  fisher = damped - float(damping) * np.eye(x.size)
  # Exact for the direct solver and for CG from zero (Galerkin), up to rounding.
  assert x @ fisher @ x <= bound * (1 + 1e-3 + 50 * EPS * cond)
  clip = float(state.control.clip)
  assert 0 < clip <= 1 or not np.any(b)
