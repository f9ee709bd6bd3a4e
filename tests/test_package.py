"""The package builds a wheel and an sdist a package index takes, and the wheel installs and runs.

``python -m build --no-isolation`` (the ``build`` and ``setuptools`` of the dev extra) runs on a
copy of the files the package is made of, so the checkout gets no ``build/`` or ``egg-info``.
"""

from __future__ import annotations

import email
import json
import os
import re
import shutil
import subprocess
import sys
import sysconfig
import tarfile
import zipfile
from pathlib import Path

import pytest

import cgfac_optax

ROOT = Path(__file__).resolve().parents[1]
VERSION = cgfac_optax.__version__


@pytest.fixture(scope="module")
def dist(tmp_path_factory) -> Path:
  src = tmp_path_factory.mktemp("src")
  for name in ("pyproject.toml", "README.md", "LICENSE"):
    shutil.copy(ROOT / name, src / name)
  shutil.copytree(
    ROOT / "cgfac_optax", src / "cgfac_optax", ignore=shutil.ignore_patterns("__pycache__")
  )
  out = tmp_path_factory.mktemp("dist")
  proc = subprocess.run(
    [sys.executable, "-m", "build", "--no-isolation", "--outdir", str(out), str(src)],
    capture_output=True,
    text=True,
    timeout=300,
    check=False,
  )
  assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
  return out


def _sources() -> set[str]:
  return {
    p.relative_to(ROOT).as_posix()
    for p in (ROOT / "cgfac_optax").rglob("*.py")
    if "__pycache__" not in p.parts
  }


def test_wheel_holds_the_package_and_its_metadata(dist):
  wheel = dist / f"cgfac_optax-{VERSION}-py3-none-any.whl"
  with zipfile.ZipFile(wheel) as z:
    names = set(z.namelist())
    meta = email.message_from_bytes(z.read(f"cgfac_optax-{VERSION}.dist-info/METADATA"))
  modules = {n for n in names if not n.startswith(f"cgfac_optax-{VERSION}.dist-info/")}
  assert modules == _sources()  # every module, and nothing else (no tests, no benchmarks)
  assert meta["Name"] == "cgfac_optax" and meta["Version"] == VERSION
  assert meta["Requires-Python"] == ">=3.10"
  assert meta["License-Expression"] == "Apache-2.0"
  assert meta["License-File"] == "LICENSE"
  assert f"cgfac_optax-{VERSION}.dist-info/licenses/LICENSE" in names
  assert meta["Description-Content-Type"] == "text/markdown"
  assert meta.get_payload().strip() == (ROOT / "README.md").read_text().strip()
  classifiers = meta.get_all("Classifier")
  assert "Programming Language :: Python :: 3" in classifiers
  assert any(c.startswith("Development Status ::") for c in classifiers)
  assert meta["Keywords"] and "k-fac" in meta["Keywords"]
  requires = meta.get_all("Requires-Dist")
  for dependency in ("jax", "jaxlib", "optax", "flax", "chex"):
    assert any(re.split(r"[<>=!~;\[ ]", r)[0] == dependency for r in requires), dependency
  assert {"demo", "dev"} <= set(meta.get_all("Provides-Extra"))
  assert not any("orbax" in r and "extra" not in r for r in requires)  # not a runtime dependency


def test_sdist_builds_the_same_package(dist):
  with tarfile.open(dist / f"cgfac_optax-{VERSION}.tar.gz") as tar:
    names = {n.split("/", 1)[1] for n in tar.getnames() if "/" in n}
  assert {"pyproject.toml", "README.md", "LICENSE", "PKG-INFO"} <= names
  assert _sources() <= names


def test_wheel_imports_on_its_own(dist, tmp_path):
  with zipfile.ZipFile(dist / f"cgfac_optax-{VERSION}-py3-none-any.whl") as z:
    z.extractall(tmp_path)
  # The unpacked wheel comes first on the path, before the checkout or an editable install.
  code = (
    f"import sys; sys.path.insert(0, {str(tmp_path)!r}); "
    "import cgfac_optax, cgfac_optax.flax; print(cgfac_optax.__file__)"
  )
  env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
  proc = subprocess.run(
    [sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd=tmp_path, check=False
  )
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert Path(proc.stdout.strip()).resolve().is_relative_to(tmp_path.resolve())


@pytest.mark.slow
def test_wheel_installs_into_a_fresh_venv_and_runs_the_readme_example(dist, tmp_path):
  # A fresh venv with the wheel alone; jax and the other dependencies come from this
  # environment's site-packages through a .pth file, so nothing is downloaded. Directories a .pth
  # file adds are not scanned for .pth files, so this environment's editable install of the
  # checkout (a .pth file and a finder in its site-packages) stays out.
  venv = tmp_path / "venv"
  subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
  python = venv / "bin" / "python"
  wheel = dist / f"cgfac_optax-{VERSION}-py3-none-any.whl"
  pip = [sys.executable, "-m", "pip", "--python", str(python), "install", "--quiet"]
  subprocess.run([*pip, "--no-deps", "--no-index", str(wheel)], check=True)
  purelib = "import sysconfig; print(sysconfig.get_paths()['purelib'])"
  site = Path(subprocess.check_output([python, "-c", purelib], text=True).strip())
  ours = {sysconfig.get_paths()[k] for k in ("purelib", "platlib")}
  (site / "dev-environment.pth").write_text("\n".join(sorted(ours)) + "\n")

  example = re.findall(r"```python\n(.*?)```", (ROOT / "README.md").read_text(), re.S)[0]
  where = "import json, sys, cgfac_optax.flax; print(json.dumps([cgfac_optax.__file__, sys.path]))"
  script = tmp_path / "example.py"
  script.write_text(f"{example}\n{where}\n")
  env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
  proc = subprocess.run(
    [python, str(script)], capture_output=True, text=True, env=env, cwd=tmp_path, timeout=300
  )
  assert proc.returncode == 0, proc.stderr[-3000:]
  package, path = json.loads(proc.stdout.splitlines()[-1])
  assert Path(package).resolve().is_relative_to(site.resolve()), package
  assert not any(p and Path(p).resolve() == ROOT for p in path), path
  first, last = map(float, re.search(r"loss (\S+) -> (\S+)", proc.stdout).groups())
  assert last < 0.5 * first, proc.stdout
