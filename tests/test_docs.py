"""Every Python example in the README runs, and the core never imports transformers."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

from lorakit.utils import memory

README = Path(__file__).resolve().parents[1] / "README.md"


def _python_blocks(text: str) -> list[str]:
    return re.findall(r"```python\n(.*?)```", text, flags=re.DOTALL)


def test_readme_quickstart_runs() -> None:
    blocks = _python_blocks(README.read_text())
    assert blocks, "README has no python example"
    for block in blocks:
        exec(compile(block, str(README), "exec"), {"__name__": "readme"})


def test_readme_has_exactly_two_setup_commands() -> None:
    commands = re.findall(r"```bash\n(.*?)```", README.read_text(), flags=re.DOTALL)
    assert len(commands) == 2
    assert all("pip install torch==2.13.0" in command for command in commands)


def test_core_does_not_import_transformers() -> None:
    code = (
        "import sys, lorakit, lorakit.layers, lorakit.inject, lorakit.ops.lora;"
        "bad = [m for m in ('transformers', 'peft') if m in sys.modules];"
        "print(bad); sys.exit(1 if bad else 0)"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


DOCS = sorted((README.parent / "docs").glob("*.md"))


def test_docs_python_examples_run(
    tmp_path: Path, minilm_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Each docs/*.md python block runs with a MiniLM classifier, its tokenizer and data files."""
    import json

    import transformers

    rows = [{"text": f"{word} day", "label": label} for word, label in _WORDS] * 4
    for name in ("train.jsonl", "test.jsonl"):
        (tmp_path / name).write_text("\n".join(json.dumps(row) for row in rows))
    monkeypatch.chdir(tmp_path)
    # docs/qlora.md pins glibc's mmap threshold; this worker runs other tests after this one,
    # so the call runs with glibc out of the picture (tests/test_memory_release.py checks it).
    monkeypatch.setattr(memory, "_glibc", lambda: None)
    blocks = [block for doc in DOCS for block in _python_blocks(doc.read_text())]
    assert len(blocks) >= 2
    for block in blocks:
        namespace = {
            "__name__": "docs",
            "tokenizer": transformers.AutoTokenizer.from_pretrained(minilm_dir),
            "base": transformers.AutoModelForSequenceClassification.from_pretrained(
                minilm_dir, num_labels=2
            ),
        }
        exec(compile(block, "docs", "exec"), namespace)


_WORDS = [("good", "positive"), ("great", "positive"), ("bad", "negative"), ("awful", "negative")]
