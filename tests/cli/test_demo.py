"""`lorakit demo` (the README's main job) as a real subprocess on the real MiniLM and data.

A quick variant (960 training words, 1 epoch: 30 steps per run) with stdout a pipe, as in a log
or CI: what it says and in which order, and that its closing table agrees with its files.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import transformers

from lorakit import PeftModel

MERGE_ATOL = 1e-4  # fp32 logits of the merged vs the unmerged 6-layer encoder
TRAIN_ROWS = 960
STEPS = TRAIN_ROWS // 32
TIMEOUT_S = 600
# all-linear r=16 on MiniLM: 6 layers x (4 x 16 x (384 + 384) + 2 x 16 x (384 + 1536)) + the
# pooler 16 x (384 + 384), plus the trained classifier head (384 x 2 + 2)
LORA_TRAINABLE = 6 * (4 * 16 * 768 + 2 * 16 * 1920) + 16 * 768 + 770
SAFETENSORS_HEADER_MAX = 64 * 1024  # JSON header of a few hundred tensor names
PROGRESS = re.compile(rf"step (\d+)/{STEPS}  loss \d+\.\d{{4}}  lr \S+  \d+ tokens/s  ETA (\S+)")
TABLE_ROW = re.compile(
    r"\| (LoRA r=16 all-linear|full fine-tuning) \| ([\d.]+)% \| ([\d,]+) \| [\d.]+% \| (\S+) \| "
    r"([\d,]+) B \([\d.]+ MiB\) \| ([\d.]+) s \| (\d+) ms \| \d+ MiB \|"
)


def test_quick_demo_says_what_it_does_as_it_goes_and_its_table_matches_its_files(
    tmp_path: Path, minilm_dir: Path
) -> None:
    output = tmp_path / "out"
    command = [sys.executable, "-m", "lorakit", "demo", "--output-dir", str(output)]
    command += ["--max-train-rows", str(TRAIN_ROWS), "--epochs", "1"]
    with (tmp_path / "stderr.txt").open("w") as stderr:
        # Python's default: stdout into a pipe is block-buffered unless the demo flushes.
        environment = {k: v for k, v in os.environ.items() if k != "PYTHONUNBUFFERED"}
        process = subprocess.Popen(
            command, stdout=subprocess.PIPE, stderr=stderr, text=True, env=environment
        )
        assert process.stdout is not None
        first = process.stdout.readline()
        # The first line comes out (through a pipe) while the demo has not started training:
        # before it imports transformers and loads the model, which take seconds.
        is_running = process.poll() is None
        has_trained = (output / "lora" / "metrics.jsonl").exists()
        rest, _ = process.communicate(timeout=TIMEOUT_S)
    out = first + rest
    assert process.returncode == 0, out + (tmp_path / "stderr.txt").read_text()
    assert first.startswith("lorakit demo: teaching all-MiniLM-L6-v2") and first.endswith("\n")
    assert is_running and not has_trained
    lines = out.splitlines()

    def index(prefix: str, start: int = 0) -> int:
        return next(i for i in range(start, len(lines)) if lines[i].startswith(prefix))

    # Each phase is announced, with its expected time, before it runs.
    phases = [index(f"[{n}/6]") for n in range(1, 7)]
    assert phases == sorted(phases)
    assert "a few s" in lines[phases[0]] and "Importing transformers" in lines[phases[0]]
    for phase, name in ((2, "LoRA r=16 all-linear"), (4, "full fine-tuning")):
        announced = lines[phases[phase]]
        assert f"{name}: {STEPS} steps" in announced and "on an idle 2-core machine" in announced
        # within the run: the measured pace, progress lines, the evaluation, the result
        pace = index("      measured here:", phases[phase])
        progress = [
            match
            for line in lines[phases[phase] : phases[phase + 1]]
            if (match := PROGRESS.fullmatch(line))
        ]
        logged = [int(match.group(1)) for match in progress]
        assert {10, 20, STEPS} <= set(logged) and logged == sorted(logged)
        assert progress[-1].group(2) == "0s"  # the ETA at the last step
        evaluation = index(f"step {STEPS}  eval_loss ", phases[phase])
        done = index(f"      {name} done in ", phases[phase])
        assert phases[phase] < pace < evaluation < done < phases[phase + 1]

    rows = {match.group(1): match for line in lines if (match := TABLE_ROW.fullmatch(line))}
    assert set(rows) == {"LoRA r=16 all-linear", "full fine-tuning"}
    lora, full = rows["LoRA r=16 all-linear"], rows["full fine-tuning"]
    assert lora.group(4) == "lora/adapter/adapter_model.safetensors"
    assert full.group(4) == "full/model/model.safetensors"
    sizes = {}
    for name, row in rows.items():
        saved = output / row.group(4)
        size = int(row.group(5).replace(",", ""))
        assert size == os.path.getsize(saved)
        trainable = int(row.group(3).replace(",", ""))
        # fp32 tensors: 4 bytes per saved parameter, plus the file's header
        assert 4 * trainable <= size <= 4 * trainable + SAFETENSORS_HEADER_MAX, name
        sizes[name] = size
        run = output / row.group(4).split("/")[0]
        events = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
        assert [(e["event"], e["step"]) for e in events] == [
            ("train", 10),
            ("train", 20),
            ("train", STEPS),
            ("eval", STEPS),
        ]
        assert float(row.group(2)) == round(100 * events[-1]["eval_accuracy"], 1)
        summary = json.loads((run / "summary.json").read_text())
        assert summary["trainable_params"] == trainable and summary["steps"] == STEPS
        # the per-step time is a mean over steps 2..STEPS-1 (the last one also evaluates)
        assert float(row.group(7)) / 1000 * (STEPS - 2) <= summary["wall_time_s"]
        assert summary["wall_time_s"] <= float(row.group(6)) + 0.05  # the table rounds to 0.1 s
        assert (run / "training.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert int(lora.group(3).replace(",", "")) == LORA_TRAINABLE
    assert f"{sizes['full fine-tuning'] / sizes['LoRA r=16 all-linear']:.0f}x smaller" in out

    before = float(re.search(r"before training: ([\d.]+)%", out).group(1))  # type: ignore[union-attr]
    assert float(lora.group(2)) > before + 20  # LoRA learned the task in 30 steps
    difference = float(re.search(r"max abs difference ([\d.e+-]+)", out).group(1))  # type: ignore[union-attr]
    assert difference < MERGE_ATOL
    assert (output / "loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    base = transformers.AutoModelForSequenceClassification.from_pretrained(minilm_dir, num_labels=2)
    loaded = PeftModel.from_pretrained(base, output / "lora" / "adapter")
    assert any(p.abs().sum() > 0 for n, p in loaded.named_parameters() if "lora_B" in n)
    full_model = transformers.AutoModelForSequenceClassification.from_pretrained(
        output / "full" / "model"
    )
    assert full_model.config.id2label == {0: "negative", 1: "positive"}


def test_version_flag() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "lorakit", "--version"], capture_output=True, text=True
    )
    assert result.stdout.strip() == "lorakit 0.1.0"
