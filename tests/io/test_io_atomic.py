"""A process killed while saving leaves the previous adapter readable and unchanged.

The saver runs in a subprocess that is SIGKILLed at a chosen point of `save_adapter_files`:
while the weights are half written, between the staged writes and their renames, or (the
stress case) after a fixed delay into a loop of saves.
"""

from __future__ import annotations

import inspect
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import lorakit.io
from lorakit.io import load_adapter_files, save_adapter_files

SOURCE_ROOT = Path(lorakit.io.__file__).resolve().parents[2]
LARGE_ELEMENTS = 2_000_000  # 8 MB per version: a save lasts long enough to be killed inside it
PAUSED_MID_WRITE = "half of the weights written"
PAUSED_BEFORE_RENAME = "between write and rename"
EXIT_TIMEOUT_S = 60
# A fixed delay after the third save starts (not a random one: a run must be repeatable). A
# save of 2 x 8 MB takes tens of milliseconds, so the kill lands inside it or just after it.
KILL_DELAY_S = 0.02


def version(number: int, elements: int) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(number)
    return {
        "base_model.model.a.lora_A.weight": torch.randn(elements, generator=generator),
        "base_model.model.a.lora_B.weight": torch.full((3, 2), float(number)),
    }


SAVER = (
    "import torch\n"
    + inspect.getsource(version)
    + f"""
import sys, time
import lorakit.io.atomic as atomic
import lorakit.io.files as files

directory, mode, elements = sys.argv[1], sys.argv[2], int(sys.argv[3])
if mode == "pause-mid-write":
    from safetensors.torch import save
    def half_written(tensors, path, metadata=None):
        data = save(tensors, metadata=metadata)
        with open(path, "wb") as file:
            file.write(data[: len(data) // 2])
            file.flush()
        print({PAUSED_MID_WRITE!r}, flush=True)
        time.sleep(600)
    files.save_file = half_written
    files.save_adapter_files(directory, "default", version(1, elements), {{"r": 8}})
elif mode == "pause-before-rename":
    def pause(*args):
        print({PAUSED_BEFORE_RENAME!r}, flush=True)
        time.sleep(600)
    atomic.os.replace = pause
    files.save_adapter_files(directory, "default", version(1, elements), {{"r": 8}})
else:
    for step in range(10_000):
        print(f"saving {{step}}", flush=True)
        files.save_adapter_files(directory, "default", version(1 + step % 2, elements), {{"r": 4}})
"""
)


def _start_saver(directory: Path, mode: str, elements: int) -> subprocess.Popen[str]:
    paths = [str(SOURCE_ROOT), os.environ.get("PYTHONPATH", "")]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, paths))}
    command = [sys.executable, "-c", SAVER, str(directory), mode, str(elements)]
    return subprocess.Popen(command, stdout=subprocess.PIPE, text=True, env=env)


def _wait_for_line(process: subprocess.Popen[str], expected: str) -> None:
    assert process.stdout is not None
    for line in process.stdout:
        if line.strip() == expected:
            return
    raise AssertionError(f"saver exited with {process.wait()} before printing {expected!r}")


def _kill(process: subprocess.Popen[str]) -> None:
    process.send_signal(signal.SIGKILL)
    assert process.wait(timeout=EXIT_TIMEOUT_S) == -signal.SIGKILL


def _same(loaded: dict[str, torch.Tensor], expected: dict[str, torch.Tensor]) -> bool:
    return loaded.keys() == expected.keys() and all(
        torch.equal(loaded[key], expected[key]) for key in expected
    )


@pytest.mark.parametrize(
    ("mode", "paused", "staged_files"),
    [
        ("pause-mid-write", PAUSED_MID_WRITE, ["adapter_model.safetensors"]),
        (
            "pause-before-rename",
            PAUSED_BEFORE_RENAME,
            ["adapter_config.json", "adapter_model.safetensors"],
        ),
    ],
    ids=["mid-write", "before-rename"],
)
def test_killed_while_saving_keeps_previous(
    tmp_path: Path, mode: str, paused: str, staged_files: list[str]
) -> None:
    previous = version(0, elements=10)
    save_adapter_files(tmp_path, "default", previous, {"r": 4, "version": 0})
    saver = _start_saver(tmp_path, mode, elements=1000)
    _wait_for_line(saver, paused)
    _kill(saver)

    loaded, config = load_adapter_files(tmp_path)
    assert _same(loaded, previous)
    assert config == {"r": 4, "version": 0, "peft_type": "LORA", "inference_mode": True}
    (staging,) = [path for path in tmp_path.iterdir() if path.name.endswith(".tmp")]
    # What the killed save had staged proves the kill landed inside it.
    assert sorted(path.name for path in staging.iterdir()) == staged_files


def test_killed_at_a_random_moment_leaves_one_whole_version(tmp_path: Path) -> None:
    versions = {number: version(number, LARGE_ELEMENTS) for number in range(3)}
    save_adapter_files(tmp_path, "default", versions[0], {"r": 4})
    saver = _start_saver(tmp_path, "loop", LARGE_ELEMENTS)
    _wait_for_line(saver, "saving 2")
    time.sleep(KILL_DELAY_S)
    _kill(saver)

    loaded, config = load_adapter_files(tmp_path)
    assert any(_same(loaded, expected) for expected in versions.values())
    assert config["r"] == 4
