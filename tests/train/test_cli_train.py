"""`lorakit train` end to end in a subprocess on the real all-MiniLM-L6-v2."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import transformers

from train.cli_support import lorakit_train, read_events, save_tiny_causal_model, write_causal_rows

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
            "--model 'nowhere' is neither a local model folder nor a model id transformers can "
            "resolve",
        ),
        (
            ["--model", ".", "--train-data", "x.jsonl"],
            "model folder . has no config.json; pass a transformers model folder",
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


@pytest.mark.parametrize("load_in_4bit", [False, True], ids=["fp32", "4bit"])
def test_a_hub_model_id_resolves_from_the_offline_cache(tmp_path: Path, load_in_4bit: bool) -> None:
    """``--model org/name`` is read from the Hugging Face cache layout, with the Hub offline."""
    snapshot_hash = "0123456789abcdef0123456789abcdef01234567"
    repo = tmp_path / "hub" / "models--someorg--tiny"
    save_tiny_causal_model(repo / "snapshots" / snapshot_hash)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(snapshot_hash)
    write_causal_rows(tmp_path / "train.jsonl")
    flags = ["--load-in-4bit"] if load_in_4bit else []
    offline = {"HF_HUB_CACHE": str(tmp_path / "hub"), "HF_HUB_OFFLINE": "1"}
    args = ["--model", "someorg/tiny", "--train-data", "train.jsonl", "--max-steps", "2"]
    result = lorakit_train(*args, "--batch-size", "4", *flags, cwd=tmp_path, env=offline)
    assert result.returncode == 0, result.stderr[-3000:]
    assert [event["step"] for event in read_events(tmp_path / "lorakit-output")] == [2]
    adapter = tmp_path / "lorakit-output" / "adapter"
    config = json.loads((adapter / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == "someorg/tiny"

    from lorakit import PeftModel

    # The adapter loads onto the same base, fetched the same way (4-bit when trained so).
    base = transformers.AutoModelForCausalLM.from_pretrained(repo / "snapshots" / snapshot_hash)
    model = PeftModel.from_pretrained(base, adapter)
    assert model.peft_config["default"].r == 8  # lorakit train's default rank
    # q, k, v, o, gate, up, down of 2 blocks; lm_head stays in full precision
    quantized = "someorg/tiny: 14 linear layers in 4 bits (nf4" in result.stderr
    assert quantized == load_in_4bit, result.stderr[-2000:]


def test_an_unknown_hub_id_offline_names_the_fix(tmp_path: Path) -> None:
    write_causal_rows(tmp_path / "train.jsonl")
    offline = {"HF_HUB_CACHE": str(tmp_path / "hub"), "HF_HUB_OFFLINE": "1"}
    result = lorakit_train(
        "--model", "someorg/absent", "--train-data", "train.jsonl", cwd=tmp_path, env=offline
    )
    assert result.returncode == 2
    assert "--model 'someorg/absent' is neither a local model folder nor a model id" in (
        result.stderr
    )
    assert "must already be in the Hugging Face cache (HF_HUB_CACHE)" in result.stderr
    assert "Traceback" not in result.stderr
