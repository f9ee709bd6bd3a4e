"""The generated results page of the benchmarks (``docs/benchmarks_page.py``).

The committed page and its figures are what the script makes from the committed JSON; and the
script reads what the benchmark scripts write: tiny results in their formats (the summary made
by the harness's own :func:`summarize`), with expected files missing and one not readable.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "docs"))
sys.path.insert(0, str(ROOT / "benchmarks"))

import benchmarks_page  # noqa: E402
import harness  # noqa: E402


def _files(folder: Path) -> dict[str, bytes]:
  return {
    p.relative_to(folder).as_posix(): p.read_bytes() for p in folder.rglob("*") if p.is_file()
  }


def test_committed_page_is_what_the_script_makes_from_the_committed_results(tmp_path):
  page, static = tmp_path / "benchmarks_results.md", tmp_path / "_static" / "benchmarks"
  benchmarks_page.write(benchmarks_page.RESULTS, page, static)
  assert page.read_text() == benchmarks_page.PAGE.read_text(), "run `make benchmarks-page`"
  assert _files(static) == _files(benchmarks_page.STATIC), "run `make benchmarks-page`"


def _run(seed: int, losses: list[float], accuracy: list[float] | None = None) -> dict:
  curve = {"time": [0.0, 0.1, 0.2], "steps": [0, 5, 10], "loss": losses}
  if accuracy is not None:
    curve["accuracy"] = accuracy
  return {
    "curve": curve,
    "steps": 10,
    "wall_s": 0.2,
    "step_s_mean": 0.02,
    "diverged": False,
    "seed": seed,
    "settings": {},
    "compile_s": 1.5,
  }


def _time_to_target(task: str, accuracy: bool) -> dict:
  """A time_to_target.py result in the format it writes, summarized by the harness."""
  acc = (lambda *a: list(a)) if accuracy else (lambda *a: None)
  optimizers = {
    "adam": {"tuning": None, "settings": {"learning_rate": 1e-3}, "runs": []},
    "cgfac": {"tuning": None, "settings": {}, "runs": []},
  }
  for seed in (0, 1):
    optimizers["adam"]["runs"].append(_run(seed, [3.0, 2.5, 2.0], acc(0.1, 0.5, 0.6)))
    optimizers["cgfac"]["runs"].append(_run(seed, [3.0, 1.5, 1.0], acc(0.1, 0.7, 0.8)))
  summary = harness.summarize(optimizers, 0.5)
  settings = {n: harness.brief(o["settings"]) for n, o in optimizers.items()}
  return {
    "environment": {**harness.environment(), "load_average_end": [1.5, 1.0, 0.5]},
    "settings": {"tasks": [task], "budget": 0.5, "seeds": 2, "tune": False, "out": "/x"},
    "task": {
      "description": f"tiny {task}",
      "loss": "squared_error",
      "batch_size": 8,
      "examples": {"train": 64, "eval": 16},
      "optimizers": optimizers,
      "summary": summary,
      "tables": {"loss": harness.table(summary, settings, 0.5)},
    },
  }


def _step_breakdown() -> dict:
  step = lambda s, r: {"step_s": s, "ratio_to_adam": r, "first_step_s": 2.0, "times_s": [s]}
  return {
    "environment": harness.environment(),
    "tasks": {
      "autoencoder": {
        "description": "tiny autoencoder",
        "steps": {"adam": step(0.01, 1.0), "cgfac": step(0.03, 3.0)},
        "parts": {"stats_pass": {"call_s": 0.004, "gflop": 0.25, "times_s": [0.004]}},
      }
    },
  }


def test_the_script_reads_what_the_benchmarks_write(tmp_path, capsys):
  results = tmp_path / "results"
  for rel, payload in {
    "autoencoder/time_to_target.json": _time_to_target("autoencoder", accuracy=False),
    "resnet/time_to_target.json": _time_to_target("resnet", accuracy=True),
    "step_breakdown/step_breakdown.json": _step_breakdown(),
    "scaling/scaling.json": {
      "environment": harness.environment(),
      "settings": {"rows": [64, 256], "iters": 10, "tiny": True},
      "tables": ["### Training step\n\n| optimizer | ms |\n|---|---|\n| adam | 0.7 |"],
    },
  }.items():
    (results / rel).parent.mkdir(parents=True, exist_ok=True)
    (results / rel).write_text(json.dumps(payload))
  (results / "autoencoder" / "time_to_target.png").write_bytes(b"\x89PNG tiny")
  (results / "broken.json").write_text("{not json")
  page, static = tmp_path / "docs" / "page.md", tmp_path / "docs" / "_static" / "benchmarks"

  assert (
    benchmarks_page.main(["--results", str(results), "--page", str(page), "--static", str(static)])
    == 0
  )
  text = page.read_text()
  printed = capsys.readouterr().out
  # The task without results is named, on the page and on the terminal.
  assert "- `transformer/time_to_target.json`" in text
  assert f"missing: {results / 'transformer' / 'time_to_target.json'}" in printed
  assert "autoencoder/time_to_target.json" not in printed
  # Each optimizer's best loss, step time, steps, compile time, and the time to each peer's best.
  assert "#### tiny autoencoder (`autoencoder/time_to_target.json`)" in text
  assert "| `cgfac` | defaults | 1 [1, 1] | 20 | 10 | 1.5 | 0/2 |" in text
  assert "| `cgfac` | 0.20x, 5 steps (2/2) |  |" in text  # cgfac reaches Adam's 2.0 at 0.1 s
  assert "| `adam` |  | not reached (0/2) |" in text
  assert "best accuracy: median [min, max]" in text and "Time to each peer's best accuracy" in text
  assert (
    "load average" in text
    and "Command: `python benchmarks/time_to_target.py --tasks autoencoder" in text
  )
  # The step breakdown, another script's stored table, and the file that cannot be read.
  assert "| `cgfac` | 30 | 3 | - | 2 |" in text and "| `stats_pass` | 4 | 0.25 |" in text
  assert "| adam | 0.7 |" in text and "**Training step**" in text
  assert "Command: `python benchmarks/scaling.py --rows 64 256 --iters 10 --tiny`" in text
  assert "#### `broken.json`" in text and "Not readable" in text
  # The figure is copied next to the page and shown with its results.
  assert (static / "autoencoder" / "time_to_target.png").read_bytes() == b"\x89PNG tiny"
  assert "](_static/benchmarks/autoencoder/time_to_target.png)" in text
