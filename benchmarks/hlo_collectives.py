"""Collectives of a compiled XLA program: which ones, how many bytes, inside a loop or not.

Reads the text of a compiled executable (``jax.jit(f).lower(...).compile().as_text()``), the
program after SPMD partitioning, so what it lists is what each device runs. A collective in a
``while`` body (or in a computation the body calls, such as the branches of a ``lax.cond``)
runs once per loop iteration; any other runs once per call.

Bytes are those of the collective's result on one device: the full array for an all-reduce,
the gathered array for an all-gather, the tuple for a combined collective. A ring
implementation moves about ``2 (n-1)/n`` times that per device for an all-reduce and
``(n-1)/n`` times for an all-gather, over ``n`` devices.

Scope: the synchronous collectives that XLA:CPU emits (the simulated-device mesh). GPU and TPU
programs split collectives into ``-start``/``-done`` pairs; those are counted at ``-start`` with
the bytes of its whole result tuple, an overestimate.
"""

from __future__ import annotations

import re
from collections import Counter
from typing import NamedTuple

KINDS = ("all-reduce", "all-gather", "reduce-scatter", "collective-permute", "all-to-all")

_BYTES = {
  "pred": 1,
  "s8": 1,
  "u8": 1,
  "bf16": 2,
  "f16": 2,
  "s16": 2,
  "u16": 2,
  "f32": 4,
  "s32": 4,
  "u32": 4,
  "f64": 8,
  "s64": 8,
  "u64": 8,
  "c64": 8,
  "c128": 16,
}

_HEADER = re.compile(r"^(?:ENTRY )?%?([\w.\-]+) .*\{\s*$")
_INSTR = re.compile(r"=\s*(?P<shape>.*?)\s+(?P<kind>" + "|".join(KINDS) + r")(?P<start>-start)?\(")
_ARRAY = re.compile(r"\b(" + "|".join(_BYTES) + r")\[([\d,]*)\]")
_CALLS = re.compile(
  r"\b(?:calls|to_apply|body|condition|true_computation|false_computation)=%?([\w.\-]+)"
)
_BRANCHES = re.compile(r"branch_computations=\{([^}]*)\}")
_WHILE_BODY = re.compile(r"\swhile\(.*\bbody=%?([\w.\-]+)")


class Collective(NamedTuple):
  """One collective instruction of a compiled program.

  Attributes:
    kind: ``"all-reduce"``, ``"all-gather"``, ``"reduce-scatter"``,
      ``"collective-permute"`` or ``"all-to-all"``.
    shapes: the result's arrays as ``(dtype, dims)``, several for a combined collective.
    bytes: bytes of the result on one device.
    in_loop: whether it runs inside a ``while`` loop (once per iteration).
  """

  kind: str
  shapes: tuple[tuple[str, tuple[int, ...]], ...]
  bytes: int
  in_loop: bool


def parse_shapes(shape: str) -> tuple[tuple[str, tuple[int, ...]], ...]:
  """``"(f32[3,4]{1,0}, pred[])"`` -> ``(("f32", (3, 4)), ("pred", ()))``."""
  return tuple(
    (dtype, tuple(int(d) for d in dims.split(",") if d)) for dtype, dims in _ARRAY.findall(shape)
  )


def _nbytes(shapes) -> int:
  total = 0
  for dtype, dims in shapes:
    n = _BYTES[dtype]
    for d in dims:
      n *= d
    total += n
  return total


def _loop_computations(hlo_text: str) -> tuple[dict[str, list[str]], set[str]]:
  """The program's computations (name -> instruction lines) and those run once per iteration."""
  comps: dict[str, list[str]] = {}
  current = None
  for line in hlo_text.splitlines():
    header = _HEADER.match(line)
    if header and not line.startswith(" "):
      current = header.group(1)
      comps[current] = []
    elif current is not None:
      comps[current].append(line)

  callees: dict[str, set[str]] = {name: set() for name in comps}
  bodies: set[str] = set()
  for name, lines in comps.items():
    for line in lines:
      callees[name].update(_CALLS.findall(line))
      for group in _BRANCHES.findall(line):
        callees[name].update(c.strip().lstrip("%") for c in group.split(","))
      bodies.update(_WHILE_BODY.findall(line))

  in_loop: set[str] = set()
  stack = list(bodies)
  while stack:
    name = stack.pop()
    if name not in in_loop:
      in_loop.add(name)
      stack.extend(callees.get(name, ()))
  return comps, in_loop


def collectives(hlo_text: str) -> list[Collective]:
  """Every collective in ``hlo_text``, in program order, marked in-loop or not."""
  comps, in_loop = _loop_computations(hlo_text)
  found = []
  for name, lines in comps.items():
    for line in lines:
      m = _INSTR.search(line)
      if m:
        shapes = parse_shapes(m.group("shape"))
        found.append(Collective(m.group("kind"), shapes, _nbytes(shapes), name in in_loop))
  return found


def count_instructions(hlo_text: str, opcode: str) -> dict[str, int]:
  """How many ``opcode`` instructions (``"conditional"``, ``"all-reduce"``, ...) the program has.

  ``{"step": n, "iteration": m}``: ``n`` outside any ``while`` loop, ``m`` in loop bodies
  (and the computations they call), which run once per iteration.
  """
  comps, in_loop = _loop_computations(hlo_text)
  pattern = re.compile(r"=\s*.*?\s" + re.escape(opcode) + r"\(")
  out = {"step": 0, "iteration": 0}
  for name, lines in comps.items():
    n = sum(1 for line in lines if pattern.search(line))
    out["iteration" if name in in_loop else "step"] += n
  return out


def summary(found: list[Collective]) -> dict[str, dict[str, int]]:
  """Counts and bytes per kind, split into once per call (``step``) and per loop iteration."""
  out: dict[str, dict[str, int]] = {}
  for where, loop in (("step", False), ("iteration", True)):
    count = Counter(c.kind for c in found if c.in_loop == loop)
    nbytes = Counter()
    for c in found:
      if c.in_loop == loop:
        nbytes[c.kind] += c.bytes
    out[where] = {"count": sum(count.values()), "bytes": sum(nbytes.values())}
    for kind in KINDS:
      if count[kind]:
        out[where][f"{kind}:count"] = count[kind]
        out[where][f"{kind}:bytes"] = nbytes[kind]
  return out
