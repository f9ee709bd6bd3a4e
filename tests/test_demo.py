"""`make demo` smoke test: a few steps on the 8x8 digits give the table, the PNG and the JSON."""

import json
import pathlib
import runpy
import sys

import pytest

DEMO = pathlib.Path(__file__).resolve().parent.parent / "benchmarks" / "demo.py"


@pytest.mark.parametrize("terminal", [False, True], ids=["log", "terminal"])
def test_demo_smoke(tmp_path, monkeypatch, capsys, terminal):
  out = tmp_path / "results"
  # Progress bars only on a terminal: redrawn into a log or a pipe, they would flood it.
  monkeypatch.setattr(sys.stdout, "isatty", lambda: terminal)
  args = ["--dataset", "digits", "--steps", "3", "--batch-size", "64", "--eval-every", "2"]
  # Run as `make demo` does (the script as __main__), in this process to share its imports.
  monkeypatch.setattr(sys, "argv", [str(DEMO), *args, "--out", str(out)])
  runpy.run_path(str(DEMO), run_name="__main__")
  captured = capsys.readouterr()
  lines = captured.out.splitlines()
  header = next(i for i, line in enumerate(lines) if line.startswith("optimizer"))
  assert "wall s" in lines[header] and "alpha, mu, damping" in lines[header]
  rows = lines[header + 2 : header + 5]
  assert [r.split()[0] for r in rows] == ["CG-FAC", "Adam", "Muon"]
  assert all(r[14:20].strip() == "3" for r in rows)  # the steps column
  alpha, mu, damping = (float(v) for v in rows[0].split("   ")[-1].split(", "))
  assert alpha > 0 and damping > 0  # the quadratic model chose a step
  assert rows[1].rstrip().endswith("-") and rows[2].rstrip().endswith("-")
  if terminal:
    assert "100%" in captured.err  # the progress bars ran to the end
  else:
    assert "it/s" not in captured.err and "100%" not in captured.err, captured.err
  png = out / "demo.png"
  assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
  results = json.loads((out / "demo.json").read_text())["results"]
  assert [r["steps"] for r in results] == [3, 3, 3]
  assert len(results[0]["history"]["train_loss"]) == 3  # initial, after step 2, after step 3
