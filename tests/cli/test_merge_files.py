"""`lorakit merge` writes its output folder atomically and leaves no stale weights in it."""

from __future__ import annotations

import re
import shutil
from pathlib import Path

import pytest
import torch

from lorakit import LoraConfig, get_peft_model
from lorakit.cli import main
from lorakit.io.atomic import is_temp_name
from tiny_models import tiny_llama, token_batch

MERGE_ATOL = 1e-5  # fp32 merged weights vs the two-matmul path
STALE_WEIGHTS = ["model-00001-of-00002.safetensors", "model.safetensors.index.json"]


def _base_and_adapter(tmp_path: Path) -> tuple[Path, Path, torch.Tensor]:
    base = tiny_llama()
    base.save_pretrained(tmp_path / "base")
    torch.manual_seed(0)
    config = LoraConfig(
        r=4, target_modules=["q_proj"], init_lora_weights=False, task_type="CAUSAL_LM"
    )
    model = get_peft_model(base, config)
    model.save_pretrained(tmp_path / "adapter")
    with torch.no_grad():
        expected = model(token_batch()).logits
    return tmp_path / "base", tmp_path / "adapter", expected


def _merge(base: Path, adapter: Path, out: Path) -> int:
    return main(["merge", "--base", str(base), "--adapter", str(adapter), "--out", str(out)])


def _old_output(out: Path) -> dict[str, bytes]:
    out.mkdir()
    for name in [*STALE_WEIGHTS, "config.json", "notes.txt"]:
        (out / name).write_text(f"old {name}")
    return {path.name: path.read_bytes() for path in out.iterdir()}


def test_merge_replaces_stale_weights_and_keeps_other_files(tmp_path: Path) -> None:
    transformers = pytest.importorskip("transformers")
    base, adapter, expected = _base_and_adapter(tmp_path)
    out = tmp_path / "merged"
    _old_output(out)
    assert _merge(base, adapter, out) == 0
    names = sorted(path.name for path in out.iterdir())
    assert not set(STALE_WEIGHTS) & set(names)  # transformers would otherwise read the index
    assert "model.safetensors" in names and not any(is_temp_name(name) for name in names)
    assert (out / "notes.txt").read_text() == "old notes.txt"
    merged = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
    with torch.no_grad():
        torch.testing.assert_close(merged(token_batch()).logits, expected, atol=MERGE_ATOL, rtol=0)


def test_merge_failing_midway_leaves_the_old_output(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    base, adapter, _ = _base_and_adapter(tmp_path)
    (base / "tokenizer.json").write_text("{}")  # copied after the model is written
    out = tmp_path / "merged"
    before = _old_output(out)

    def fail(*args: object, **kwargs: object) -> None:
        raise OSError("disk full while copying tokenizer.json")

    monkeypatch.setattr(shutil, "copy2", fail)
    assert _merge(base, adapter, out) == 2  # the command reports the error and exits 2
    assert re.search(r"error: disk full while copying tokenizer\.json", capsys.readouterr().err)
    assert {path.name: path.read_bytes() for path in out.iterdir()} == before
