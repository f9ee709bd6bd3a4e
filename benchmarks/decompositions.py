"""Time of the decompositions a K-FAC refresh can use, against a matmul of the same size.

One ``d x d`` symmetric positive-definite factor (``d = --size``): XLA's ``eigh`` (the
``"eigh"`` solver's refresh), ``inv`` (``"pcg"`` and ``"kfac_inverse"``'s refresh),
``cholesky``, and one ``d x d`` matmul, each compiled and then timed as the median of
``--reps`` calls. Prints a table and writes ``decompositions.json`` and ``.png`` to ``--out``.

Run: ``python benchmarks/decompositions.py`` (``--tiny`` for a seconds-long check).
"""

from __future__ import annotations

import argparse
import pathlib
import time

import _common as C
import jax
import jax.numpy as jnp
import numpy as np

OPERATIONS = {
  "eigh": jnp.linalg.eigh,
  "inv": jnp.linalg.inv,
  "cholesky": jnp.linalg.cholesky,
  "matmul": lambda x: jnp.matmul(x, x, precision=jax.lax.Precision.HIGHEST),
}


def main(argv=None) -> dict:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--size", type=int, default=1000)
  parser.add_argument("--reps", type=int, default=3)
  parser.add_argument("--out", type=pathlib.Path, default=None)
  parser.add_argument("--tiny", action="store_true", help="size 64, one repetition")
  args = parser.parse_args(argv)
  size, reps = (64, 1) if args.tiny else (args.size, args.reps)
  info = C.environment()
  C.print_environment(info)
  x = np.random.default_rng(0).normal(size=(size, size + size // 5)).astype(np.float32)
  factor = jnp.asarray(x @ x.T / x.shape[1])
  seconds = {}
  for name, op in OPERATIONS.items():
    fn = jax.jit(op)
    jax.block_until_ready(fn(factor))
    times = []
    for _ in range(reps):
      start = time.perf_counter()
      jax.block_until_ready(fn(factor))
      times.append(time.perf_counter() - start)
    seconds[name] = float(np.median(times))
  rows = [[n, f"{s * 1e3:.1f}", f"{s / seconds['matmul']:.0f}"] for n, s in seconds.items()]
  print(C.format_table([f"{size}x{size}", "ms", "x matmul"], rows))
  payload = {"environment": info, "size": size, "reps": reps, "seconds": seconds}
  path = C.write_json("decompositions", payload, args.out)
  fig, (ax,) = C.new_figure()
  ax.bar(list(seconds), [v * 1e3 for v in seconds.values()])
  ax.set(yscale="log", ylabel="ms (median)", title=f"{size} x {size} float32, {info['device']}")
  png = C.save_figure(fig, "decompositions", args.out)
  print(f"wrote {path} and {png}")
  return payload


if __name__ == "__main__":
  main()
