"""`lorakit serve`'s command line: bad flags are one line and exit status 2, before any serving."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest

from lorakit.cli import build_parser, main

pytest.importorskip("fastapi")


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--adapter", "sql"], r"--adapter 'sql': write NAME=DIR, e.g. --adapter sql=./sql"),
        (["--adapter", "base=x"], r"the name 'base' is taken, choose another"),
        (["--adapter", "a=x", "--adapter", "a=y"], r"the name 'a' is taken"),
        (["--adapter", "a b=x"], r"adapter name 'a b' is not allowed"),
        (["--adapters-root", "missing"], r"--adapters-root missing: not a folder"),
        (["--max-queue", "0"], r"--max-queue must be 1 or more"),
        (["--api-key", ""], r"--api-key \(or \$LORAKIT_API_KEY\) is empty"),
    ],
)
def test_bad_flags_are_one_line_and_status_2(
    flags: list[str],
    message: str,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
    tmp_path: Path,
) -> None:
    monkeypatch.chdir(tmp_path)
    # The flags are checked before the base is read, so any folder will do.
    assert main(["serve", "--base", str(tmp_path), *flags]) == 2
    err = capsys.readouterr().err
    assert err.startswith("lorakit serve: error: ")
    assert len(err.strip().splitlines()) == 1
    assert re.search(message, err), err


def test_a_base_folder_that_is_not_a_model_is_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    (tmp_path / "empty").mkdir()
    assert main(["serve", "--base", str(tmp_path / "empty")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("lorakit serve: error: ") and "Traceback" not in err


def test_the_api_key_comes_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LORAKIT_API_KEY", "from-env")
    assert build_parser().parse_args(["serve", "--base", "b"]).api_key == "from-env"
    given = build_parser().parse_args(["serve", "--base", "b", "--api-key", "flag"])
    assert given.api_key == "flag"
    monkeypatch.delenv("LORAKIT_API_KEY")
    assert build_parser().parse_args(["serve", "--base", "b"]).api_key is None


def test_an_adapter_that_cannot_load_is_one_line_naming_it(
    served_folders: Any, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    flags = ["--adapter", f"sql={served_folders.adapter('sql')}", "--adapter", f"gone={tmp_path}"]
    assert main(["serve", "--base", str(served_folders.base), *flags]) == 2
    err = capsys.readouterr().err  # transformers' loading bar comes first
    assert "Traceback" not in err
    last = err.strip().splitlines()[-1]
    assert last.startswith("lorakit serve: error: ") and str(tmp_path) in last
    assert "adapter_config.json" in last
