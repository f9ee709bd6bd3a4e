"""Checkpoints: an optimizer state saved mid-training and restored continues the same trajectory.

With orbax: ``cgfac()`` (quadratic-model steps, adaptive damping, curvature memory) trains, saves,
and a fresh interpreter restores and trains on (``checkpoint_worker.py``): the parameters and
state equal bitwise those of the run that never stopped. The same in one process for a fixed
learning rate with :class:`AdaptiveDamping` and ``eigh`` curvature memory, saved between two
damping adaptations and two refreshes. With numpy: the state's leaves round-trip through
``np.savez`` into the structure of a fresh ``init``.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest

import cgfac_optax as cgfac

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))

import checkpoint_worker as W  # noqa: E402

WORKER = ROOT / "tests" / "checkpoint_worker.py"
CONFIGS = ("default",)


def _run(mode: str, out: Path) -> None:
  env = dict(os.environ)
  env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), env.get("PYTHONPATH", "")) if p)
  # The second process loads the first one's compiled steps instead of compiling them again.
  env["JAX_COMPILATION_CACHE_DIR"] = str(out / "jax_cache")
  env["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0"
  env["JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES"] = "0"
  proc = subprocess.run(
    [sys.executable, str(WORKER), mode, str(out)],
    capture_output=True,
    text=True,
    env=env,
    timeout=300,
    check=False,
  )
  assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]


def _leaves(path: Path) -> list[np.ndarray]:
  with np.load(path) as f:
    return [f[f"arr_{i}"] for i in range(len(f.files))]


@pytest.mark.slow
def test_orbax_restore_in_a_fresh_process_continues_bitwise(tmp_path):
  _run("first", tmp_path)
  _run("resume", tmp_path)
  for name in CONFIGS:
    straight = _leaves(tmp_path / f"{name}_straight.npz")
    resumed = _leaves(tmp_path / f"{name}_resumed.npz")
    assert len(straight) == len(resumed) > 0
    for i, (a, b) in enumerate(zip(straight, resumed)):
      assert a.dtype == b.dtype and a.shape == b.shape, (name, i)
      assert a.tobytes() == b.tobytes(), f"{name}: leaf {i} differs after the restore"
    # Training went on after the checkpoint: the restored run did the remaining steps.
    saved = _leaves(tmp_path / f"{name}_saved.npz")
    assert any(a.tobytes() != b.tobytes() for a, b in zip(saved, straight)), name


def _assert_bitwise(got, want, name):
  got, want = jax.tree.leaves(got), jax.tree.leaves(want)
  assert len(got) == len(want) > 0
  for i, (a, b) in enumerate(zip(got, want)):
    a, b = np.asarray(a), np.asarray(b)
    assert a.dtype == b.dtype and a.shape == b.shape, (name, i)
    assert a.tobytes() == b.tobytes(), f"{name}: leaf {i} differs after the restore"


def test_orbax_round_trip_with_adaptive_damping_and_memory(tmp_path):
  import jax.numpy as jnp
  import orbax.checkpoint as ocp

  # Damping adapted at steps 0, 3, 6, 9; eigh refreshed at 0, 1, 2, 3, 6, 9: the save at 7 is
  # between two of each.
  tx = cgfac.cgfac(
    0.1,
    cgfac.AdaptiveDamping(initial=0.1, interval=3),
    solver="eigh",
    curvature_decay=0.9,
    refresh_every=3,
  )
  model = W.MLP()
  step = W.make_step(model, tx)
  params = model.init(jax.random.key(0), jnp.zeros((1, 8)))["params"]
  straight = W.train(step, params, tx.init(params), 0, W.STEPS)
  saved = W.train(step, params, tx.init(params), 0, W.SAVE_AT)
  assert saved[1][0].curvature is not None and saved[1][0].control.damping != 0.1
  checkpointer = ocp.StandardCheckpointer()
  checkpointer.save(tmp_path / "ckpt", {"params": saved[0], "opt_state": saved[1]})
  checkpointer.wait_until_finished()
  abstract = jax.eval_shape(lambda p: {"params": p, "opt_state": tx.init(p)}, params)
  restored = checkpointer.restore(tmp_path / "ckpt", abstract)
  checkpointer.close()
  _assert_bitwise(restored, {"params": saved[0], "opt_state": saved[1]}, "restored")
  resumed = W.train(step, restored["params"], restored["opt_state"], W.SAVE_AT, W.STEPS)
  _assert_bitwise(resumed, straight, "resumed")
  assert any(
    np.asarray(a).tobytes() != np.asarray(b).tobytes()
    for a, b in zip(jax.tree.leaves(saved), jax.tree.leaves(straight))
  )


def test_numpy_round_trip_is_bitwise(tmp_path):
  import jax.numpy as jnp

  tx = cgfac.cgfac()
  params = {"hidden": {"kernel": jnp.ones((3, 5)), "bias": jnp.zeros(5)}}
  state = tx.init(params)
  # Give every leaf a distinct, non-trivial value (as after some training).
  leaves, treedef = jax.tree.flatten(state)
  rng = np.random.default_rng(0)
  state = treedef.unflatten(
    [jnp.asarray(rng.normal(size=leaf.shape) * 7).astype(leaf.dtype) for leaf in leaves]
  )
  np.savez(tmp_path / "state.npz", *jax.tree.leaves(state))
  with np.load(tmp_path / "state.npz") as f:
    loaded = [f[f"arr_{i}"] for i in range(len(f.files))]
  restored = jax.tree.unflatten(jax.tree.structure(tx.init(params)), loaded)
  assert jax.tree.structure(restored) == jax.tree.structure(state)
  for a, b in zip(jax.tree.leaves(state), jax.tree.leaves(restored)):
    assert np.asarray(a).dtype == b.dtype and np.asarray(a).tobytes() == b.tobytes()
