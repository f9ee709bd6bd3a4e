"""The compiled CG loop: conditionals per iteration for each way of skipping converged layers.

On a GPU every ``conditional`` in the loop body reads its predicate back to the host, once
per layer and iteration; with ``cg_skip="mask"`` the body must have none. The collectives of
the same loop on 8 devices are counted in ``tests/test_sharding.py``.
"""

from __future__ import annotations

import sys
from pathlib import Path

import jax
import numpy as np

import cgfac_optax as cgfac

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(ROOT / "benchmarks"))

import hlo_collectives  # noqa: E402
import oracles  # noqa: E402

WIDTHS = [(8, 16), (16, 12), (12, 4)]


def _three_layers():
  params, grads, stats = {}, {}, {}
  for i, (d_in, d_out) in enumerate(WIDTHS):
    p, g, s = oracles.dense_layer(i, d_in, d_out, (32,), name=None, random_grads=True)
    params[f"l{i}"], grads[f"l{i}"], stats[f"l{i}"] = p, g, s
  return params, grads, stats


def _compiled(params, grads, stats, **options):
  tx = cgfac.scale_by_cgfac(1e-2, max_iters=5, solver="cg", **options)
  update = jax.jit(lambda g, s: tx.update(g, s, params, layer_stats=stats))
  state = tx.init(params)
  return update, state, update.lower(grads, state).compile().as_text()


def test_conditionals_in_the_cg_loop():
  # With a preconditioner, so that its skipping is counted too.
  preconditioner = "jacobi"
  params, grads, stats = _three_layers()
  results = {}
  for skip in ("mask", "cond"):
    update, state, text = _compiled(
      params, grads, stats, cg_skip=skip, preconditioner=preconditioner
    )
    loops = hlo_collectives.count_instructions(text, "while")
    assert loops == {"step": 1, "iteration": 0}, loops  # one loop for all layers
    results[skip] = (hlo_collectives.count_instructions(text, "conditional"), update(grads, state))
  masked, _ = results["mask"]
  assert masked["iteration"] == 0, masked
  # Under lax.cond: each layer's product and its preconditioner.
  conditioned, _ = results["cond"]
  assert conditioned["iteration"] == 2 * len(WIDTHS), conditioned
  # And the same solve either way, up to float32 rounding (XLA fuses the two bodies apart).
  (u_mask, s_mask), (u_cond, s_cond) = results["mask"][1], results["cond"][1]
  for got, want in zip(jax.tree.leaves(u_mask), jax.tree.leaves(u_cond)):
    np.testing.assert_allclose(got, want, atol=1e-5 * float(np.max(np.abs(want))))
  assert {k: int(v) for k, v in s_mask.iterations.items()} == {
    k: int(v) for k, v in s_cond.iterations.items()
  }


def test_platform_default_on_cpu_is_cond():
  # None resolves by jax.default_backend() at trace time; these tests run on the CPU. Without
  # a preconditioner, one lax.cond per layer (its product).
  assert jax.default_backend() == "cpu"
  params, grads, stats = _three_layers()
  _, _, text = _compiled(params, grads, stats)
  assert hlo_collectives.count_instructions(text, "conditional")["iteration"] == len(WIDTHS)
  from cgfac_optax._cg import default_skip

  assert [default_skip(p) for p in ("cpu", "gpu", "tpu")] == ["cond", "mask", "mask"]
