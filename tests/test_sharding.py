"""CG-FAC under jax.jit on 8 simulated CPU devices: the single-device answer, stable state
layouts, and the collectives the scaling recipe (docs/recipes.md) states.

The 8-device runs happen in a subprocess (tests/sharded_worker.py) because the device count
is fixed when jax starts, and the rest of the suite runs on one device.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from cgfac_optax._solvers import SOLVERS as SOLVER_TABLE

ROOT = Path(__file__).resolve().parents[1]
SOLVERS = tuple(SOLVER_TABLE)
DEVICES = 8


def _env() -> dict:
  env = dict(os.environ)
  # On top of conftest's cheapest code generation, on which neither the partitioned HLO (and its
  # collectives) nor the results compared here depend.
  flags = f"{env.get('XLA_FLAGS', '')} --xla_force_host_platform_device_count={DEVICES}"
  env["XLA_FLAGS"] = flags.strip()
  env["JAX_PLATFORMS"] = "cpu"
  # Eight simulated devices each call LAPACK at once: threaded BLAS would oversubscribe the cores.
  env["OPENBLAS_NUM_THREADS"] = "1"
  env["PYTHONPATH"] = os.pathsep.join([str(ROOT), *filter(None, [env.get("PYTHONPATH")])])
  return env


def run_script(path: Path, *args: str) -> str:
  proc = subprocess.run(
    [sys.executable, str(path), *args], env=_env(), capture_output=True, text=True, timeout=600
  )
  assert proc.returncode == 0, proc.stderr[-4000:]
  return proc.stdout


def run_worker(*args: str) -> dict:
  stdout = run_script(ROOT / "tests" / "sharded_worker.py", *args)
  out = json.loads(stdout.strip().splitlines()[-1])
  assert out["devices"] == DEVICES
  return out["result"]


MODELS = ("linen_mlp", "linen_cnn")  # Flax Linen models through cgfac_optax.flax


@pytest.mark.parametrize("solver", SOLVERS)
def test_sharded_steps_equal_single_device_steps(solver):
  # "lowrank" is for few rows and wide layers; on the CNN's conv layers (rows far above the
  # widths) its float32 answer is good to about 1e-5 on one device already. The CNN's sharded
  # patch rows meet the solvers in the products with the rows ("cg") and in forming the factors
  # ("cg_materialized"); the other factor-based solvers start from those replicated factors, so
  # the MLP covers them.
  # For the same reason the replicated-parameter layout on the Auto mesh is left to those two:
  # the others run FSDP (sharded state) and data parallelism on the Explicit mesh.
  rows = solver in ("cg", "cg_materialized")
  models = MODELS if rows else MODELS[:1]
  auto = ("dp", "fsdp") if rows else ("fsdp",)
  layouts = [*auto, "dp_explicit"]
  result = run_worker("updates", solver, ",".join(models), ",".join(layouts))
  cases = [(m, layout) for m in models for layout in auto] + [(models[0], "dp_explicit")]
  assert len(result) == len(cases)
  for model, layout in cases:
    case = result[f"{model}/{solver}/{layout}"]
    for step in ("step1", "step2"):
      got = case[step]
      where = f"{model}, {solver}, {layout} layout, {step}"
      for what in ("solution", "update", "params"):
        diff = got[f"{what}_rel_diff"]
        assert diff <= 1e-5, f"{where}: {what} differs by {diff}"
      # CG stops on global norms: the same iterations as one device, on every device.
      assert got["iterations"] == got["want_iterations"], where
      assert all(len(v) == 1 for v in got["iterations_per_device"].values()), where
    assert case["compiles"] == 1, f"{model}, {solver}, {layout}: step 2 recompiled"
    assert case["state_sharding_stable"], f"{model}, {solver}, {layout}: state layout changed"
    specs = case["solution_specs"]
    if layout == "fsdp":
      assert all("data" in s for s in specs), specs
    else:
      assert all(s == "P()" for s in specs), specs
  if SOLVER_TABLE[solver].iterative:
    # The layers stop at different iterations, so termination is exercised, not max_iters.
    steps = [result[f"{MODELS[0]}/{solver}/{auto[0]}"][s] for s in ("step1", "step2")]
    iterations = [n for step in steps for n in step["iterations"].values()]
    assert min(iterations) < max(iterations), iterations


# The claims of the scaling recipe for the demo MLP 784-256-128-10 at batch 256 (float32),
# data-parallel over 8 devices. Per layer, with the bias row: (d_A, d_G).
B = 256
LAYERS = [(785, 256), (257, 128), (129, 10)]
# The gradient all-reduce, the mean loss (one float) that the step returns, and the stats'
# finiteness flags (one byte each for a and g of each layer).
GRADIENTS = 4 * sum(d_a * d_g for d_a, d_g in LAYERS) + 4 + 2 * len(LAYERS)
NARROW_PRODUCT_BYTES = 4 * (2 * B * 65 + 65 * 512)  # MLP 64-512-10: its first layer's product
PRODUCT_ALL_REDUCE = 4 * sum(d_a * d_g for d_a, d_g in LAYERS)  # one d_A x d_G per layer
ROWS_ALL_GATHER = 4 * sum(B * d_g for _, d_g in LAYERS)  # g's rows, B x d_G per layer
FACTORS = 4 * sum(d_a * d_a + d_g * d_g for d_a, d_g in LAYERS)  # A and G per layer
CLAIMS = {
  # solver: ({kind: bytes} once per step, {kind: bytes} per CG iteration)
  "cg": (
    {"all-reduce": GRADIENTS + PRODUCT_ALL_REDUCE, "all-gather": ROWS_ALL_GATHER},
    {"all-reduce": PRODUCT_ALL_REDUCE, "all-gather": ROWS_ALL_GATHER},
  ),
  "cg_materialized": ({"all-reduce": GRADIENTS + FACTORS}, {}),
  "eigh": ({"all-reduce": GRADIENTS + FACTORS}, {}),
  "lowrank": (
    {
      "all-reduce": GRADIENTS + 4 * sum(B * (d_a + d_g) for d_a, d_g in LAYERS),
      "all-gather": 4 * sum(B * (d_a + d_g) + 2 * B * B for d_a, d_g in LAYERS),
      "all-to-all": 4 * sum(2 * B * B // DEVICES for _ in LAYERS),
    },
    {},
  ),
}


def _bytes_by_kind(collectives, in_loop):
  out = {}
  for c in collectives:
    if c["in_loop"] == in_loop:
      out[c["kind"]] = out.get(c["kind"], 0) + c["bytes"]
  return out


def test_collectives_of_the_demo_step_match_the_documented_counts():
  assert set(CLAIMS) <= set(SOLVERS)
  result = run_worker("collectives", ",".join(SOLVERS))
  for solver, (per_step, per_iteration) in CLAIMS.items():
    found = result[f"{solver}/dp"]
    assert _bytes_by_kind(found, False) == per_step, solver
    assert _bytes_by_kind(found, True) == per_iteration, solver
  # Every solver in the table, documented in the recipe or not, exchanges what its record's
  # communication model says: once per step, and per CG iteration.
  for m in (0, 3):
    plan = _demo_plan(data_shards=DEVICES, cg_iters=m)
    for solver in SOLVERS:
      found = result[f"{solver}/dp"]
      once = sum(_bytes_by_kind(found, False).values()) - GRADIENTS
      measured = once + m * sum(_bytes_by_kind(found, True).values())
      assert sum(lp.communication_bytes[solver] for lp in plan.values()) == measured, solver
  # Matrix-free CG, per iteration: each layer all-reduces one d_A x d_G product and gathers
  # its B x d_G output-gradient rows (one collective each: the product sits in a lax.cond).
  loop = [c for c in result["cg/dp"] if c["in_loop"]]
  loop = sorted((c["kind"], tuple(c["shapes"][0][1])) for c in loop)
  want = [("all-reduce", (d_a, d_g)) for d_a, d_g in LAYERS]
  want += [("all-gather", (B, d_g)) for _, d_g in LAYERS]
  assert loop == sorted(want)

  # FSDP layout: the CG vectors are split, so the dot products behind the step sizes and the
  # stopping test are all-reduced as scalars inside the loop (global norms); data-parallel
  # needs none (the vectors are replicated).
  def scalar_all_reduces(found):
    return [
      c
      for c in found
      if c["in_loop"] and c["kind"] == "all-reduce" and all(dims == [] for _, dims in c["shapes"])
    ]

  assert scalar_all_reduces(result["cg/fsdp"])
  assert not scalar_all_reduces(result["cg/dp"])

  # The CPU default puts each layer's product in a lax.cond; cg_skip="mask" (the GPU and TPU
  # default) leaves the loop body without conditionals, so XLA combines the layers' product
  # all-reduces into one collective per iteration and hoists the gather of g (loop-invariant)
  # out of the loop: once for the warm start's residual, once for the loop.
  assert result["cg/dp/conditionals"]["iteration"] == len(LAYERS)
  assert result["cg/dp/mask/conditionals"]["iteration"] == 0
  assert result["cg/fsdp/mask/conditionals"]["iteration"] == 0
  masked = result["cg/dp/mask"]
  loop = [c for c in masked if c["in_loop"]]
  assert [c["kind"] for c in loop] == ["all-reduce"], loop
  assert sorted(tuple(dims) for _, dims in loop[0]["shapes"]) == sorted(LAYERS)
  assert _bytes_by_kind(masked, True) == {"all-reduce": PRODUCT_ALL_REDUCE}
  assert _bytes_by_kind(masked, False) == {
    "all-reduce": GRADIENTS + PRODUCT_ALL_REDUCE,
    "all-gather": 2 * ROWS_ALL_GATHER,
  }
  # FSDP, masked: the vectors are split, so CG's dot products (r.z, p.Ap, ||r||^2, which
  # depend on one another) are all-reduced as scalars in the loop, at least three times an
  # iteration (some combined with a product's all-reduce): fewer collectives than under
  # lax.cond, but not the one reduction per iteration of the data-parallel layout.
  fsdp = [c for c in result["cg/fsdp/mask"] if c["in_loop"] and c["kind"] == "all-reduce"]
  scalars = [c for c in fsdp if any(dims == [] for _, dims in c["shapes"])]
  assert 3 <= len(scalars) <= 2 + len(LAYERS), scalars
  assert sum(c["in_loop"] for c in result["cg/fsdp/mask"]) < sum(
    c["in_loop"] for c in result["cg/fsdp"]
  )
  # MLP 64-512-10: the first layer (d_A = 65 <= d_G = 512) gathers (V g^T) and reduces a^T k,
  # d_A x B each, instead of gathering g; the second (513 x 10) gathers g.
  narrow = _bytes_by_kind(result["cg/dp/narrow"], True)
  assert narrow == {
    "all-gather": 4 * (65 * B + B * 10),
    "all-reduce": 4 * (65 * B + 65 * 512 + 513 * 10),
  }
  assert sum(narrow.values()) == NARROW_PRODUCT_BYTES + 4 * (513 * 10 + B * 10)


def test_adaptive_damping_on_an_explicit_mesh_matches_one_device():
  # value_fn closes over the explicitly sharded batch and is called inside the solve.
  result = run_worker("adaptive")
  assert result["params_rel_diff"] <= 1e-5 and result["control_rel_diff"] <= 1e-5, result


def test_readme_cgfac_recipe_on_an_explicit_mesh_matches_one_device():
  # cgfac() runs every function of extra (the stats, the curvature model's outputs, value_fn)
  # inside its update, which on a mesh with Explicit axes used to fail with "Argument
  # '<function ...>' is not a valid JAX type".
  result = run_worker("recipe")
  assert result["axis_types"] == ["AxisType.Explicit"] and result["batch_spec"].startswith(
    "P('data'"
  ), result
  losses = result["losses"]
  assert losses[-1] < 0.5 * losses[0], losses
  assert result["loss_rel_diff"] <= 1e-5 and result["params_rel_diff"] <= 1e-5, result


def _doc_section() -> str:
  """The recipes page's scaling section."""
  text = (ROOT / "docs" / "recipes.md").read_text()
  assert "## Scaling out" in text, "no '## Scaling out' section in docs/recipes.md"
  return text.split("## Scaling out", 1)[1].split("\n## ", 1)[0]


def test_scaling_section_examples_run_on_8_devices(tmp_path):
  blocks = re.findall(r"```python\n(.*?)```", _doc_section(), re.S)
  assert blocks
  for i, block in enumerate(blocks):
    script = tmp_path / f"scaling_{i}.py"
    script.write_text(block)
    run_script(script)


def test_data_parallel_benchmark_runs(tmp_path):
  # The tiny autoencoder (64-16-4-16-64) at batch 64 on 2 devices, "cg": the collectives read
  # from the compiled step are the bytes the planner's model gives for it.
  out = tmp_path / "dp"
  stdout = run_script(ROOT / "benchmarks" / "data_parallel.py", "--tiny", "--out", str(out))
  assert "| cg |" in stdout and "simulated" in stdout
  record = json.loads((out / "data_parallel.json").read_text())
  assert record["many"]["devices"] == 2 and record["one"]["devices"] == 1
  cg = record["many"]["results"]["cg"]
  measured, model = cg["collectives"], cg["predicted_bytes"]
  assert measured["iteration"]["bytes"] == model["iteration"] > 0
  # Per step the program also reduces a few scalars (the batch's mean loss among them).
  assert 0 <= measured["step"]["bytes"] - model["step"] < 64
  # Per step, the gradients' all-reduce at least: 4 bytes for each of the 2,276 parameters.
  assert cg["collectives"]["step"]["all-reduce:bytes"] >= 4 * (65 * 16 + 17 * 4 + 5 * 16 + 17 * 64)
  assert (out / "data_parallel.png").stat().st_size > 0


def _demo_plan(**kwargs):
  import jax
  import jax.numpy as jnp

  import cgfac_optax as cgfac

  sds = lambda *s: jax.ShapeDtypeStruct(s, jnp.float32)
  widths = [(784, 256), (256, 128), (128, 10)]
  params = {f"Dense_{i}": {"kernel": sds(a, b), "bias": sds(b)} for i, (a, b) in enumerate(widths)}
  stats = {f"Dense_{i}": cgfac.DenseStats(sds(B, a), sds(B, b)) for i, (a, b) in enumerate(widths)}
  return cgfac.plan(params, stats, learning_rate=0.1, **kwargs)  # cgfac(0.1)'s: "auto"


def test_plan_communication_is_what_the_compiled_step_exchanges():
  # The recipe's counts (CLAIMS); the collectives test above compares every solver's model with
  # the compiled step itself.
  from cgfac_optax._layers import LayerShape

  assert set(CLAIMS) <= set(SOLVERS)
  grads = GRADIENTS
  per_step = {s: sum(v.values()) - grads for s, (v, _) in CLAIMS.items()}
  per_iteration = {s: sum(v.values()) for s, (_, v) in CLAIMS.items()}
  for m in (0, 3):
    plan = _demo_plan(data_shards=DEVICES, cg_iters=m)
    for solver in CLAIMS:
      measured = per_step[solver] + m * per_iteration[solver]
      assert sum(lp.communication_bytes[solver] for lp in plan.values()) == measured, solver
  # The narrow side of the matrix-free product (d_A <= d_G): (V g^T) gathered, a^T k reduced.
  narrow = SOLVER_TABLE["cg"].communication(LayerShape(256, 65, 512), 0, 8)
  assert 4 * narrow == NARROW_PRODUCT_BYTES
  assert SOLVER_TABLE["cg"].communication(LayerShape(256, 65, 512), 3, 1) == 0


def test_plan_for_data_shards_divides_row_work_and_counts_communication():
  one = _demo_plan()
  assert all(c == 0 for lp in one.values() for c in lp.communication_bytes.values())
  # Flops alone on 8 devices: the matrix-free product is the only one whose work all splits.
  free = _demo_plan(data_shards=8, flops_per_byte=0.0)
  assert set(free.solvers().values()) == {"cg"}
  for path, lp in free.items():
    assert lp.flops["cg"] == pytest.approx(one[path].flops["cg"] / 8)
  # With communication priced at 1000 flops per byte, the factors' one all-reduce beats
  # CG's per-iteration exchanges on the middle layer.
  priced = _demo_plan(data_shards=8, flops_per_byte=1000.0)
  assert priced["Dense_1"].solver == "cg_materialized"
  with pytest.raises(ValueError, match="data_shards must be an int >= 1, got 0"):
    _demo_plan(data_shards=0)
  with pytest.raises(ValueError, match="flops_per_byte must be >= 0, got -1.0"):
    _demo_plan(data_shards=2, flops_per_byte=-1.0)


def test_plan_table_of_the_scaling_section():
  one, free, priced = (
    _demo_plan(),
    _demo_plan(data_shards=8, flops_per_byte=0.0),
    _demo_plan(data_shards=8),
  )
  table = {p: (one[p].solver, free[p].solver, priced[p].solver) for p in one}
  assert table == {
    "Dense_0": ("cg", "cg", "lowrank"),
    "Dense_1": ("cg_materialized", "cg", "cg_materialized"),
    "Dense_2": ("cg_materialized", "cg", "cg"),
  }
