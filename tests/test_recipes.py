"""The recipes (docs/recipes.md): CG-FAC in optax's wrappers gives the updates it should.

Each composition is checked against the same computation done by hand: ``optax.partition`` with
:func:`cgfac_optax.select_stats` against each branch alone on its parameters, ``chain`` with
gradient clipping against CG-FAC on the clipped gradient, ``MultiSteps`` against CG-FAC on the
averaged gradient, ``apply_if_finite`` against skipping the bad step, ``inject_hyperparams``
against the plain optimizer with the same values, ``nnx.Optimizer(..., wrt=)`` against the
optax calls it stands for. :func:`cgfac_optax.state_scalars` is checked against the state's fields.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import cgfac_optax as cgfac

B = 16
SETTINGS = dict(learning_rate=0.1, damping=0.1, max_iters=5)


def _params(key=0):
  k = jax.random.split(jax.random.key(key), 5)
  return {
    "embed": {"embedding": jax.random.normal(k[0], (10, 4))},
    "dense": {"kernel": jax.random.normal(k[1], (4, 3)), "bias": jnp.zeros(3)},
    "out": {"kernel": jax.random.normal(k[2], (3, 2)), "bias": jnp.zeros(2)},
  }


def _grads_and_stats(key):
  k = jax.random.split(jax.random.key(key), 4)
  grads = jax.tree.map(
    lambda p, kk: jax.random.normal(kk, p.shape),
    _params(),
    jax.tree.unflatten(jax.tree.structure(_params()), list(jax.random.split(k[0], 5))),
  )
  stats = {
    "dense": cgfac.DenseStats(jax.random.normal(k[1], (B, 4)), jax.random.normal(k[2], (B, 3))),
    "out": cgfac.DenseStats(jax.random.normal(k[3], (B, 3)), jax.random.normal(k[1], (B, 2))),
  }
  return grads, stats


# One compiled reference update, shared by the tests of the wrappers.
PLAIN = cgfac.cgfac(**SETTINGS)
plain_update = jax.jit(PLAIN.update)

LABELS = {"embed": {"embedding": "adam"}, "dense": {"kernel": "cgfac", "bias": "cgfac"}}
LABELS["out"] = {"kernel": "adam", "bias": "adam"}


def _close(a, b, **kw):
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
    np.testing.assert_allclose(np.asarray(x), np.asarray(y), **kw)


# select_stats


def test_select_stats_keeps_the_labelled_layers_and_their_structure():
  _, stats = _grads_and_stats(1)
  selected = cgfac.select_stats(stats, LABELS, "cgfac")
  assert selected["dense"] is stats["dense"] and selected["out"] is None
  assert cgfac.select_stats(stats, LABELS, "adam")["dense"] is None
  mask = jax.tree.map(lambda label: label == "cgfac", LABELS)  # optax.masked's form
  assert cgfac.select_stats(stats, mask, True)["dense"] is stats["dense"]


def test_select_stats_of_a_function_selects_when_called():
  # The helpers give layer_stats as a function, called only on the steps that read the stats.
  _, stats = _grads_and_stats(1)
  calls = []
  selected = cgfac.select_stats(lambda: calls.append(1) or stats, LABELS, "cgfac")
  assert callable(selected) and not calls
  assert selected() == cgfac.select_stats(stats, LABELS, "cgfac") and calls == [1]


def test_select_stats_matches_nnx_state_paths():
  model = _NNXModel(nnx.Rngs(0))
  labels = jax.tree_util.tree_map_with_path(_nnx_label, nnx.state(model, nnx.Param))
  stats = {
    "hidden": cgfac.DenseStats(jnp.ones((B, 12)), jnp.ones((B, 8))),
    "out": cgfac.DenseStats(jnp.ones((B, 8)), jnp.ones((B, 3))),
  }
  selected = cgfac.select_stats(stats, labels, "cgfac")
  assert selected["hidden"] is stats["hidden"] and selected["out"] is stats["out"]
  assert cgfac.select_stats(stats, labels, "muon") == {"hidden": None, "out": None}


def test_select_stats_errors():
  _, stats = _grads_and_stats(1)
  with pytest.raises(ValueError, match="stats at 'out' but param_labels has no 'out/kernel'"):
    cgfac.select_stats(stats, {"dense": LABELS["dense"]}, "cgfac")
  with pytest.raises(TypeError, match=r"pass param_labels\(params\)"):
    cgfac.select_stats(stats, lambda params: LABELS, "cgfac")


# optax.partition


def _partition(other):
  return optax.partition({"cgfac": cgfac.cgfac(**SETTINGS), "other": other}, _other(LABELS))


def _other(labels):
  return jax.tree.map(lambda label: "other" if label == "adam" else label, labels)


def test_partition_updates_each_group_as_its_own_optimizer():
  other = optax.adam(1e-2)
  tx = _partition(other)
  params = _params()
  state = tx.init(params)
  update = jax.jit(tx.update)
  cg_alone = cgfac.cgfac(**SETTINGS)
  cg_params = {"dense": params["dense"]}
  cg_state, other_state = cg_alone.init(cg_params), other.init(params)
  cg_update, other_update = jax.jit(cg_alone.update), jax.jit(other.update)
  for step in range(2):
    grads, stats = _grads_and_stats(step)
    selected = cgfac.select_stats(stats, _other(LABELS), "cgfac")
    updates, state = update(grads, state, params, layer_stats=selected)
    want_cg, cg_state = cg_update(
      {"dense": grads["dense"]}, cg_state, cg_params, layer_stats={"dense": stats["dense"]}
    )
    want_other, other_state = other_update(grads, other_state, params)
    _close(updates["dense"], want_cg["dense"], rtol=1e-5, atol=1e-7)
    _close(updates["embed"], want_other["embed"], rtol=1e-6, atol=1e-8)
    _close(updates["out"], want_other["out"], rtol=1e-6, atol=1e-8)
    assert np.any(np.asarray(updates["dense"]["kernel"]) != 0)


def test_partition_without_select_stats_names_the_layer():
  tx = _partition(optax.adam(1e-2))
  params = _params()
  grads, stats = _grads_and_stats(0)
  with pytest.raises(ValueError, match="stats at 'out' but the gradients have no 'out/kernel'"):
    tx.update(grads, tx.init(params), params, layer_stats=stats)


# chain, MultiSteps, apply_if_finite, inject_hyperparams


def _dense_only(tree):
  return {k: tree[k] for k in ("dense", "out")}


def test_chain_with_clipping_is_cgfac_on_the_clipped_gradient():
  params = _dense_only(_params())
  grads, stats = _grads_and_stats(0)
  grads = jax.tree.map(lambda g: 10 * g, _dense_only(grads))  # the clip must act
  tx = optax.chain(optax.clip_by_global_norm(1.0), cgfac.cgfac(**SETTINGS))
  got, _ = jax.jit(tx.update)(grads, tx.init(params), params, layer_stats=stats)
  norm = optax.tree.norm(grads)
  assert norm > 1.0
  clipped = jax.tree.map(lambda g: g / norm, grads)
  want, _ = plain_update(clipped, PLAIN.init(params), params, layer_stats=stats)
  _close(got, want, rtol=1e-5, atol=1e-7)


def test_multisteps_solves_with_the_mean_gradient_and_the_last_stats():
  params = _dense_only(_params())
  (g1, _), (g2, s2) = _grads_and_stats(0), _grads_and_stats(1)
  g1, g2 = _dense_only(g1), _dense_only(g2)
  tx = optax.MultiSteps(cgfac.cgfac(**SETTINGS), every_k_schedule=2)
  update = jax.jit(tx.update)
  state = tx.init(params)
  first, state = update(g1, state, params, layer_stats=_grads_and_stats(0)[1])
  assert all(np.all(np.asarray(u) == 0) for u in jax.tree.leaves(first))
  second, state = update(g2, state, params, layer_stats=s2)
  mean = jax.tree.map(lambda a, b: (a + b) / 2, g1, g2)
  want, _ = plain_update(mean, PLAIN.init(params), params, layer_stats=s2)
  _close(second, want, rtol=1e-5, atol=1e-7)
  assert int(cgfac.state_scalars(state)["count"]) == 1


def test_apply_if_finite_skips_a_nan_step_and_counts_it():
  params = _dense_only(_params())
  grads, stats = _grads_and_stats(0)
  grads = _dense_only(grads)
  tx = optax.apply_if_finite(cgfac.cgfac(**SETTINGS), max_consecutive_errors=3)
  update = jax.jit(tx.update)
  state = tx.init(params)
  bad = jax.tree.map(lambda g: g.at[0].set(jnp.nan), grads)
  skipped, state = update(bad, state, params, layer_stats=stats)
  assert all(np.all(np.asarray(u) == 0) for u in jax.tree.leaves(skipped))
  scalars = cgfac.state_scalars(state)
  assert int(scalars["apply_if_finite/total_notfinite"]) == 1
  assert int(scalars["count"]) == 0  # the inner state is the one before the bad step
  got, state = update(grads, state, params, layer_stats=stats)
  want, _ = plain_update(grads, PLAIN.init(params), params, layer_stats=stats)
  _close(got, want, rtol=1e-5, atol=1e-7)
  assert int(cgfac.state_scalars(state)["apply_if_finite/notfinite_count"]) == 0


def test_inject_hyperparams_follows_the_values_in_the_state():
  params = _dense_only(_params())
  grads, stats = _grads_and_stats(0)
  grads = _dense_only(grads)
  # Built with other values; the ones in the state are those of PLAIN.
  tx = optax.inject_hyperparams(cgfac.cgfac)(**{**SETTINGS, "learning_rate": 0.5, "damping": 3.0})
  state = tx.init(params)
  state.hyperparams["learning_rate"] = jnp.asarray(SETTINGS["learning_rate"])
  state.hyperparams["damping"] = jnp.asarray(SETTINGS["damping"])
  got, state = jax.jit(tx.update)(grads, state, params, layer_stats=stats)
  want, _ = plain_update(grads, PLAIN.init(params), params, layer_stats=stats)
  _close(got, want, rtol=1e-5, atol=1e-7)
  scalars = cgfac.state_scalars(state)
  assert float(scalars["hyperparams/learning_rate"]) == pytest.approx(SETTINGS["learning_rate"])
  assert float(scalars["damping"]) == pytest.approx(SETTINGS["damping"])


# nnx.Optimizer(..., wrt=)


class _NNXModel(nnx.Module):
  def __init__(self, rngs):
    self.embed = nnx.Embed(10, 4, rngs=rngs)
    self.hidden = nnx.Linear(12, 8, rngs=rngs)
    self.norm = nnx.LayerNorm(8, rngs=rngs)
    self.out = nnx.Linear(8, 3, rngs=rngs)

  def __call__(self, tokens):
    x = self.embed(tokens).reshape(tokens.shape[0], -1)
    return self.out(jnp.tanh(self.norm(self.hidden(x))))


def _nnx_label(path, _):
  return "cgfac" if path[0].key in ("hidden", "out") else "muon"


def test_nnx_optimizer_with_partition_is_the_optax_update():
  from cgfac_optax import flax as cflax

  model = _NNXModel(nnx.Rngs(0))
  tokens = jax.random.randint(jax.random.key(1), (B, 3), 0, 10)
  y = jax.random.randint(jax.random.key(2), (B,), 0, 3)
  labels = jax.tree_util.tree_map_with_path(_nnx_label, nnx.state(model, nnx.Param))

  def make_tx():
    return optax.partition(
      {"cgfac": cgfac.cgfac(**SETTINGS), "muon": optax.contrib.muon(learning_rate=0.02)},
      lambda params: jax.tree_util.tree_map_with_path(_nnx_label, params),
    )

  pure = jax.tree.map(jnp.array, nnx.to_pure_dict(nnx.state(model, nnx.Param)))
  optimizer = nnx.Optimizer(model, make_tx(), wrt=nnx.Param)

  @nnx.jit
  def step(model, optimizer):
    _, grads, extra = cflax.nnx_value_grad_and_extra(model, tokens, y, jax.random.key(3))
    stats = extra["layer_stats"]()
    selected = cgfac.select_stats(stats, labels, "muon"), cgfac.select_stats(stats, labels, "cgfac")
    optimizer.update(model, grads, layer_stats=selected[1])
    return grads, selected

  grads, (none, selected) = step(model, optimizer)
  assert none == {"hidden": None, "out": None}
  assert set(selected) == {"hidden", "out"}
  # The same update through optax on plain dicts.
  pure_tx = make_tx()
  updates, _ = jax.jit(pure_tx.update)(
    nnx.to_pure_dict(grads), pure_tx.init(pure), pure, layer_stats=selected
  )
  want = optax.apply_updates(pure, updates)
  got = nnx.to_pure_dict(nnx.state(model, nnx.Param))
  _close(got, want, rtol=1e-5, atol=1e-6)
  assert not np.allclose(got["hidden"]["kernel"], pure["hidden"]["kernel"])
  assert not np.allclose(got["embed"]["embedding"], pure["embed"]["embedding"])


# state_scalars


def test_state_scalars_reads_the_state():
  params = _dense_only(_params())
  grads, stats = _grads_and_stats(0)
  _, state = plain_update(_dense_only(grads), PLAIN.init(params), params, layer_stats=stats)
  inner = state[0]
  scalars = jax.jit(cgfac.state_scalars)(state)  # it runs under jit
  assert set(scalars) == {
    "count",
    "damping",
    "clip",
    "skipped",
    "skipped_steps",
    "fallback_skipped",
    *(f"{kind}/{layer}" for kind in ("cg_iterations", "cg_residual", "skipped") for layer in stats),
  }
  assert int(scalars["count"]) == 1
  assert float(scalars["clip"]) == float(inner.control.clip)
  for layer in stats:
    assert int(scalars[f"cg_iterations/{layer}"]) == int(inner.iterations[layer]) > 0
    assert float(scalars[f"cg_residual/{layer}"]) == float(inner.residual[layer])
  assert int(scalars["skipped"]) == int(scalars["skipped_steps"]) == 0
  assert int(scalars["fallback_skipped"]) == int(inner.control.fallback_skipped)


def test_state_scalars_of_the_quadratic_model_and_of_several_states():
  params = _dense_only(_params())
  state = cgfac.cgfac().init(params)  # learning_rate=None: step size and momentum adapted
  scalars = cgfac.state_scalars(state)
  assert {"step_size", "momentum"} <= set(scalars)
  np.testing.assert_array_equal(
    [scalars["step_size"], scalars["momentum"]], np.asarray(state[0].coefficients)
  )
  assert float(scalars["damping"]) == pytest.approx(1e-2)  # cgfac()'s initial adaptive damping
  tx = optax.partition(
    {"a": cgfac.cgfac(**SETTINGS), "b": cgfac.cgfac(**SETTINGS)}, {"dense": "a", "out": "b"}
  )
  scalars = cgfac.state_scalars(tx.init(params))
  assert "cgfac0/cg_iterations/dense" in scalars and "cgfac1/cg_iterations/out" in scalars
  assert cgfac.state_scalars(optax.adam(1e-3).init(params)) == {}
