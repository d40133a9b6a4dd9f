"""Installing lorakit: a plain install imports, and the set-up commands are reproducible.

A fresh virtual environment (no system site packages) gets lorakit the normal way, so pip
resolves the dependencies pyproject.toml declares and nothing else, then imports every module
of the package. The README's two set-up commands and .ci/run install through one constraints
file, which pins everything ``lorakit[test,demo]`` pulls in.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from importlib import metadata
from pathlib import Path

import pytest
import tomllib
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
CI_RUN = ROOT / ".ci" / "run"
CONSTRAINTS = "constraints.txt"
# The CPU build that lies on disk (pip's find-links); any other build is a multi-GB download.
TORCH_PIN = "torch==2.13.0"
# Modules documented as needing an extra, with the extra their ImportError must name. None
# does: transformers, matplotlib, bitsandbytes, PyYAML and tqdm are imported inside the
# functions that use them, so every module imports with the declared dependencies alone.
MODULES_NEEDING_AN_EXTRA: dict[str, str] = {}
# Runs the command-line entry point when imported; checked by running `lorakit --help`.
ENTRY_POINT_MODULE = "lorakit.__main__"
# Optional packages a plain install must not bring (so the imports above prove something).
EXTRAS_ONLY = ["transformers", "matplotlib", "bitsandbytes", "peft", "yaml", "tqdm"]


# Run in the fresh environment (stdlib only: `packaging` is not installed there): which
# distributions are there, whether each is reachable from lorakit's own requirements (no
# extras), whether the optional packages can be found, and what importing every module gives.
def _probe_source() -> str:
    return r"""
import importlib, importlib.util, json, pkgutil, re, sys
from importlib import metadata

def canonical(name):
    return re.sub(r"[-_.]+", "-", name).lower()

def unconditional(requirement):
    # 'name (>=1); marker' -> name, or None when the marker names an extra (optional).
    text, _, marker = requirement.partition(";")
    if "extra" in marker:
        return None
    return canonical(re.match(r"\s*([A-Za-z0-9_.-]+)", text).group(1))

installed = {canonical(d.metadata["Name"]): d for d in metadata.distributions()}
reachable, todo = set(), ["lorakit"]
while todo:
    name = todo.pop()
    if name in reachable or name not in installed:
        continue
    reachable.add(name)
    todo += [n for n in map(unconditional, installed[name].requires or []) if n]

import lorakit
modules = {}
for info in pkgutil.walk_packages(lorakit.__path__, "lorakit."):
    if info.name == sys.argv[1]:
        continue
    try:
        importlib.import_module(info.name)
        modules[info.name] = "ok"
    except Exception as error:
        modules[info.name] = f"{type(error).__name__}: {error}"
print(json.dumps({
    "installed": sorted(installed),
    "reachable": sorted(reachable),
    "present": {m: importlib.util.find_spec(m) is not None for m in sys.argv[2:]},
    "modules": modules,
    "lorakit_file": lorakit.__file__,
}))
"""


def _copy_package(destination: Path) -> Path:
    """The files a build reads (pyproject.toml, README.md, src/), without build leftovers."""
    destination.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy2(ROOT / name, destination / name)
    leftovers = shutil.ignore_patterns("__pycache__", "*.egg-info", "*.pyc")
    shutil.copytree(ROOT / "src", destination / "src", ignore=leftovers)
    return destination


def _run(command: list[str], timeout: float, **kwargs: object) -> subprocess.CompletedProcess:
    result = subprocess.run(command, capture_output=True, text=True, timeout=timeout, **kwargs)
    shown = " ".join(part if len(part) < 200 else "<script>" for part in command)
    assert result.returncode == 0, f"{shown}\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
    return result


@pytest.mark.slow
def test_plain_install_in_a_fresh_venv_imports_every_module(tmp_path: Path) -> None:
    """`pip install lorakit` with no extras: every module imports; the extras are absent.

    About 30 s here: the venv itself is instant (no pip inside; the running pip targets it),
    installing the torch wheel from disk is most of it (--no-compile skips byte-compiling
    torch's thousands of files, ~25 s more).
    """
    venv = tmp_path / "venv"
    try:
        _run([sys.executable, "-m", "venv", "--without-pip", str(venv)], timeout=120)
        config = (venv / "pyvenv.cfg").read_text()
        assert "include-system-site-packages = false" in config
        python = venv / "bin" / "python"
        package = _copy_package(tmp_path / "lorakit-src")
        install = [sys.executable, "-m", "pip", "--python", str(python), "install"]
        _run(
            [*install, "--no-compile", TORCH_PIN, str(package), "-c", str(ROOT / CONSTRAINTS)],
            timeout=900,
        )
        probe = _run(
            [str(python), "-c", _probe_source(), ENTRY_POINT_MODULE, *EXTRAS_ONLY],
            timeout=300,
            cwd=tmp_path,  # not the repository: its src/ must not shadow the installed copy
        )
        report = json.loads(probe.stdout.splitlines()[-1])
        assert report["lorakit_file"].startswith(str(venv))
        # Only lorakit and what its own requirements (no extras) pull in, transitively.
        assert report["installed"] == report["reachable"]
        assert {"lorakit", "torch", "safetensors", "numpy"} <= set(report["installed"])
        assert not any(report["present"].values()), report["present"]
        modules = report["modules"]
        assert "lorakit.ops.dropout" in modules and "lorakit.train.trainer" in modules
        for name, outcome in modules.items():
            extra = MODULES_NEEDING_AN_EXTRA.get(name)
            if extra is None:
                assert outcome == "ok", f"{name}: {outcome}"
            else:
                assert outcome.startswith(("ImportError", "ModuleNotFoundError")), name
                assert f"lorakit[{extra}]" in outcome, f"{name}: {outcome}"
        help_text = _run([str(venv / "bin" / "lorakit"), "--help"], timeout=120).stdout
        assert help_text.startswith("usage: lorakit")
        # A command that needs an extra says which, in one line and with status 2.
        inspect = subprocess.run(
            [str(venv / "bin" / "lorakit"), "inspect", "some/model"],
            capture_output=True,
            text=True,
            timeout=120,
            cwd=tmp_path,
        )
        assert inspect.returncode == 2, inspect.stderr
        assert 'pip install "lorakit[transformers]"' in inspect.stderr
        assert "Traceback" not in inspect.stderr
        _run([str(python), "-c", _DROPOUT_STEP], timeout=300, cwd=tmp_path)
    finally:
        shutil.rmtree(venv, ignore_errors=True)  # ~1 GB, mostly torch


# LoRA dropout on a plain torch model in the fresh environment: the CPU mask path (numpy's
# SFC64 bits, packed masks) with the numpy that pip resolved.
_DROPOUT_STEP = r"""
import torch
from torch import nn
import lorakit
from lorakit.ops.dropout import drop_mask
torch.manual_seed(0)
model = lorakit.get_peft_model(
    nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 4)),
    lorakit.LoraConfig(r=4, lora_dropout=0.5, target_modules=["0"], init_lora_weights=False),
)
x = torch.randn(32, 64)
model.train()
assert not torch.equal(model(x), model(x))  # a fresh mask every forward
model.eval()
assert torch.equal(model(x), model(x))  # no dropout outside training
model.train()
model(x).square().sum().backward()
grad = model.get_base_model()[0].lora_A["default"].weight.grad
assert grad is not None and bool(torch.isfinite(grad).all()) and float(grad.abs().sum()) > 0
# 200k Bernoulli(0.3) draws: standard error 0.001, so 5 sigma is 0.005.
rate = drop_mask((400, 500), 0.3, 1, torch.device("cpu")).double().mean().item()
assert abs(rate - 0.3) < 0.005, rate
"""


def _bash_commands(text: str) -> list[str]:
    return [block.strip() for block in re.findall(r"```bash\n(.*?)```", text, flags=re.DOTALL)]


def _ci_install_and_test_line() -> str:
    lines = [line.strip() for line in CI_RUN.read_text().splitlines()]
    matches = [line for line in lines if "pytest" in line and not line.startswith("#")]
    assert len(matches) == 1, matches
    return matches[0]


def test_readme_and_ci_run_the_same_test_command() -> None:
    """The README's test command is .ci/run's, character for character, constraints included."""
    commands = _bash_commands(README.read_text())
    test_commands = [command for command in commands if "pytest" in command]
    assert test_commands == [_ci_install_and_test_line()]


@pytest.mark.parametrize("index", [0, 1], ids=["demo", "test"])
def test_setup_commands_pin_torch_and_use_the_constraints_file(index: int) -> None:
    command = _bash_commands(README.read_text())[index]
    install = next(
        part.split() for part in command.split("&&") if part.split()[:2] == ["pip", "install"]
    )
    assert install[:3] == ["pip", "install", TORCH_PIN]
    assert install[-2:] == ["-c", CONSTRAINTS]


def _pins() -> dict[str, str]:
    pins = {}
    for line in (ROOT / CONSTRAINTS).read_text().splitlines():
        if line.strip() and not line.startswith("#"):
            name, version = line.split("==")
            pins[canonicalize_name(name)] = version
    return pins


def test_constraints_pin_everything_the_test_and_demo_extras_install() -> None:
    """Each distribution lorakit[test,demo] requires, transitively, has an exact pin.

    Walks the installed packages' metadata from pyproject.toml's requirements: a new test or
    demo dependency (or a new dependency of one) without a pin fails here.
    """
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    extras = project["optional-dependencies"]
    todo = [Requirement(text) for text in [*project["dependencies"], *extras["test"]]]
    todo += [Requirement(text) for text in extras["demo"]]
    pins, seen = _pins(), set()
    while todo:
        requirement = todo.pop()
        name = canonicalize_name(requirement.name)
        if name in seen:
            continue
        seen.add(name)
        try:
            requires = metadata.distribution(requirement.name).requires or []
        except metadata.PackageNotFoundError:
            pytest.fail(f"{requirement.name} is required but not installed here")
        for text in requires:
            dependency = Requirement(text)
            wanted = set(requirement.extras) | {""}
            marker = dependency.marker
            if marker is None or any(marker.evaluate({"extra": extra}) for extra in wanted):
                todo.append(dependency)
    seen.discard("torch")  # pinned on the command line
    assert sorted(seen - set(pins)) == []
    assert all(re.fullmatch(r"[0-9][0-9A-Za-z.+-]*", version) for version in pins.values())
