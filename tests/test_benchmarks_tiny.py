"""The benchmark scripts run end to end with ``--tiny`` through the harness, write the JSON the
benchmarks page is generated from, and the harness's helpers give what is computed here by hand.

Timings are never asserted. The scripts run in this process (``main(argv)``), sharing its
imports and the run's compilation cache; ``tests/test_demo.py`` runs the demo, and
``tests/test_sharding.py`` runs ``data_parallel.py`` (it needs a process per device count).
"""

from __future__ import annotations

import ast
import json
import math
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parent.parent
BENCH = ROOT / "benchmarks"
sys.path.insert(0, str(BENCH))

import harness as H  # noqa: E402
import kfac_jax_runner  # noqa: E402


def run(module: str, out: Path, *args: str) -> str:
  """``python benchmarks/<module>.py --tiny --out <out> <args>``, here; its printed output."""
  import importlib

  main = importlib.import_module(module).main
  main(["--tiny", "--out", str(out), *args])
  return out


def load(path: Path) -> dict:
  return json.loads(path.read_text())


def check_side_by_side(task: dict, names: set[str], metrics: tuple[str, ...]) -> None:
  """The fields the benchmarks page reads, and each summary against its runs' curves."""
  assert task["description"] and task["loss"] in ("squared_error", "softmax_cross_entropy")
  assert set(task["summary"]) == set(task["optimizers"]) == names
  assert set(task["tables"]) == set(metrics)
  for name, s in task["summary"].items():
    (r,) = task["optimizers"][name]["runs"]  # one seed under --tiny
    c = r["curve"]
    assert r["steps"] > 0 and c["steps"][0] == 0 and c["steps"][-1] == r["steps"]
    assert c["time"] == sorted(c["time"]) and all(np.isfinite(c["loss"]))
    assert s["step_ms_mean"] == pytest.approx(1e3 * r["wall_s"] / r["steps"])
    assert s["steps_median"] == r["steps"] and s["compile_s"] > 0
    for m in metrics:
      best = (min if m == "loss" else max)(c[m])
      assert s[f"best_{m}"] == {"median": best, "min": best, "max": best}
      assert set(s[f"reaches_{m}"]) == names - {name}
      for peer, reach in s[f"reaches_{m}"].items():
        target = task["summary"][peer][f"best_{m}"]["median"]
        hits = [t for t, v in zip(c["time"], c[m]) if (v <= target if m == "loss" else v >= target)]
        (seed,) = reach["per_seed"]
        assert reach["target"] == target and seed["time_s"] == (hits[0] if hits else None)
        assert reach["reached"] == bool(hits)
        ratio = reach["budget_ratio_median"]
        assert ratio == (hits[0] / 0.5 if hits else None)  # --tiny's budget: 0.5 s
    for table in task["tables"].values():
      assert f"| {name} |" in table


@pytest.mark.slow
def test_gpu_script_tiny_runs_the_side_by_side_and_the_step_breakdown(tmp_path, capsys):
  import step_breakdown

  import cgfac_optax
  from cgfac_optax._modes import ADAPTIVE_DEFAULTS, FIXED_RATE_DEFAULTS

  run("gpu", tmp_path, "--tasks", "autoencoder")
  assert capsys.readouterr().out.startswith("device: cpu")
  gpu = load(tmp_path / "gpu.json")
  assert set(gpu["time_to_target"]) == set(gpu["step_breakdown"]) == {"autoencoder"}

  record = load(tmp_path / "autoencoder" / "time_to_target.json")
  assert {"cpu", "jax", "optax", "flax", "cgfac_optax", "psgdax"} <= set(record["environment"])
  task = record["task"]
  check_side_by_side(task, {"adam", "muon", "psgd_kron", "cgfac"}, ("loss",))
  assert not any(r["diverged"] for o in task["optimizers"].values() for r in o["runs"])
  assert (tmp_path / "autoencoder" / "time_to_target.png").stat().st_size > 0
  assert gpu["time_to_target"]["autoencoder"] == task["tables"]
  assert task["cgfac_plan"] == {
    "layers": {f"Dense_{i}": "pcg" for i in range(4)},  # "auto_memory": pcg where it fits
    "fallback": [],
    "parameters": {"layers": 65 * 16 + 17 * 4 + 5 * 16 + 17 * 64, "fallback": 0},
  }

  breakdown = load(tmp_path / "step_breakdown" / "step_breakdown.json")["tasks"]["autoencoder"]
  steps, parts = breakdown["steps"], breakdown["parts"]
  assert set(steps) == {"adam", "cgfac", "every_step", "fixed_rate"}
  assert steps["adam"]["ratio_to_adam"] == 1.0
  assert all(s["step_s"] > 0 and np.isfinite(s["last_loss"]) for s in steps.values())
  # fixed_rate is cgfac() but for its step policy: the same options, as the library resolves
  # them, and each layer's solver as cgfac_optax.plan gives it for cgfac().
  fixed = breakdown["variants"]["fixed_rate"]["settings"]
  damping = ADAPTIVE_DEFAULTS["damping"]
  assert fixed["damping"] == {"initial": damping.initial, "minimum": damping.minimum}
  for option, value in step_breakdown.CGFAC_RESOLVED.items():
    if option not in ("damping", "weight_sharing"):
      assert ADAPTIVE_DEFAULTS[option] == value == fixed[option], option
  # The fixed-rate mode cannot choose from a curvature model: it gets what "auto" chose.
  assert ADAPTIVE_DEFAULTS["weight_sharing"] == step_breakdown.CGFAC_RESOLVED["weight_sharing"]
  assert fixed["weight_sharing"] == "expand"  # the tiny autoencoder: no layer shares weights
  assert set(step_breakdown.CGFAC_RESOLVED) == set(ADAPTIVE_DEFAULTS) - {
    "solver",
    "curvature_batch_size",
  }
  assert ADAPTIVE_DEFAULTS["curvature_batch_size"] == FIXED_RATE_DEFAULTS["curvature_batch_size"]
  assert set(fixed["solver"].values()) <= {"pcg", "sketch"}  # "auto_memory"'s choices
  assert fixed["learning_rate"] == 1e-3
  assert cgfac_optax.cgfac(**{**fixed, "damping": cgfac_optax.AdaptiveDamping(**fixed["damping"])})
  # XLA's flop counts against the matrix products of the tiny autoencoder, counted by hand
  # (64-16-4-16-64 at batch 64): the loss pass is a forward and a backward pass, two to three
  # forwards' worth (no gradient for the inputs); a cgfac() step costs more than Adam's.
  forward = 2 * 64 * (64 * 16 + 16 * 4 + 4 * 16 + 16 * 64) / 1e9
  assert 2 * forward < parts["loss_pass"]["gflop"] < 4 * forward
  assert steps["adam"]["gflop"] == pytest.approx(parts["loss_pass"]["gflop"], rel=0.5)
  assert steps["cgfac"]["gflop"] > 2 * steps["adam"]["gflop"]
  assert gpu["step_breakdown"]["autoencoder"] == breakdown["tables"]


@pytest.mark.slow
def test_time_to_target_tiny_on_linen_and_nnx_tasks(tmp_path):
  # The classifiers' accuracy through the whole script, with first-order optimizers: compiling
  # CG-FAC's step for these models would take most of this file's time; it is traced below.
  run(
    "time_to_target", tmp_path, "--tasks", "resnet", "transformer", "--optimizers", "adam", "muon"
  )
  for name in ("resnet", "transformer"):
    record = load(tmp_path / name / "time_to_target.json")
    check_side_by_side(record["task"], {"adam", "muon"}, ("loss", "accuracy"))
    for o in record["task"]["optimizers"].values():
      assert all(0 <= a <= 1 for a in o["runs"][0]["curve"]["accuracy"])


@pytest.mark.parametrize(
  "name, fallback",
  [
    ("resnet", {"BatchNorm_0/scale", "BasicBlock_0/BatchNorm_1/bias"}),  # 3 BatchNorms: 6 arrays
    ("transformer", {"embed/embedding", "position", "norm/scale", "blocks/0/norm1/bias"}),
  ],
)
def test_the_side_by_side_records_what_cgfac_captures(name, fallback):
  import jax
  import tasks
  import time_to_target

  task = tasks.make(name, tiny=True)
  record = time_to_target.capture(task, {})
  assert fallback <= set(record["fallback"]) and not set(record["layers"]) & fallback
  assert len(record["fallback"]) == {"resnet": 6, "transformer": 8}[name]
  total = sum(leaf.size for leaf in jax.tree.leaves(task.init(0)[0]))
  assert sum(record["parameters"].values()) == total


def test_step_breakdown_arithmetic_variants_step_the_autoencoder():
  # Traced, not compiled: each --arithmetic variant builds and its whole step has the shapes
  # of the plain cgfac() step's.
  import jax
  import optimizers
  import step_breakdown
  import tasks

  task = tasks.make("autoencoder", tiny=True)
  chosen = step_breakdown.variants(task, arithmetic=True)
  assert set(chosen) == {"adam", "cgfac", "every_step", "fixed_rate", *step_breakdown.ARITHMETIC}
  params, state = task.init(0)
  x, y = (a[: task.batch_size] for a in task.data[:2])
  shapes = None
  for name in step_breakdown.ARITHMETIC:
    optimizer, settings = chosen[name]
    tx = optimizers.FACTORIES[optimizer](**settings)
    update = optimizers.update_fn(task, tx, uses_curvature=True)
    out = jax.eval_shape(update, params, state, tx.init(params), x, y, jax.random.key(0))
    got = jax.tree.map(lambda a: (a.shape, a.dtype), (out[0], out[3]))
    assert shapes in (None, got), name
    shapes = got


@pytest.mark.parametrize("name", ["resnet", "transformer"])
def test_cgfac_steps_through_the_linen_and_nnx_helpers(name):
  # CG-FAC's whole step on the Linen (BatchNorm) and NNX tasks, traced (not compiled): the
  # helper's loss, gradients, extra and new model state fit the update and the next step.
  import jax
  import optimizers
  import tasks

  task = tasks.make(name, tiny=True)
  tx = optimizers.cgfac()
  update = optimizers.update_fn(task, tx, uses_curvature=True)
  params, state = task.init(0)
  x, y = (a[: task.batch_size] for a in task.data[:2])
  args = (params, state, tx.init(params), x, y, jax.random.key(0))
  new_params, new_state, opt_state, loss = jax.eval_shape(update, *args)
  shapes = lambda tree: jax.tree.map(lambda a: (a.shape, a.dtype), tree)
  assert shapes(new_params) == shapes(jax.eval_shape(lambda: params))
  assert shapes(new_state) == shapes(jax.eval_shape(lambda: state))
  assert shapes(opt_state) == shapes(jax.eval_shape(lambda: args[2]))
  assert loss.shape == ()
  if name == "resnet":
    assert set(state) == {"batch_stats"}


@pytest.mark.slow
def test_scaling_tiny_measures_every_solver_beside_the_planners_model(tmp_path):
  import optimizers

  run("scaling", tmp_path)
  record = load(tmp_path / "scaling.json")
  solvers = optimizers.solver_names()
  assert len(solvers) == 7 and {"cg", "eigh", "pcg", "sketch"} <= set(solvers)
  for sweep in ("width", "rows"):
    cells = [e for e in record["results"] if e["sweep"] == sweep]
    assert [e["solver"] for e in cells] == solvers
    for e in cells:
      assert "skipped" not in e, e
      assert e["time_s"] > 0 and e["memory_bytes"] > 0
      assert e["predicted_s"] > 0 and e["predicted_bytes"] > 0
  assert all(s in t for t in record["tables"] for s in solvers)
  assert (tmp_path / "scaling.png").stat().st_size > 0


@pytest.mark.slow
@pytest.mark.skipif(
  not kfac_jax_runner.venv_ready(kfac_jax_runner.VENV),
  reason="no kfac-jax venv at .kfac-venv/: `python benchmarks/time_to_target.py --tasks "
  "autoencoder --optimizers kfac_jax --budget 2 --seeds 1` makes it (tests never do)",
)
def test_kfac_jax_tiny_trains_the_autoencoder_and_the_resnet(tmp_path):
  args = ["--tasks", "autoencoder", "resnet", "--optimizers", "adam", "kfac_jax", "--no-create"]
  run("time_to_target", tmp_path, *args)
  blocks = {}
  for name in ("autoencoder", "resnet"):
    task = load(tmp_path / name / "time_to_target.json")["task"]
    assert set(task["optimizers"]) == {"adam", "kfac_jax"} and not task["skipped"]
    (r,) = task["optimizers"]["kfac_jax"]["runs"]
    assert r["steps"] > 0 and np.isfinite(r["curve"]["loss"]).all()
    assert r["curve"]["steps"][0] == 0 and r["compile_s"] > 0
    blocks[name] = r["blocks"]
  # Every layer registered by kfac-jax's graph matcher: 4 dense layers; 3 convolutions, their
  # 3 BatchNorms and the dense head of the tiny ResNet.
  assert blocks["autoencoder"] == {"DenseTwoKroneckerFactored": 4}
  assert blocks["resnet"] == {
    "Conv2DTwoKroneckerFactored": 3,
    "DenseTwoKroneckerFactored": 1,
    "ScaleAndShiftDiagonal": 3,
  }


def test_kfac_jax_skips_the_transformer_saying_why(tmp_path):
  from types import SimpleNamespace

  args = SimpleNamespace(kfac_venv=tmp_path / "none", tiny=True, no_create=False)
  assert "nnx.as_pure" in kfac_jax_runner.skip_reason("transformer", args)
  assert "no kfac-jax venv" in kfac_jax_runner.skip_reason("autoencoder", args)


def _three_step_run(settings: dict, seed: int, budget: float, final: float) -> dict:
  """What ``time_to_target.one_run`` returns for a run of 3 steps from loss 5 to ``final``."""
  curve = {"time": [0.0, budget], "steps": [0, 3], "loss": [5.0, final]}
  return {"curve": curve, "diverged": not math.isfinite(final), "steps": 3, "seed": seed,
          "settings": settings, "step_s_mean": 0.1, "compile_s": 1.0}  # fmt: skip


def test_tuning_keeps_the_setting_with_the_lowest_final_loss(monkeypatch, capsys):
  import optimizers
  import tasks
  import time_to_target

  finals = {3e-4: 2.0, 1e-3: 1.0, 3e-3: math.nan}  # a diverged setting counts as worst

  def one_run(task, name, settings, seed, budget, args):
    return _three_step_run(settings, seed, budget, finals[settings["learning_rate"]])

  monkeypatch.setattr(time_to_target, "one_run", one_run)
  args = time_to_target.parse_args(["--tune", "--seeds", "2", "--optimizers", "adam"])
  task = tasks.Task("autoencoder", *[None] * 8)
  out = time_to_target.run_optimizer(task, "adam", args)
  assert out["settings"] == {"learning_rate": 1e-3}
  assert [t["final_loss"] for t in out["tuning"]] == [2.0, 1.0, math.inf]
  assert [r["seed"] for r in out["runs"]] == [0, 1]
  assert "* tune adam learning_rate=0.001: 1" in capsys.readouterr().out
  assert len(optimizers.grid_for("cgfac", "resnet")) == 3


def test_given_settings_replace_one_optimizers_default(monkeypatch, capsys):
  import tasks
  import time_to_target

  seen = []

  def one_run(task, name, settings, seed, budget, args):
    seen.append((name, settings))
    return _three_step_run(settings, seed, budget, 1.0)

  monkeypatch.setattr(time_to_target, "one_run", one_run)
  given = 'cgfac={"curvature_every": 1, "damping": 0.001}'
  args = time_to_target.parse_args(["--seeds", "1", "--settings", given])
  task = tasks.Task("autoencoder", *[None] * 8)
  for name in ("adam", "cgfac"):
    time_to_target.run_optimizer(task, name, args)
  cgfac = {"curvature_every": 1, "damping": 1e-3}
  assert seen == [("adam", {"learning_rate": 3e-4}), ("cgfac", cgfac)]

  refused = {
    "muon=": "not JSON",
    "muon=[0.02]": "must be a JSON object",
    "sgd={}": "'sgd' is not one of",
  }
  for given, message in refused.items():
    with pytest.raises(SystemExit):
      time_to_target.parse_args(["--settings", given])
    assert message in capsys.readouterr().err
  with pytest.raises(SystemExit):
    time_to_target.parse_args(["--tune", "--settings", "adam={}"])
  assert "--settings and --tune exclude each other" in capsys.readouterr().err
  with pytest.raises(SystemExit):
    time_to_target.parse_args(["--settings", "adam={}", "--settings", "adam={}"])
  assert "names 'adam' twice" in capsys.readouterr().err


def test_every_tuning_setting_of_cgfac_builds_its_optimizer():
  # The --tune runs are long; a setting the library refuses must fail here, not after an hour.
  import jax.numpy as jnp
  import optimizers

  for task in ("autoencoder", "resnet", "transformer"):
    grid = optimizers.grid_for("cgfac", task)
    assert len({json.dumps(s, sort_keys=True) for s in grid}) == 3
    for settings in grid:
      state = optimizers.cgfac(**settings).init({"w": {"kernel": jnp.zeros((3, 2))}})
      assert state, settings


# ---------------------------------------------------------------------------
# The scripts' shape: public API only, no import cycles, --tiny and --out everywhere.


def _imports(path: Path) -> set[str]:
  names = set()
  for node in ast.walk(ast.parse(path.read_text())):
    if isinstance(node, ast.Import):
      names |= {a.name for a in node.names}
    elif isinstance(node, ast.ImportFrom) and node.module:
      names.add(node.module)
  return names


def test_benchmarks_import_only_public_api_and_no_cycle():
  files = {p.stem: p for p in BENCH.glob("*.py")}
  graph = {name: {m for m in _imports(p) if m in files} for name, p in files.items()}
  for name, path in files.items():
    private = [m for m in _imports(path) if m.startswith("cgfac_optax._")]
    assert not private and "cgfac_optax._" not in path.read_text(), (name, private)

  def visit(name, stack):
    assert name not in stack, f"import cycle: {' -> '.join([*stack, name])}"
    for dep in graph[name]:
      visit(dep, [*stack, name])

  for name in graph:
    visit(name, [])
  scripts = [p for n, p in files.items() if not n.startswith("_") and "__main__" in p.read_text()]
  assert len(scripts) >= 6
  for path in scripts:
    text = path.read_text()
    assert '"--tiny"' in text and '"--out"' in text, path.name


# ---------------------------------------------------------------------------
# The harness's helpers, against values computed by hand.


def test_median_counts_missing_and_non_finite_values_as_worst():
  assert H.median([3, 1, 2]) == 2
  assert H.median([4, 1, 3, 2]) == 2.5
  assert H.median([1, None, 3]) == 3  # None is infinitely bad: the median of 1, 3, inf
  assert H.median([1.0, math.nan, 2.0]) == 2.0
  assert math.isnan(H.median([1, None]))  # (1 + inf) / 2: no finite median
  assert math.isnan(H.median([None, math.inf, 5]))
  assert math.isnan(H.median([]))


def test_eval_schedule_is_even_plus_halvings_toward_the_start():
  assert H.eval_schedule(8.0, 4) == [0.125 / 4 * 2**k for k in range(6)] + [2.0, 4.0, 6.0, 8.0]
  assert H.eval_schedule(1.0, 1) == [1 / 64, 1 / 32, 1 / 16, 1 / 8, 1 / 4, 1 / 2, 1.0]


def _run(times, steps, losses, seed=0, accuracy=None, step_s=0.01, diverged=False):
  curve = {"time": times, "steps": steps, "loss": losses}
  if accuracy is not None:
    curve["accuracy"] = accuracy
  return {"curve": curve, "steps": steps[-1], "step_s_mean": step_s, "seed": seed,
          "diverged": diverged, "compile_s": 2.0}  # fmt: skip


def test_time_to_is_the_first_evaluation_at_the_target():
  run_ = _run([0, 1, 2, 4], [0, 10, 20, 40], [5.0, 3.0, 2.0, 2.5], accuracy=[0.1, 0.5, 0.7, 0.6])
  assert H.time_to(run_, 3.0) == (1, 10)
  assert H.time_to(run_, 2.2) == (2, 20)
  assert H.time_to(run_, 1.0) == (None, None)
  assert H.time_to(run_, 0.6, "accuracy") == (2, 20)
  assert H.time_to(run_, 0.8, "accuracy") == (None, None)
  assert H.best(run_) == 2.0 and H.best(run_, "accuracy") == 0.7


def test_summarize_against_hand_computed_values():
  budget = 10.0
  fast = [
    _run([0, 2, 5, 10], [0, 20, 50, 100], [4.0, 2.0, 1.0, 0.5], 0, [0.1, 0.5, 0.8, 0.9], 0.1),
    _run([0, 2, 5, 10], [0, 20, 50, 100], [4.0, 3.0, 1.5, 0.8], 1, [0.1, 0.4, 0.6, 0.7], 0.1),
    _run([0, 2, 5, 10], [0, 20, 50, 90], [4.0, 3.5, 3.0, 2.0], 2, [0.1, 0.2, 0.3, 0.4], 0.2),
  ]
  slow = [
    _run([0, 5, 10], [0, 5, 10], [4.0, 1.2, 1.0], 0, [0.1, 0.75, 0.85], 1.0),
    _run([0, 5, 10], [0, 5, 10], [4.0, 2.5, 2.0], 1, [0.1, 0.3, 0.5], 1.0),
    _run([0, 5, 7], [0, 5, 7], [4.0, 3.9, float("nan")], 2, [0.1, 0.2, 0.1], 1.0, True),
  ]
  s = H.summarize({"fast": {"runs": fast}, "slow": {"runs": slow}}, budget)
  f, w = s["fast"], s["slow"]
  assert f["best_loss"] == {"median": 0.8, "min": 0.5, "max": 2.0}
  # slow's bests: 1.0, 2.0 and, for the seed that diverged, its best finite loss 3.9.
  assert w["best_loss"] == {"median": 2.0, "min": 1.0, "max": 3.9}
  assert f["best_accuracy"] == {"median": 0.7, "min": 0.4, "max": 0.9}
  assert w["best_accuracy"] == {"median": 0.5, "min": 0.2, "max": 0.85}
  assert f["step_ms_mean"] == pytest.approx(1e3 * (0.1 + 0.1 + 0.2) / 3)
  assert f["steps_median"] == 100 and w["steps_median"] == 10
  assert (f["diverged"], w["diverged"], f["seeds"]) == (0, 1, [0, 1, 2])
  assert f["compile_s"] == 2.0
  # fast to slow's median best loss 2.0: seeds at 2 s, 5 s, 10 s; median 5 s of 10.
  r = f["reaches_loss"]["slow"]
  assert r["target"] == 2.0 and r["budget_ratio_median"] == 0.5 and r["reached"] == 3
  assert [p["time_s"] for p in r["per_seed"]] == [2, 5, 10]
  assert r["steps_median"] == 50
  # slow to fast's 0.8: never reached; to fast's accuracy 0.7: seed 0 at 5 s only.
  assert w["reaches_loss"]["fast"]["budget_ratio_median"] is None
  assert w["reaches_loss"]["fast"]["reached"] == 0
  acc = w["reaches_accuracy"]["fast"]
  assert acc["reached"] == 1 and acc["budget_ratio_median"] is None  # 1 of 3: median missing
  assert [p["time_s"] for p in acc["per_seed"]] == [5, None, None]
  # fast to slow's accuracy 0.5: 2 s, 5 s, never: the median is 5 s.
  assert f["reaches_accuracy"]["slow"]["budget_ratio_median"] == 0.5
  table = H.table(s, {"fast": "a", "slow": "b"}, budget)
  assert "| fast | a | 0.8 [0.5, 2] | 133 | 100 |  | 0.50x (3/3) |" in table
  assert "| slow | b | 2 [1, 3.9] (1 diverged) | 1000 | 10 | - (0/3) |  |" in table


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

  # Each step moves the model to the next loss and, on a clock that reads 0, 1, 2, ..., takes
  # 1 s; with a budget of one second a step and as many evaluations, every step is evaluated.
  ticks = itertools.count()
  monkeypatch.setattr(H.time, "perf_counter", lambda: float(next(ticks)))
  step = lambda carry, batch, i: (carry + 1, 0.0)
  evaluate = lambda carry: {"loss": losses[carry]}
  n = len(losses) - 1
  out = H.train_for(step, 0, iter(range(100)), evaluate, float(n), n, max_steps=100)
  assert out["diverged"] is diverged
  assert out["curve"]["loss"] == pytest.approx(losses[:evaluated], nan_ok=True)
  assert out["curve"]["steps"] == list(range(evaluated))


def test_batches_cover_every_example_once_per_epoch():
  x = np.arange(10)[:, None]
  batches = H.Batches(x, np.arange(10), 5, seed=3)
  first = np.concatenate([np.asarray(next(batches)[1]) for _ in range(2)])
  assert sorted(first) == list(range(10))
  with pytest.raises(ValueError, match="batch_size 11 exceeds the 10 examples"):
    H.Batches(x, x, 11)
