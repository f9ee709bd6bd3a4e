"""The benchmark scripts run end to end with `--tiny`, and their helpers are right.

Timings are never asserted: these tests keep the scripts working and check the
numbers they are built on (curvature statistics, convolution patches) against
independent references.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cgfac_optax._solvers import SOLVERS

ROOT = Path(__file__).resolve().parent.parent
BENCH = ROOT / "benchmarks"
sys.path.insert(0, str(BENCH))

import _common as C  # noqa: E402
import vs_kfac_jax  # noqa: E402


def _x64():
  if hasattr(jax, "enable_x64"):
    return jax.enable_x64(True)
  from jax.experimental import enable_x64  # jax < 0.8

  return enable_x64()


def script_env() -> dict:
  """The environment of a benchmark script: this checkout first (conftest's XLA flags and
  compilation cache come with the rest)."""
  env = dict(os.environ)
  env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")])
  return env


def run_script(name: str, out: Path, *extra: str) -> dict:
  proc = subprocess.run(
    [sys.executable, str(BENCH / name), "--tiny", "--out", str(out), *extra],
    capture_output=True,
    text=True,
    env=script_env(),
    timeout=900,
    check=False,
  )
  assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
  assert "device" in proc.stdout and "jax" in proc.stdout
  stem = name.removesuffix(".py")
  assert (out / f"{stem}.png").stat().st_size > 0
  return json.loads((out / f"{stem}.json").read_text())


@pytest.mark.slow
def test_step_cost_tiny(tmp_path):
  res = run_script("step_cost.py", tmp_path)
  step = res["step"]["16"]
  assert step["adam"]["ratio_to_adam"] == pytest.approx(1.0)
  assert {"sgd_momentum", "kfac_eigh", "cg", "cg_materialized", "lowrank"} <= set(step)
  assert step["adam"]["state_bytes_per_param_byte"] == pytest.approx(2.0, abs=0.01)
  assert all(np.isfinite(r["step_s"]) and r["step_s"] > 0 for r in step.values())
  assert 0 < step["cg"]["cg_iterations"] <= 10
  assert {"adam", "cg", "lowrank", "kfac_eigh"} <= set(res["update"]["16"])
  assert "### Training step" in res["tables"][0]


@pytest.mark.slow
def test_step_breakdown_tiny(tmp_path):
  res = run_script("step_breakdown.py", tmp_path)
  steps = res["steps"]
  assert set(steps) == {"adam", "cgfac", "direct", "fixed_rate"}
  assert steps["adam"]["ratio_to_adam"] == pytest.approx(1.0)
  for name, r in steps.items():
    assert r["step_s"] > 0 and np.isfinite(r["last_training_loss"]), name
  assert res["variants"]["direct"]["settings"]["solver"] == "kfac_inverse"
  # Without the quadratic model, everything else is cgfac()'s default.
  fixed = res["variants"]["fixed_rate"]["settings"]
  assert fixed["solver"] == "auto_memory" and fixed["max_iters"] == 1
  assert fixed["learning_rate"] == 1e-3
  assert all(res["parts"][k]["call_s"] > 0 for k in ("forward", "gram_of_two"))
  assert "CG iteration (cgfac - direct)" in res["table"]
  # XLA's flop count against the forward pass's matrix products counted by hand (the tiny
  # autoencoder, 64 -> 32 -> 16 -> 4 -> 16 -> 32 -> 64, batch 64): the rest (biases, tanh, the
  # loss) adds a few percent, not a second pass.
  sizes = (64, 32, 16, 4, 16, 32, 64)
  matmuls = 2 * 64 * sum(i * o for i, o in zip(sizes[:-1], sizes[1:])) / 1e9
  assert matmuls <= res["parts"]["forward"]["gflop"] < 1.5 * matmuls
  # Two directions' Jacobian products cost more than the forward they linearize.
  assert res["parts"]["gram_of_two"]["gflop"] > 2 * matmuls
  gflop = {name: r["gflop"] for name, r in steps.items()}
  assert gflop["adam"] > 2.5 * matmuls  # forward and backward (no gradient for the inputs)
  assert gflop["cgfac"] > gflop["direct"] > gflop["adam"]


@pytest.mark.parametrize(
  "losses, diverged, evaluated",
  [
    ([3.0, 2.0, 1.0], False, 3),
    ([3.0, 7.0, 1.0], False, 3),  # above the start on the way, below it at the end
    ([3.0, 2.0, float("nan")], True, 3),
    ([3.0, float("nan"), 1.0], True, 2),  # a non-finite evaluation stops the run
    ([3.0, 2.0, 5e31], True, 3),  # ends above its start
  ],
)
def test_train_for_marks_a_run_diverged_at_a_non_finite_loss_or_an_end_above_its_start(
  losses, diverged, evaluated, monkeypatch
):
  import itertools

  import _timed

  # Each step moves the model to the next loss and, on a clock that reads 0, 1, 2, ..., takes 1 s;
  # with a budget of one second a step and as many evaluations, every step is evaluated.
  ticks = itertools.count()
  monkeypatch.setattr(_timed.time, "perf_counter", lambda: float(next(ticks)))
  step = lambda carry, batch, i: (carry + 1, jnp.float32(0.0))
  evaluate = lambda carry: {"loss": losses[carry]}
  n = len(losses) - 1
  out = _timed.train_for(step, 0, iter(range(100)), evaluate, float(n), n, max_steps=100)
  assert out["diverged"] is diverged
  assert out["curve"]["loss"] == pytest.approx(losses[:evaluated], nan_ok=True)
  assert out["curve"]["steps"] == list(range(evaluated))


def _check_run(run: dict, budget: float):
  c = run["curve"]
  assert run["steps"] > 0 and not run["diverged"]
  assert all(np.isfinite(c["loss"])), c["loss"]
  assert c["loss"][-1] < c["loss"][0], f"the loss did not decrease: {c['loss']}"
  assert c["steps"][0] == 0 and c["steps"][-1] == run["steps"]
  assert c["steps"] == sorted(c["steps"]) and c["time"] == sorted(c["time"])
  assert budget <= run["wall_s"] == pytest.approx(c["time"][-1])
  assert run["step_s_mean"] == pytest.approx(run["wall_s"] / run["steps"])


@pytest.mark.slow
def test_time_to_target_tiny(tmp_path):
  # The autoencoder task runs in the --tune test below and in the GPU script's, without CG-FAC.
  tasks = ("cnn-mnist",)
  res = run_script("time_to_target.py", tmp_path, "--tasks", *tasks)
  budget = res["settings"]["budget"]
  expected = {"adam", "muon", "cgfac"}
  if vs_kfac_jax.venv_ready(vs_kfac_jax.VENV):
    expected.add("kfac_jax")
  env = res["environment"]
  assert len(env["load_average_start"]) == 3 and len(env["load_average_end"]) == 3
  assert {"cpu", "jax", "optax", "cgfac_optax"} <= set(env)
  for task in tasks:
    t = res["tasks"][task]
    model = task.split("-")[0]
    assert set(t["optimizers"]) == expected == set(t["summary"])
    for name, o in t["optimizers"].items():
      assert o["source"] == "registry" and o["settings"] == res["registry"][name][model]
      (run,) = o["runs"]
      _check_run(run, budget)
      if model == "cnn":
        assert all(0.0 <= a <= 1.0 for a in run["curve"]["accuracy"])
        assert t["summary"][name]["best_accuracy_median"] == max(run["curve"]["accuracy"])
        for peer, r in t["summary"][name]["reaches_accuracy"].items():
          target = t["summary"][peer]["best_accuracy_median"]
          (seed,) = r["per_seed"]
          hits = [s for s, a in zip(run["curve"]["steps"], run["curve"]["accuracy"]) if a >= target]
          assert r["target"] == target and seed["steps"] == (hits[0] if hits else None)
      s = t["summary"][name]
      assert s["best_loss_median"] == pytest.approx(min(run["curve"]["loss"]))
      assert s["step_ms_mean"] > 0 and s["steps_median"] == run["steps"]
      assert set(s["reaches"]) == expected - {name}
      for peer, r in s["reaches"].items():
        assert r["target"] == pytest.approx(t["summary"][peer]["best_loss_median"])
        (seed,) = r["per_seed"]
        assert r["reached"] == (seed["time_s"] is not None)
        if seed["time_s"] is None:
          assert r["budget_ratio_median"] is None and min(run["curve"]["loss"]) > r["target"]
        else:
          assert r["budget_ratio_median"] == seed["budget_ratio"] == seed["time_s"] / budget
          assert 0 < seed["budget_ratio"] <= run["wall_s"] / budget
    assert len(t["pairs"]) == len(expected) * (len(expected) - 1)
    cnn = model == "cnn"
    assert len(t["accuracy_pairs"]) == (len(t["pairs"]) if cnn else 0)
    assert (t["accuracy_table"] is not None) == cnn
    assert t["table"].count("\n") == len(expected) + 1


@pytest.mark.slow
def test_time_to_target_tune_tiny(tmp_path):
  res = run_script(
    "time_to_target.py",
    tmp_path,
    # The tuning logic is the same for every optimizer: CG-FAC's settings are checked to build
    # by test_every_tuning_setting_of_cgfac_builds_its_optimizer, its tiny run by the CNN test.
    *("--tune", "--tasks", "autoencoder-mnist", "--optimizers", "adam", "muon"),
  )
  for name, o in res["tasks"]["autoencoder-mnist"]["optimizers"].items():
    assert o["source"] == "tuned" and len(o["tuning"]) == 3
    assert len({json.dumps(r["settings"], sort_keys=True) for r in o["tuning"]}) == 3
    best = min(o["tuning"], key=lambda r: r["final_loss"] if np.isfinite(r["final_loss"]) else 1e30)
    assert o["settings"] == best["settings"], name
    _check_run(o["runs"][0], res["settings"]["budget"])


@pytest.mark.slow
def test_scaling_tiny(tmp_path):
  res = run_script("scaling.py", tmp_path)
  solved = [e for e in res["results"] if "skipped" not in e]
  assert {e["solver"] for e in solved} == set(SOLVERS)
  assert all(e["time_s"] > 0 for e in solved)


@pytest.mark.slow
@pytest.mark.skipif(
  not vs_kfac_jax.venv_ready(vs_kfac_jax.VENV),
  reason="kfac-jax venv .kfac-venv/ not present: `python benchmarks/vs_kfac_jax.py` creates it; "
  "tests never do",
)
def test_vs_kfac_jax_tiny(tmp_path):
  res = run_script("vs_kfac_jax.py", tmp_path, "--no-create")
  assert res["kfac_jax_environment"]["kfac_jax"] == "0.0.8"
  assert any(name.startswith("kfac-jax") for name in res["runs"])
  assert "cgfac" in res["runs"]


@pytest.mark.slow
def test_gpu_script_tiny(tmp_path):
  proc = subprocess.run(
    [sys.executable, str(BENCH / "gpu.py"), "--tiny", "--out", str(tmp_path)],
    capture_output=True,
    text=True,
    env=script_env(),
    timeout=900,
    check=False,
  )
  assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
  assert "device" in proc.stdout
  assert (tmp_path / "step_cost.json").exists() and (tmp_path / "time_to_target.json").exists()


def test_every_tuning_setting_of_cgfac_builds_its_optimizer():
  # The --tune runs are long; a setting the library refuses must fail here, not after an hour.
  import time_to_target as T

  for name in ("cgfac", *T.EXTRA_OPTIMIZERS):
    for model in ("autoencoder", "cnn"):
      grid = T.grid_for(name, model)
      assert len(grid) == 3 and len({json.dumps(s, sort_keys=True) for s in grid}) == 3
      for settings in grid:
        tx = T.cgfac_optimizer(**settings)
        state = tx.init({"w": jnp.zeros((3, 2)), "b": jnp.zeros(2)})
        assert jax.tree.leaves(state), (name, model, settings)


def test_no_venv_gives_clear_error(tmp_path):
  with pytest.raises(FileNotFoundError, match="no kfac-jax venv"):
    vs_kfac_jax.ensure_venv(tmp_path / "missing", create=False)


# ---------------------------------------------------------------------------
# The helpers the benchmarks are built on, against independent references.


@pytest.mark.parametrize("fisher", ["empirical", "sampled"])
def test_stats_reproduce_per_example_gradients(fisher):
  layers = C.small_cnn(channels=(3, 4))
  with _x64():
    params = C.init_params(layers, jax.random.key(0), jnp.float64)
    x = jax.random.uniform(jax.random.key(1), (5, 28, 28, 1), jnp.float64)
    y = jnp.arange(5) % 10
    loss, grads, stats = C.value_grad_and_stats(layers, "softmax_ce", fisher)(
      params, x, y, jax.random.key(2)
    )

    def per_example_grad(xi, yi, target):
      return jax.grad(lambda p: C.mean_loss(layers, "softmax_ce", p, xi[None], target[None]))(
        params
      )

    pe = jax.vmap(per_example_grad)(x, y, y)
    assert float(loss) == pytest.approx(float(C.mean_loss(layers, "softmax_ce", params, x, y)))
    for name, st in stats.items():
      np.testing.assert_allclose(grads[name]["kernel"], pe[name]["kernel"].mean(0), atol=1e-12)
      a = st.inputs.reshape(5, -1, st.inputs.shape[-1])
      g = st.output_grads.reshape(5, -1, st.output_grads.shape[-1])
      outer = jnp.einsum("bra,brg->bag", a, g)
      if fisher == "empirical":
        want = pe[name]["kernel"].reshape(outer.shape)
        np.testing.assert_allclose(outer, want, atol=1e-12)
        np.testing.assert_allclose(g.sum(1), pe[name]["bias"], atol=1e-12)
      else:
        # Sampled: the same per-example gradients for labels drawn from the model's softmax.
        logits, _ = C.forward(layers, params, x)
        drawn = C.LOSSES["softmax_ce"][1](jax.random.key(2), logits)
        want = jax.vmap(per_example_grad)(x, y, drawn)[name]["kernel"].reshape(outer.shape)
        np.testing.assert_allclose(outer, want, atol=1e-12)


def test_patches_match_convolution():
  x = jax.random.normal(jax.random.key(0), (2, 9, 11, 3))
  k = jax.random.normal(jax.random.key(1), (3, 3, 3, 5))
  want = jax.lax.conv_general_dilated(
    x, k, (2, 2), "VALID", dimension_numbers=("NHWC", "HWIO", "NHWC")
  )
  got = C.patches(x, 3, 2) @ k.reshape(-1, 5)
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


def test_sigmoid_ce_matches_optax():
  import optax

  z = jax.random.normal(jax.random.key(0), (4, 7)) * 3
  y = jax.random.uniform(jax.random.key(1), (4, 7))
  want = optax.sigmoid_binary_cross_entropy(z, y).sum(-1)
  np.testing.assert_allclose(C.LOSSES["sigmoid_ce"][0](z, y), want, rtol=1e-5, atol=1e-5)


def test_lr_as_argument_equals_lr_in_transformation():
  import optax

  layers = C.autoencoder((6, 4, 2, 4, 6))
  params = C.init_params(layers, jax.random.key(0))
  x = jax.random.uniform(jax.random.key(1), (8, 6))
  spec = C.cgfac_spec("cg", 0.1, 1e-2, max_iters=3)
  step, tx = C.make_step(layers, "sigmoid_ce", spec, "empirical")
  got, _, _ = step(params, tx.init(params), x, x, jax.random.key(2), 0.1)
  direct = spec.make(0.1)
  _, grads, stats = C.value_grad_and_stats(layers, "sigmoid_ce", "empirical")(
    params, x, x, jax.random.key(2)
  )
  updates, _ = direct.update(grads, direct.init(params), params, layer_stats=stats)
  want = optax.apply_updates(params, updates)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6), got, want)


def test_decompositions_tiny(tmp_path):
  res = run_script("decompositions.py", tmp_path)
  assert res["size"] == 64
  assert set(res["seconds"]) == {"eigh", "inv", "cholesky", "matmul"}
  assert all(v > 0 for v in res["seconds"].values())


def test_transformer_damping_floor_option():
  import transformer

  from cgfac_optax import state_scalars

  params = {"w": jnp.zeros((3, 2))}

  def initial_damping(floor):
    return float(state_scalars(transformer.optimizers(floor)["CG-FAC"].init(params))["damping"])

  assert initial_damping(None) == pytest.approx(1e-2)  # cgfac()'s own
  assert initial_damping(1e-4) == pytest.approx(1e-2)  # a lower floor keeps the initial damping
  assert initial_damping(0.1) == pytest.approx(0.1)  # a higher one starts there
  assert transformer.parse_args(["--damping-floor", "0.01"]).damping_floor == 0.01
  assert transformer.parse_args([]).damping_floor is None


@pytest.mark.slow
def test_transformer_tiny(tmp_path):
  res = run_script("transformer.py", tmp_path)
  runs = {r["optimizer"]: r for r in res["results"]}
  assert list(runs) == ["CG-FAC", "Adam", "Muon"]
  for r in runs.values():
    c = r["curve"]
    assert r["steps"] == 3 and r["tokens_per_s"] > 0
    assert all(np.isfinite(c["val_loss"] + c["train_loss"]))
    assert c["val_loss"][-1] < c["val_loss"][0], (r["optimizer"], c["val_loss"])
  # Every parameter is either captured (a layer with stats) or takes the fallback, once.
  cap = res["capture"]
  captured, fallback = {n for n, _ in cap["captured"]}, {n for n, _ in cap["fallback"]}
  assert not captured & fallback
  assert sum(n for _, n in cap["captured"] + cap["fallback"]) == res["parameters"]
  assert {"head", "blocks/0/up", "blocks/0/down"} <= set(cap["layers"])
  assert {"head/kernel", "blocks/0/up/bias"} <= captured
  assert {"embed/embedding", "position", "norm/scale"} <= fallback
  for part in ("query", "key", "value", "out"):  # captured with a LinearGeneral rule, else fallback
    assert f"blocks/0/attention/{part}/kernel" in captured | fallback
  assert {"step_size", "momentum", "damping"} <= set(runs["CG-FAC"]["last_step"])
