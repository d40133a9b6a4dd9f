"""`lorakit train` end to end in a subprocess on the real all-MiniLM-L6-v2."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]
POSITIVE = ["great film", "loved it", "wonderful acting", "a delight", "superb story", "so good"]
NEGATIVE = ["terrible film", "hated it", "awful acting", "a bore", "dreadful story", "so bad"]
# The reloaded model recomputes eval_loss over the same rows; fp32 sums in the same order.
RELOAD_ATOL = 1e-6


def _lorakit(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src"), "OMP_NUM_THREADS": "1"}
    return subprocess.run(
        [sys.executable, "-m", "lorakit", "train", *args],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )


def _write_rows(path: Path, rows: list[dict[str, str]]) -> Path:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


def test_train_command_writes_metrics_and_a_loadable_adapter(
    tmp_path: Path, minilm_dir: Path
) -> None:
    transformers = pytest.importorskip("transformers")
    rows = [{"text": t, "label": "pos"} for t in POSITIVE]
    rows += [{"text": t, "label": "neg"} for t in NEGATIVE]
    _write_rows(tmp_path / "train.jsonl", rows)
    _write_rows(tmp_path / "eval.jsonl", rows[::2])
    (tmp_path / "run.yaml").write_text(
        f"model: {minilm_dir}\ntrain_data: train.jsonl\neval_data: eval.jsonl\n"
        "target_modules: query,value\nbatch_size: 4\nmax_steps: 10\nlearning_rate: 1e-3\n"
        "logging_steps: 1\neval_steps: 2\nlora_dropout: 0.0\n"
    )
    result = _lorakit(
        "--config", "run.yaml", "--max-steps", "3", "--output-dir", "out", cwd=tmp_path
    )
    assert result.returncode == 0, result.stderr
    assert "trainable_params" in result.stdout and "best_eval_accuracy" in result.stdout
    out = tmp_path / "out"
    events = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [(e["event"], e["step"]) for e in events] == [
        ("train", 1),
        ("train", 2),
        ("eval", 2),
        ("train", 3),
        ("eval", 3),
    ]  # the flag's 3 steps beat the file's 10
    assert set(events[-1]) == {"event", "step", "eval_loss", "eval_accuracy", "eval_macro_f1"}
    labels = json.loads((out / "labels.json").read_text())
    assert labels == {"neg": 0, "pos": 1}

    from lorakit import PeftModel
    from lorakit.train.data import make_loader, prepare_datasets
    from lorakit.train.evaluation import evaluate

    tokenizer = transformers.AutoTokenizer.from_pretrained(minilm_dir)
    base = transformers.AutoModelForSequenceClassification.from_pretrained(minilm_dir, num_labels=2)
    model = PeftModel.from_pretrained(base, out / "adapter")
    _, evaluation = prepare_datasets(
        tmp_path / "train.jsonl", tokenizer, tmp_path / "eval.jsonl", max_length=512
    )
    assert evaluation is not None
    loader = make_loader(evaluation, tokenizer, batch_size=4, shuffle=False)
    metrics = evaluate(model, loader, "SEQ_CLS", torch.device("cpu"))
    assert metrics["eval_loss"] == pytest.approx(events[-1]["eval_loss"], abs=RELOAD_ATOL)
    assert metrics["eval_accuracy"] == events[-1]["eval_accuracy"]


def test_missing_data_file_prints_the_fix_without_traceback(
    tmp_path: Path, minilm_dir: Path
) -> None:
    result = _lorakit("--model", str(minilm_dir), "--train-data", "nope.jsonl", cwd=tmp_path)
    assert result.returncode == 2
    assert "lorakit train: error: data file 'nope.jsonl' does not exist" in result.stderr
    assert "Traceback" not in result.stderr


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--train-data", "x.jsonl"], "no model given; pass --model"),
        (
            ["--model", "nowhere", "--train-data", "x.jsonl"],
            "model folder nowhere has no config.json",
        ),
        (
            ["--model", "m", "--train-data", "x", "--batch-size", "0"],
            "batch_size = 0 is not allowed",
        ),
        (["--config", "missing.yaml"], "config file missing.yaml does not exist"),
    ],
)
def test_bad_input_exits_2_with_the_fix(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    args: list[str],
    message: str,
) -> None:
    from lorakit.cli import build_parser
    from lorakit.cli.train import run_train

    monkeypatch.chdir(tmp_path)
    assert run_train(build_parser().parse_args(["train", *args])) == 2
    assert message in capsys.readouterr().err
