"""`lorakit.io.atomic`: a write that fails midway leaves the old file or folder, and no temp.

Failures are injected where they hurt: a writer that raises after writing part of its
content, and an `os.replace` that raises. Durability is checked at the system calls: the new
content is `fsync`ed before the rename and the folder after it.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

import pytest

from lorakit.io import atomic
from lorakit.io.atomic import (
    remove_folder,
    replace_files,
    replace_folder,
    write_file,
    write_text,
)

OLD, NEW = "old content\n", "new content, longer than the old one\n"


class InjectedFault(RuntimeError):
    """The failure a test injects; nothing else raises it."""


def _entries(folder: Path) -> list[str]:
    """Every path under `folder`, relative, sorted (temporaries included: they start with .)."""
    return sorted(str(path.relative_to(folder)) for path in folder.rglob("*"))


def _write_half_then_fail(text: str) -> Callable[[Path], None]:
    def write(path: Path) -> None:
        with path.open("w", encoding="utf-8") as handle:
            handle.write(text[: len(text) // 2])
            handle.flush()
        raise InjectedFault("writer died midway")

    return write


def _failing_replace(monkeypatch: pytest.MonkeyPatch, fail_on_call: int) -> list[str]:
    """Makes the `fail_on_call`-th `os.replace` (1-based) raise; returns the targets renamed."""
    real_replace = os.replace
    targets: list[str] = []

    def replace(source: os.PathLike[str] | str, target: os.PathLike[str] | str) -> None:
        if len(targets) + 1 == fail_on_call:
            targets.append(f"failed: {Path(target).name}")
            raise InjectedFault(f"rename to {target} failed")
        targets.append(Path(target).name)
        real_replace(source, target)

    monkeypatch.setattr(os, "replace", replace)
    return targets


def test_write_text_replaces_the_content_and_creates_the_folder(tmp_path: Path) -> None:
    target = tmp_path / "new" / "folder" / "summary.json"
    assert write_text(target, NEW) == target
    assert target.read_text(encoding="utf-8") == NEW
    write_text(target, OLD)
    assert target.read_text(encoding="utf-8") == OLD
    assert _entries(tmp_path / "new") == ["folder", "folder/summary.json"]


def test_a_writer_failing_midway_keeps_the_old_file_and_no_temp(tmp_path: Path) -> None:
    target = tmp_path / "summary.json"
    target.write_text(OLD, encoding="utf-8")
    with pytest.raises(InjectedFault, match=r"writer died midway"):
        write_file(target, _write_half_then_fail(NEW))
    assert target.read_text(encoding="utf-8") == OLD
    assert _entries(tmp_path) == ["summary.json"]


def test_a_failed_rename_keeps_the_old_file_and_no_temp(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    target = tmp_path / "labels.json"
    target.write_text(OLD, encoding="utf-8")
    _failing_replace(monkeypatch, fail_on_call=1)
    with pytest.raises(InjectedFault, match=r"rename to .*labels\.json failed"):
        write_text(target, NEW)
    assert target.read_text(encoding="utf-8") == OLD
    assert _entries(tmp_path) == ["labels.json"]


def test_a_failed_first_write_leaves_no_file(tmp_path: Path) -> None:
    with pytest.raises(InjectedFault, match=r"writer died midway"):
        write_file(tmp_path / "training.png", _write_half_then_fail(NEW))
    assert _entries(tmp_path) == []


@pytest.mark.skipif(os.name == "nt", reason="folders are not fsynced on Windows")
def test_the_content_is_synced_before_the_rename_and_the_folder_after(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls: list[tuple[str, int]] = []  # ("fsync", inode) or ("replace", inode of the source)
    real_fsync, real_replace = os.fsync, os.replace

    def fsync(fd: int) -> None:
        calls.append(("fsync", os.fstat(fd).st_ino))
        real_fsync(fd)

    def replace(source: str | os.PathLike[str], target: str | os.PathLike[str]) -> None:
        calls.append(("replace", os.stat(source).st_ino))
        real_replace(source, target)

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "replace", replace)
    target = tmp_path / "summary.json"
    write_text(target, NEW)
    file_inode, folder_inode = target.stat().st_ino, tmp_path.stat().st_ino
    assert calls == [("fsync", file_inode), ("replace", file_inode), ("fsync", folder_inode)]


def _old_adapter(folder: Path) -> None:
    folder.mkdir()
    (folder / "adapter_config.json").write_text(OLD)
    (folder / "adapter_model.safetensors").write_text(OLD)
    (folder / "README.md").write_text("the user's own file")


def test_replace_files_replaces_the_staged_files_and_keeps_the_others(tmp_path: Path) -> None:
    folder = tmp_path / "adapter"
    _old_adapter(folder)
    with replace_files(folder) as staging:
        (staging / "adapter_config.json").write_text(NEW)
        (staging / "adapter_model.safetensors").write_text(NEW)
        (staging / "other").mkdir()
        (staging / "other" / "adapter_config.json").write_text(NEW)
        assert (folder / "adapter_config.json").read_text() == OLD  # nothing moved yet
    assert _entries(folder) == [
        "README.md",
        "adapter_config.json",
        "adapter_model.safetensors",
        "other",
        "other/adapter_config.json",
    ]
    assert (folder / "README.md").read_text() == "the user's own file"
    assert {(folder / name).read_text() for name in _entries(folder)[1:] if name != "other"} == {
        NEW
    }


def test_replace_files_failing_while_staging_changes_nothing(tmp_path: Path) -> None:
    folder = tmp_path / "adapter"
    _old_adapter(folder)
    before = {name: (folder / name).read_text() for name in _entries(folder)}
    with (
        pytest.raises(InjectedFault, match=r"writer died midway"),
        replace_files(folder) as staging,
    ):
        (staging / "adapter_config.json").write_text(NEW)
        _write_half_then_fail(NEW)(staging / "adapter_model.safetensors")
    assert {name: (folder / name).read_text() for name in _entries(folder)} == before


def test_replace_files_failing_among_the_renames_leaves_whole_files(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    folder = tmp_path / "adapter"
    _old_adapter(folder)
    renamed = _failing_replace(monkeypatch, fail_on_call=2)
    failure = pytest.raises(InjectedFault, match=r"adapter_model\.safetensors failed")
    with failure, replace_files(folder) as staging:
        (staging / "adapter_config.json").write_text(NEW)
        (staging / "adapter_model.safetensors").write_text(NEW)
    assert renamed == ["adapter_config.json", "failed: adapter_model.safetensors"]
    assert _entries(folder) == ["README.md", "adapter_config.json", "adapter_model.safetensors"]
    assert (folder / "adapter_config.json").read_text() == NEW
    assert (folder / "adapter_model.safetensors").read_text() == OLD  # old or new, never torn


def test_replace_files_refuses_a_file_as_folder(tmp_path: Path) -> None:
    (tmp_path / "out").write_text(OLD)
    refusal = pytest.raises(FileExistsError, match=r"it is a file, not a folder")
    with refusal, replace_files(tmp_path / "out") as staging:
        (staging / "model.safetensors").write_text(NEW)
    assert (tmp_path / "out").read_text() == OLD


def _old_checkpoint(folder: Path) -> None:
    folder.mkdir(parents=True)
    (folder / "optimizer.pt").write_text(OLD)
    (folder / "stale.txt").write_text(OLD)


def test_replace_folder_swaps_the_whole_folder(tmp_path: Path) -> None:
    target = tmp_path / "checkpoints" / "checkpoint-2"
    _old_checkpoint(target)
    with replace_folder(target) as temp:
        (temp / "optimizer.pt").write_text(NEW)
        (temp / "adapter").mkdir()
        (temp / "adapter" / "adapter_config.json").write_text(NEW)
        assert not (target / "adapter").exists()  # nothing visible before the body ends
    assert _entries(tmp_path) == [
        "checkpoints",
        "checkpoints/checkpoint-2",
        "checkpoints/checkpoint-2/adapter",
        "checkpoints/checkpoint-2/adapter/adapter_config.json",
        "checkpoints/checkpoint-2/optimizer.pt",
    ]  # the old folder's stale.txt went with it
    assert (target / "optimizer.pt").read_text() == NEW


def test_replace_folder_failing_midway_keeps_the_old_folder(tmp_path: Path) -> None:
    target = tmp_path / "checkpoint-2"
    _old_checkpoint(target)
    with pytest.raises(InjectedFault, match=r"writer died midway"), replace_folder(target) as temp:
        (temp / "adapter").mkdir()
        _write_half_then_fail(NEW)(temp / "optimizer.pt")
    assert _entries(tmp_path) == [
        "checkpoint-2",
        "checkpoint-2/optimizer.pt",
        "checkpoint-2/stale.txt",
    ]
    assert (target / "optimizer.pt").read_text() == OLD


def test_replace_folder_failing_rename_puts_the_old_folder_back(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    target = tmp_path / "checkpoint-2"
    _old_checkpoint(target)
    renamed = _failing_replace(monkeypatch, fail_on_call=2)  # 1: old folder away, 2: new in
    with pytest.raises(InjectedFault, match=r"checkpoint-2 failed"), replace_folder(target) as temp:
        (temp / "optimizer.pt").write_text(NEW)
    assert renamed[1] == "failed: checkpoint-2" and atomic.is_temp_name(renamed[0])
    assert _entries(tmp_path) == [
        "checkpoint-2",
        "checkpoint-2/optimizer.pt",
        "checkpoint-2/stale.txt",
    ]
    assert (target / "optimizer.pt").read_text() == OLD


def test_remove_folder_leaves_nothing(tmp_path: Path) -> None:
    _old_checkpoint(tmp_path / "checkpoint-1")
    (tmp_path / "checkpoint-2").mkdir()
    remove_folder(tmp_path / "checkpoint-1")
    assert _entries(tmp_path) == ["checkpoint-2"]
