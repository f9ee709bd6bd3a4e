"""`make demo` in seconds: ``benchmarks/demo.py --tiny --seconds 1`` prints the table and what
CG-FAC reached, writes the PNG and the JSON, and shows progress only on a terminal."""

import json
import pathlib
import runpy
import sys

DEMO = pathlib.Path(__file__).resolve().parent.parent / "benchmarks" / "demo.py"
NAMES = ["CG-FAC", "Adam", "Muon"]


def test_demo_tiny(tmp_path, monkeypatch, capsys):
  out = tmp_path / "results"
  # Run as `make demo` does (the script as __main__), in this process to share its imports;
  # stdout is captured, not a terminal: no progress lines.
  monkeypatch.setattr(sys, "argv", [str(DEMO), "--tiny", "--seconds", "1", "--out", str(out)])
  monkeypatch.syspath_prepend(str(DEMO.parent))
  runpy.run_path(str(DEMO), run_name="__main__")
  printed = capsys.readouterr().out
  assert "\r" not in printed and "evaluation" not in printed
  lines = printed.splitlines()
  assert lines[0].startswith("device ") and "jax" in lines[1]
  header = next(i for i, line in enumerate(lines) if line.startswith("| optimizer |"))
  assert [f"to {n}'s best" in lines[header] for n in NAMES] == [True] * 3
  rows = [line.split(" | ") for line in lines[header + 2 : header + 5]]
  assert [r[0] for r in rows] == [f"| {n}" for n in NAMES]
  assert rows[0][1] == "defaults"  # CG-FAC as cgfac() comes
  got = next(line for line in lines if line.startswith("got: CG-FAC reached "))
  assert "Adam's best" in got and "Muon's best" in got
  assert (out / "demo.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
  record = json.loads((out / "demo.json").read_text())
  assert list(record["summary"]) == list(record["runs"]) == NAMES
  for name in NAMES:
    (run,) = record["runs"][name]["runs"]
    assert run["steps"] > 0 and run["curve"]["steps"][-1] == run["steps"]
    assert record["summary"][name]["steps_median"] == run["steps"]
  assert set(record["summary"]["CG-FAC"]["reaches_loss"]) == {"Adam", "Muon"}


def test_demo_progress_is_shown_on_a_terminal_only(monkeypatch, capsys):
  monkeypatch.syspath_prepend(str(DEMO.parent))
  import demo

  evaluate = lambda carry: {"loss": 0.5 * carry}
  monkeypatch.setattr(sys.stdout, "isatty", lambda: False)
  assert demo.progress("CG-FAC", evaluate) is evaluate
  monkeypatch.setattr(sys.stdout, "isatty", lambda: True)
  shown = demo.progress("CG-FAC", evaluate)
  assert shown(3) == {"loss": 1.5} and shown(1) == {"loss": 0.5}
  assert (
    capsys.readouterr().out
    == "\r  CG-FAC: evaluation 1, loss 1.5\r  CG-FAC: evaluation 2, loss 0.5"
  )
