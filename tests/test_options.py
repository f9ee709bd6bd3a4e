"""What ``cgfac`` refuses at construction, what each mode's solvers need in memory, and the plan.

An option that would do nothing in the mode and with the solver chosen is refused, naming only
what was passed; a solver whose curvature memory exceeds ``memory_limit`` is refused before
anything is allocated; ``plan`` resolves the solvers with the rule the transformation applies.
"""

import pathlib
import re
import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import cgfac_optax as cgfac
from cgfac_optax._solvers import SOLVERS, sketch

sys.path.insert(0, str(pathlib.Path(__file__).parent))
import oracles  # noqa: E402


def shape(*s, dtype=jnp.float32):
  return jax.ShapeDtypeStruct(s, dtype)


# A vocabulary projection: 2 (d_A^2 + d_G^2) floats of "pcg" are 18.6 GiB; its sketches 13 MiB.
VOCAB_PARAMS = {"head": {"kernel": shape(512, 50000)}, "norm": {"scale": shape(512)}}
VOCAB_STATS = {"head": cgfac.DenseStats(shape(16, 512, 512), shape(16, 512, 50000))}


# Options that do nothing in the mode: refused, naming only what was passed.


@pytest.mark.parametrize(
  ("options", "message"),
  [
    (dict(momentum=0.5), "where momentum=0.5 does nothing: leave it unset"),
    (dict(nesterov=True), "where nesterov=True does nothing: leave it unset"),
    (dict(kl_clip=1e-2), "where kl_clip=0.01 does nothing: leave it unset"),
    (
      dict(momentum=None, kl_clip=None),
      "where momentum=None, kl_clip=None do nothing: leave them unset, or pass a learning_rate",
    ),
  ],
)
def test_adaptive_mode_names_only_the_fixed_rate_options_passed(options, message):
  with pytest.raises(ValueError, match=re.escape(message)) as info:
    cgfac.cgfac(**options)
  assert str(info.value).startswith("cgfac(learning_rate=None) takes the step size")
  for name in {"momentum", "nesterov", "kl_clip"} - set(options):
    assert f"{name}=" not in str(info.value)


def test_nesterov_without_momentum_is_refused():
  message = "nesterov=True does nothing without momentum (momentum=None): leave nesterov unset"
  with pytest.raises(ValueError, match=re.escape(message)):
    cgfac.cgfac(0.1, momentum=None, nesterov=True)
  cgfac.cgfac(0.1, momentum=0.5, nesterov=True)
  cgfac.cgfac(0.1, momentum=None, nesterov=False)


@pytest.mark.parametrize(
  ("options", "message"),
  [
    (
      dict(learning_rate=0.1, sketch_rank=8),
      "sketch_rank=8 does nothing with the default solver='auto': only ['sketch'] read it "
      "(they keep sketches of the factors); leave sketch_rank unset, or pass one of those solvers",
    ),
    (dict(solver="pcg", sketch_rank=8), "sketch_rank=8 does nothing with solver='pcg'"),
    (
      dict(learning_rate=0.1, solver="cg", refresh_every=5),
      "refresh_every=5 does nothing with solver='cg': only ['eigh', 'pcg', 'kfac_inverse'] read "
      "it (they refresh something computed from the factors on a schedule)",
    ),
    (
      dict(solver="pcg", preconditioner="jacobi"),
      "preconditioner='jacobi' does nothing with solver='pcg': only ['cg', 'cg_materialized'] "
      "read it (they run CG without a preconditioner of their own)",
    ),
    (dict(solver="eigh", preconditioner="jacobi"), "preconditioner='jacobi' does nothing"),
    (dict(preconditioner="jacobi"), "with the default solver='auto_memory'"),
    (
      dict(learning_rate=0.1, solver="lowrank", curvature_decay=0.9),
      "curvature_decay=0.9 does nothing with solver='lowrank': only ['cg_materialized', 'eigh', "
      "'pcg', 'kfac_inverse', 'sketch'] read it (they keep curvature memory)",
    ),
  ],
)
def test_options_the_named_solver_never_reads_are_refused(options, message):
  with pytest.raises(ValueError, match=re.escape(message)):
    cgfac.cgfac(**options)


def test_each_option_that_does_nothing_is_named_once():
  with pytest.raises(ValueError) as info:
    cgfac.cgfac(0.1, solver="cg", refresh_every=5, sketch_rank=8)
  message = str(info.value)
  assert message.count("refresh_every=5 does nothing") == 1
  assert message.count("sketch_rank=8 does nothing") == 1
  assert "preconditioner" not in message and "curvature_decay" not in message


@pytest.mark.parametrize(
  "options",
  [
    dict(solver="cg", curvature_decay=0.0),  # 0: no memory, which every solver honours
    dict(sketch_rank=8),  # "auto_memory" may choose "sketch"
    dict(learning_rate=0.1, solver="cg", preconditioner="jacobi"),
    dict(learning_rate=0.1, refresh_every=5),  # memory: "auto_memory", "pcg" refreshes
    dict(learning_rate=0.1, solver={"a": "sketch"}, sketch_rank=8),
    dict(solver="kfac_inverse", refresh_every=5),
  ],
)
def test_options_some_chosen_solver_reads_are_accepted(options):
  cgfac.cgfac(**options)


# Memory: each mode's default fits the limit; a named solver over it is refused.


def test_fixed_rate_default_is_auto_and_fits():
  params, grads, stats = oracles.dense_layer(0, 8, 6, (32,))
  tx = cgfac.cgfac(0.1, 1e-2)
  state = tx.init(params)
  assert state[0].curvature is None  # batch-only curvature: nothing kept
  plan = cgfac.plan(params, stats, learning_rate=0.1)
  want = cgfac.scale_by_cgfac(1e-2, solver=plan["dense"].solver, learning_rate=0.1, kl_clip=1e-3)
  got, _ = tx.update(grads, state, params, layer_stats=stats)
  ref, _ = want.update(grads, want.init(params), params, layer_stats=stats)
  np.testing.assert_allclose(got["dense"]["kernel"], -0.1 * ref["dense"]["kernel"], rtol=1e-6)


def test_adaptive_default_keeps_sketches_where_pcg_does_not_fit():
  state = jax.eval_shape(cgfac.cgfac().init, VOCAB_PARAMS)[0]
  memory = state.curvature["head"]
  assert isinstance(memory, sketch.SketchMemory)
  assert memory.g.q.shape == (50000, sketch.DEFAULT_RANK)
  assert cgfac.plan(VOCAB_PARAMS, VOCAB_STATS).solvers() == {"head": "sketch"}
  # A small layer keeps pcg's averaged factors; so does the head under a large enough limit.
  params = {"dense": {"kernel": jnp.zeros((3, 2)), "bias": jnp.zeros(2)}}
  assert cgfac.cgfac().init(params)[0].curvature["dense"].factors.a.shape == (4, 4)
  big = jax.eval_shape(cgfac.cgfac(memory_limit=2**36).init, VOCAB_PARAMS)[0]
  assert big.curvature["head"].factors.g.shape == (50000, 50000)


def test_a_named_solver_whose_memory_does_not_fit_is_refused_at_init():
  message = (
    "layer 'head': solver 'pcg' needs 20002097152 bytes (18.6 GiB) of curvature data "
    "(d_A 512, d_G 50000), over memory_limit=1073741824; pass solver={'head': 'sketch'} "
    "(the ones that fit: ['sketch']) or memory_limit >= 20002097152"
  )
  with pytest.raises(ValueError, match=re.escape(message)):
    jax.eval_shape(cgfac.cgfac(solver="pcg").init, VOCAB_PARAMS)


def test_a_named_solver_whose_memory_does_not_fit_is_refused_when_traced():
  tx = cgfac.cgfac(0.1, solver="cg", memory_limit=10**6)
  state = jax.eval_shape(tx.init, VOCAB_PARAMS)
  message = (
    "layer 'head': solver 'cg' needs 1923612672 bytes (1.79 GiB) of curvature data (8192 rows, "
    "d_A 512, d_G 50000), over memory_limit=1000000; pass a smaller curvature_batch_size or "
    "memory_limit >= 1923612672"
  )
  with pytest.raises(ValueError, match=re.escape(message)):
    jax.eval_shape(tx.update, VOCAB_PARAMS, state, VOCAB_PARAMS, layer_stats=VOCAB_STATS)
  # The default limit: "eigh" needs 18.6 GiB, and the message says what fits.
  tx = cgfac.cgfac(0.1, solver="eigh")
  with pytest.raises(ValueError, match=re.escape("pass solver={'head': 'sketch'}")):
    jax.eval_shape(tx.update, VOCAB_PARAMS, tx.init(VOCAB_PARAMS), layer_stats=VOCAB_STATS)


def test_auto_is_refused_when_no_solver_fits():
  tx = cgfac.scale_by_cgfac(0.1, solver="auto", memory_limit=100)
  params, grads, stats = oracles.dense_layer(0, 8, 6, (32,))
  message = (
    "layer 'dense': solver 'cg_materialized' (chosen by 'auto') needs 468 bytes of curvature "
    "data (32 rows, d_A 9, d_G 6), over memory_limit=100; pass memory_limit >= 468"
  )
  with pytest.raises(ValueError, match=re.escape(message)):
    tx.update(grads, tx.init(params), layer_stats=stats)
  plan = cgfac.plan(params, stats, learning_rate=0.1, memory_limit=100)["dense"]
  assert plan.solver == "cg_materialized" and not any(plan.fits.values())


@pytest.mark.parametrize(
  ("value", "message"),
  [
    (0, "memory_limit must be an int >= 1, got 0"),
    (1.5, "memory_limit must be an int >= 1, got 1.5"),
    (jnp.asarray(2**30), "static_args=('memory_limit',)"),
  ],
)
def test_memory_limit_is_validated(value, message):
  with pytest.raises(ValueError, match=re.escape(message)):
    cgfac.scale_by_cgfac(0.1, memory_limit=value)
  with pytest.raises(ValueError, match=re.escape(message)):
    cgfac.cgfac(memory_limit=value)


def test_memory_limit_under_inject_hyperparams():
  params, grads, stats = oracles.dense_layer(0, 8, 6, (32,))
  tx = optax.inject_hyperparams(cgfac.cgfac)(learning_rate=0.1)  # None: the planner's default
  tx.update(grads, tx.init(params), params, layer_stats=stats)
  with pytest.raises(ValueError, match=re.escape("static_args=('memory_limit',)")):
    optax.inject_hyperparams(cgfac.cgfac)(learning_rate=0.1, memory_limit=2**20).init(params)


# The plan: what cgfac() runs, and the parameters without stats.


def test_plan_follows_each_mode_of_cgfac():
  layers = {"Conv_0": ((128, 8, 8), 9, 16), "Dense_0": ((128,), 512, 10)}
  params = {k: {"kernel": shape(i, o), "bias": shape(o)} for k, (_, i, o) in layers.items()}
  stats = {
    k: cgfac.DenseStats(shape(*lead, i), shape(*lead, o)) for k, (lead, i, o) in layers.items()
  }
  adaptive = cgfac.plan(params, stats, weight_sharing="reduce")  # cgfac() on a pooled CNN
  assert adaptive.solvers() == {"Conv_0": "pcg", "Dense_0": "pcg"}
  assert adaptive["Conv_0"].rows == 128  # a layer's positions reduced to one row
  fixed = cgfac.plan(params, stats, learning_rate=0.1)
  assert fixed["Conv_0"].rows == 128 * 64  # cgfac(0.1) expands them, a row each
  assert set(fixed.solvers().values()) <= {k for k, s in SOLVERS.items() if s.exact}
  assert fixed["Conv_0"].option == "auto" and adaptive["Conv_0"].option == "auto_memory"
  # Options as cgfac takes them, with the same effect.
  assert cgfac.plan(params, stats, solver="sketch").solvers() == dict.fromkeys(layers, "sketch")
  memory = cgfac.plan(params, stats, learning_rate=0.1, curvature_decay=0.9)
  assert memory.solvers() == dict.fromkeys(layers, "pcg")
  with pytest.raises(ValueError, match="layer 'Conv_0' needs a named solver"):
    cgfac.plan(params, stats, solver="auto")  # as cgfac(solver="auto") refuses at init


def test_plan_runs_what_cgfac_runs():
  params, grads, stats = oracles.dense_layer(0, 8, 6, (32,))
  plan = cgfac.plan(params, stats, curvature_decay=0.0, refresh_every=1)
  assert plan["dense"].option == "auto"
  tx = cgfac.cgfac(curvature_decay=0.0, refresh_every=1)
  model = cgfac.CurvatureModel(
    lambda p: p["dense"]["kernel"].sum(0, keepdims=True), "squared_error"
  )
  _, state = tx.update(
    grads,
    tx.init(params),
    params,
    layer_stats=stats,
    curvature_model=model,
    value=1.0,
    value_fn=lambda p: 1.0,
  )
  iterative = SOLVERS[plan["dense"].solver].iterative
  assert (int(state[0].iterations["dense"]) > 0) == iterative


def test_plan_lists_the_parameters_that_take_the_fallback():
  plan = cgfac.plan(VOCAB_PARAMS, VOCAB_STATS, fallback="identity")
  assert plan.fallback == [("norm/scale", (512,), "identity")]
  assert plan["head"].memory == plan["head"].memory_bytes["sketch"]
  assert plan["head"].step_flops == plan["head"].flops["sketch"]
  lines = str(plan).splitlines()
  assert lines[-2:] == [
    "1 parameter(s) without stats take the fallback update:",
    "  norm/scale  (512,)           'identity'",
  ]
  assert repr(plan) == "Plan({'head': 'sketch'}, fallback=['norm/scale'])"
  assert cgfac.plan({"head": VOCAB_PARAMS["head"]}, VOCAB_STATS).fallback == []


# The defaults are markers: cgfac tells them from the same value passed.


def test_a_default_value_passed_explicitly_still_counts_as_passed():
  with pytest.raises(ValueError, match=re.escape("where momentum=0.9 does nothing")):
    cgfac.cgfac(momentum=0.9)
  with pytest.raises(ValueError, match=re.escape("where kl_clip=0.001 does nothing")):
    cgfac.cgfac(kl_clip=1e-3)


def test_inject_hyperparams_still_injects_the_marked_defaults():
  params, grads, stats = oracles.dense_layer(0, 8, 6, (32,))
  tx = optax.inject_hyperparams(cgfac.cgfac)(learning_rate=0.1)
  state = tx.init(params)
  assert {"momentum", "kl_clip"} <= set(state.hyperparams)
  update = jax.jit(lambda g, s: tx.update(g, s, params, layer_stats=stats))
  _, after = update(grads, state)
  types = lambda tree: jax.tree.map(jax.typeof, tree)
  assert types(after.hyperparams) == types(state.hyperparams)  # so the step compiles once
  update(grads, after)
  assert update._cache_size() == 1
