"""``strategy="fsdp"``: real ``torchrun`` launches (2 processes, gloo on CPU) with FSDP2.

The worker and the bounded launches are ``distributed_launch.py``'s, as for the DDP tests: the
same tiny Llama, data, seed and global batch (per-rank batch 2 x 2 ranks x 2 accumulated).
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

from lorakit.train import TrainConfig, TrainConfigError
from lorakit.train.fsdp import transformer_blocks
from lorakit.train.train_errors import DistributedSetupError
from train.distributed_launch import BASE_OPTIONS, BYTES_FILE, read_adapter, run_worker

# FSDP2 and DDP run the same float32 sums on CPU (this test sees them equal bit for bit); the
# issue's bound leaves room for other reduction orders (nccl's ring, other world sizes).
MATCH_DDP_ATOL = 1e-4
FSDP = {"strategy": "fsdp"}


@pytest.fixture(scope="module")
def fsdp_run(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """A 2-rank FSDP run with checkpoints every 2 steps, counting reduce-scattered bytes.

    With gradient checkpointing (reentrant) inside the sharded blocks, and an evaluation at the
    end (every rank runs it: each forward all-gathers the weights).
    """
    output_dir = tmp_path_factory.mktemp("fsdp")
    options = {"count_bytes": True, "gradient_checkpointing": True, "evaluate": True}
    run_worker(output_dir, 2, **FSDP, **options)
    yield output_dir


@pytest.fixture(scope="module")
def ddp_run(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    output_dir = tmp_path_factory.mktemp("ddp")
    run_worker(output_dir, 2, save_steps=None, evaluate=True)
    yield output_dir


def _logits(adapter_dir: Path | None) -> torch.Tensor:
    """Logits of a fresh single-process base, with the saved adapter loaded (lorakit) if given."""
    from lorakit import PeftModel
    from tiny_models import tiny_llama
    from train.conftest import CAUSAL_CORPUS, build_causal_tokenizer

    tokenizer = build_causal_tokenizer()
    model = tiny_llama(vocab_size=len(tokenizer))
    if adapter_dir is not None:
        model = PeftModel.from_pretrained(model, adapter_dir)
    input_ids = torch.tensor([tokenizer(CAUSAL_CORPUS[1])["input_ids"]])
    with torch.no_grad():
        logits: torch.Tensor = model(input_ids=input_ids).logits
    return logits


def test_fsdp_adapter_loads_in_one_process_with_the_ddp_outputs(
    fsdp_run: Path, ddp_run: Path
) -> None:
    fsdp_logits = _logits(fsdp_run / "adapter")
    torch.testing.assert_close(
        fsdp_logits, _logits(ddp_run / "adapter"), atol=MATCH_DDP_ATOL, rtol=0
    )
    assert (fsdp_logits - _logits(None)).abs().max() > 1e-3  # the adapter changes the outputs
    fsdp_adapter, ddp_adapter = read_adapter(fsdp_run), read_adapter(ddp_run)
    assert fsdp_adapter.keys() == ddp_adapter.keys()
    for name, tensor in ddp_adapter.items():
        assert fsdp_adapter[name].shape == tensor.shape, name  # whole tensors, not shards
        torch.testing.assert_close(fsdp_adapter[name], tensor, atol=MATCH_DDP_ATOL, rtol=0)
    trained_b = [tensor for name, tensor in fsdp_adapter.items() if "lora_B" in name]
    assert all(tensor.abs().max() > 1e-3 for tensor in trained_b)  # B starts at zero
    losses = [_train_losses(fsdp_run), _train_losses(ddp_run)]
    assert losses[0] == pytest.approx(losses[1], abs=MATCH_DDP_ATOL)
    evaluations = [_events(fsdp_run, "eval"), _events(ddp_run, "eval")]
    assert [event["step"] for event in evaluations[0]] == [BASE_OPTIONS["max_steps"]]
    assert evaluations[0][0]["eval_loss"] == pytest.approx(
        evaluations[1][0]["eval_loss"], abs=MATCH_DDP_ATOL
    )


def _events(output_dir: Path, kind: str) -> list[dict[str, Any]]:
    events = [json.loads(line) for line in (output_dir / "metrics.jsonl").open()]
    return [event for event in events if event["event"] == kind]


def _train_losses(output_dir: Path) -> list[float]:
    return [event["loss"] for event in _events(output_dir, "train")]


def test_fsdp_adapter_file_has_the_single_process_keys_and_config(
    fsdp_run: Path, tmp_path: Path
) -> None:
    from safetensors.torch import load_file

    from lorakit import LoraConfig, get_peft_model
    from tiny_models import tiny_llama
    from train.conftest import build_causal_tokenizer

    # The worker's model and LoRA settings, saved by one process (training changes no key).
    lora = LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules=["q_proj", "v_proj"])
    model = get_peft_model(tiny_llama(vocab_size=len(build_causal_tokenizer())), lora)
    model.save_pretrained(tmp_path)
    single = load_file(str(tmp_path / "adapter_model.safetensors"))
    assert read_adapter(fsdp_run).keys() == single.keys()
    config_files = [fsdp_run / "adapter" / "adapter_config.json", tmp_path / "adapter_config.json"]
    configs = [json.loads(file.read_text()) for file in config_files]
    assert configs[0] == configs[1]


def test_fsdp_reduce_scatters_only_the_adapter_gradients_once_a_step(fsdp_run: Path) -> None:
    adapter = read_adapter(fsdp_run)
    adapter_bytes = sum(t.numel() * t.element_size() for t in adapter.values())
    report = json.loads((fsdp_run / BYTES_FILE).read_text())
    # Accumulated micro-batches keep their gradients local; the last one reduce-scatters them.
    assert report["per_step"] == [adapter_bytes] * BASE_OPTIONS["max_steps"]
    assert adapter_bytes * 20 < report["model_bytes"]


def test_fsdp_checkpoint_holds_whole_tensors_and_resumes_to_the_same_adapter(
    fsdp_run: Path, tmp_path: Path
) -> None:
    checkpoint = fsdp_run / "checkpoints" / "checkpoint-4"
    adapter = read_adapter(fsdp_run)
    optimizer = torch.load(checkpoint / "optimizer.pt", weights_only=True)
    moments = [state["exp_avg"].shape for state in optimizer["state"].values()]
    assert sorted(moments) == sorted(tensor.shape for tensor in adapter.values())
    # Resume steps 5 and 6 from it: each rank keeps its shard of the whole tensors it reads.
    shutil.copytree(checkpoint, tmp_path / "checkpoints" / checkpoint.name)
    run_worker(tmp_path, 2, **FSDP)
    resumed = read_adapter(tmp_path)
    for name, tensor in adapter.items():
        assert torch.equal(resumed[name], tensor), name
    assert _train_losses(tmp_path) == _train_losses(fsdp_run)[4:]  # steps 5 and 6


def test_unknown_strategy_lists_the_allowed_ones() -> None:
    with pytest.raises(TrainConfigError, match=r"strategy = 'zero3'.*'ddp', 'fsdp'"):
        TrainConfig(strategy="zero3")


def test_transformer_blocks_are_the_decoder_layers() -> None:
    from lorakit import LoraConfig, get_peft_model
    from tiny_models import tiny_llama

    model = get_peft_model(tiny_llama(), LoraConfig(r=2, target_modules=["q_proj"]))
    layers = list(model.get_base_model().model.layers)
    blocks = transformer_blocks(model)
    assert len(blocks) == 2 and all(a is b for a, b in zip(blocks, layers, strict=True))


def test_a_model_without_blocks_is_refused_with_the_fix() -> None:
    model = nn.Sequential(nn.Linear(4, 4), nn.ReLU())
    with pytest.raises(DistributedSetupError, match=r"no transformer block.*use strategy 'ddp'"):
        transformer_blocks(model)


def test_train_command_takes_the_strategy_flag(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    from lorakit.cli import build_parser
    from lorakit.cli.train import run_train
    from lorakit.cli.train_options import gather_options

    parser = build_parser()
    args = ["train", "--model", "m", "--train-data", "x.jsonl", "--strategy"]
    flags = vars(parser.parse_args([*args, "fsdp"]))
    options = gather_options({}, {k: v for k, v in flags.items() if k not in ("command", "config")})
    assert TrainConfig.from_dict(options.train).strategy == "fsdp"
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit, match=r"^2$") as stopped:  # argparse's exit status
        parser.parse_args([*args, "zero3"])
    assert stopped.value.code == 2
    assert "invalid choice: 'zero3' (choose from 'ddp', 'fsdp')" in capsys.readouterr().err
    # The same value from a config file is refused by TrainConfig, exit status 2 too.
    config = tmp_path / "run.json"
    config.write_text('{"strategy": "zero3"}', encoding="utf-8")
    assert run_train(parser.parse_args(["train", "--config", str(config), *args[1:5]])) == 2
    assert "strategy = 'zero3' is not allowed; use one of 'ddp', 'fsdp'" in capsys.readouterr().err


def test_save_pretrained_writes_the_given_state_dict(tmp_path: Path) -> None:
    """PEFT's ``state_dict=`` keyword: what FSDP saving hands over (gathered tensors)."""
    from safetensors.torch import load_file

    from lorakit import LoraConfig, get_peft_model
    from tiny_models import tiny_llama

    model = get_peft_model(tiny_llama(), LoraConfig(r=2, target_modules=["q_proj"]))
    own = model.state_dict()
    given = {key: tensor + 1.0 if "lora_" in key else tensor for key, tensor in own.items()}
    model.save_pretrained(tmp_path, state_dict=given)
    saved = load_file(str(tmp_path / "adapter_model.safetensors"))
    assert len(saved) == 4  # A and B of q_proj in 2 layers
    for file_key, tensor in saved.items():
        model_key = file_key.replace(".weight", ".default.weight")
        assert torch.equal(tensor, given[model_key]), file_key
        assert not torch.equal(tensor, own[model_key]), file_key
