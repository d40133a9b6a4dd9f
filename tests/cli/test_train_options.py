"""`lorakit train`'s config file sections (lora:, quantization:) merged with the flags."""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path
from typing import Any

import pytest
import torch
from torch.distributed.run import get_args_parser

from lorakit.cli import build_parser
from lorakit.cli.train import run_train
from lorakit.cli.train_model import quant_settings
from lorakit.cli.train_options import LORA_DEFAULTS, gather_options
from lorakit.config import LoraConfig
from lorakit.quant import QuantConfig
from lorakit.train.config import TrainConfig
from lorakit.train.train_errors import TrainConfigError

INPUTS = {"model": "m", "train_data": "rows.jsonl"}


def _flags(*argv: str) -> dict[str, Any]:
    values = vars(build_parser().parse_args(["train", *argv]))
    return {key: value for key, value in values.items() if key not in ("command", "config")}


def _default(item: dataclasses.Field[Any]) -> Any:
    if item.default_factory is not dataclasses.MISSING:
        return item.default_factory()
    return item.default


def test_the_lora_section_takes_every_loraconfig_field() -> None:
    chosen = {
        "r": 4,
        "lora_alpha": 32,
        "lora_dropout": 0.1,
        "target_modules": ["q_proj", "v_proj"],
        "exclude_modules": ["k_proj"],
        "bias": "lora_only",
        "use_rslora": True,
        "modules_to_save": ["lm_head"],
        "layers_to_transform": [1],
        "layers_pattern": "layers",
        "rank_pattern": {"q_proj": 8},
        "alpha_pattern": {"v_proj": 4},
        "init_lora_weights": "gaussian",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": "org/base",
        "revision": "main",
    }
    # Every field, the ones above set to non-default values, any other at its default.
    lora = {
        item.name: chosen.get(item.name, _default(item)) for item in dataclasses.fields(LoraConfig)
    }
    assert set(chosen) <= set(lora)
    options = gather_options({**INPUTS, "lora": lora}, _flags())
    assert options.lora == lora
    assert options.inputs["task"] == "CAUSAL_LM"  # lora.task_type names the task too
    assert LoraConfig(**options.lora).rank_pattern == {"q_proj": 8}


def test_flags_override_the_file_and_defaults_fill_the_rest() -> None:
    from_file = {**INPUTS, "r": 4, "lora": {"use_rslora": False, "lora_alpha": 8}}
    flags = _flags("--lora-r", "16", "--use-rslora", "--init-lora-weights", "false")
    options = gather_options(from_file, flags)
    assert options.lora == {
        "r": 16,
        "lora_alpha": 8,
        "lora_dropout": LORA_DEFAULTS["lora_dropout"],
        "use_rslora": True,
        "init_lora_weights": False,
    }
    assert options.quantization is None


def test_old_top_level_lora_keys_still_work() -> None:
    from_file = {**INPUTS, "r": 4, "lora_alpha": 8, "target_modules": "q_proj,v_proj"}
    options = gather_options(from_file, _flags())
    assert options.lora == {
        "r": 4,
        "lora_alpha": 8,
        "lora_dropout": LORA_DEFAULTS["lora_dropout"],
        "target_modules": ["q_proj", "v_proj"],
    }
    agreeing = {**from_file, "lora": {"r": 4, "target_modules": ["q_proj", "v_proj"]}}
    assert gather_options(agreeing, _flags()).lora == options.lora


def test_a_top_level_key_contradicting_the_lora_section_names_both() -> None:
    with pytest.raises(
        TrainConfigError, match=r"sets r: 8 at the top level and lora\.r: 16; keep only"
    ):
        gather_options({**INPUTS, "r": 8, "lora": {"r": 16}}, _flags())


@pytest.mark.parametrize(
    ("from_file", "message"),
    [
        (
            {"lora": {"use_rslor": True}},
            r"unknown lora section option 'use_rslor'; did you mean 'use_rslora'",
        ),
        (
            {"quantization": {"load_in_4bit": True, "quant_typ": "nf4"}},
            r"unknown quantization section option 'quant_typ'; did you mean 'quant_type'",
        ),
        (
            {"learning_rat": 1.0},
            r"unknown config file option 'learning_rat'; did you mean 'learning_rate'",
        ),
        ({"use_rslora": True}, r"option 'use_rslora' belongs in the 'lora' section"),
        ({"double_quant": True}, r"option 'double_quant' belongs in the 'quantization' section"),
        ({"lora": [1, 2]}, r"section 'lora' holds \[1, 2\]; it must be a mapping"),
        (
            {"quantization": {"quant_type": "fp4"}},
            r"quantization options \['quant_type'\] are set but load_in_4bit is not true",
        ),
        (
            {"task": "SEQ_CLS", "lora": {"task_type": "CAUSAL_LM"}},
            r"task 'SEQ_CLS' and lora\.task_type 'CAUSAL_LM' differ",
        ),
    ],
)
def test_bad_config_files_name_the_fix(from_file: dict[str, Any], message: str) -> None:
    with pytest.raises(TrainConfigError, match=message):
        gather_options({**INPUTS, **from_file}, _flags())


def test_load_in_4bit_flag_and_section_give_the_quantization_options() -> None:
    assert gather_options(INPUTS, _flags("--load-in-4bit")).quantization == {}
    section = {"load_in_4bit": True, "quant_type": "fp4", "compute_dtype": "bfloat16"}
    options = gather_options({**INPUTS, "quantization": section}, _flags())
    assert options.quantization == {"quant_type": "fp4", "compute_dtype": "bfloat16"}
    config, load_options = quant_settings(
        {**options.quantization, "blocksize": 128, "double_quant": False, "skip_modules": ["x"]}
    )
    assert config == QuantConfig(
        quant_type="fp4", blocksize=128, double_quant=False, compute_dtype=torch.bfloat16
    )
    assert load_options == {"skip_modules": ("x",)}


@pytest.mark.parametrize(
    ("options", "message"),
    [
        (
            {"compute_dtype": "bf16"},
            r"compute_dtype = 'bf16' is not allowed; use float32, bfloat16, float16\.",
        ),
        ({"torch_dtype": "half"}, r"torch_dtype = 'half' is not allowed; use .* or auto\."),
        ({"blocksize": 100}, r"quantization section: blocksize=100 is not supported"),
        ({"skip_modules": "lm_head"}, r"skip_modules = 'lm_head' is not allowed; use a list"),
    ],
)
def test_bad_quantization_values_name_the_fix(options: dict[str, Any], message: str) -> None:
    with pytest.raises(TrainConfigError, match=message):
        quant_settings(options)


def test_run_train_reports_section_errors_with_status_2(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.chdir(tmp_path)
    (tmp_path / "run.json").write_text('{"model": "m", "train_data": "x", "lora": {"rr": 4}}')
    assert run_train(build_parser().parse_args(["train", "--config", "run.json"])) == 2
    assert "unknown lora section option 'rr'; did you mean 'r'" in capsys.readouterr().err


DOCS = Path(__file__).resolve().parents[2] / "docs" / "training.md"


def test_the_config_file_example_in_the_docs_is_accepted_whole() -> None:
    yaml = pytest.importorskip("yaml")
    (block,) = re.findall(r"```yaml\n(.*?)```", DOCS.read_text(), flags=re.DOTALL)
    options = gather_options(yaml.safe_load(block), _flags())
    lora = LoraConfig(**options.lora)
    assert (lora.r, lora.use_rslora, lora.rank_pattern) == (16, True, {"q_proj": 32})
    assert options.quantization is not None
    config, load_options = quant_settings(options.quantization)
    assert config == QuantConfig(compute_dtype=torch.bfloat16)
    assert load_options == {"skip_modules": ("lm_head",), "torch_dtype": "auto"}
    assert TrainConfig.from_dict(options.train).eval_steps == 50


def test_the_command_lines_in_the_docs_parse() -> None:
    (block,) = re.findall(r"## Command line\n\n```bash\n(.*?)```", DOCS.read_text(), re.DOTALL)
    lines = [line.split("#")[0].split() for line in block.replace("\\\n", " ").splitlines()]
    assert len(lines) == 5
    for words in lines:
        if words[0] == "torchrun":
            launch = get_args_parser().parse_args(words[1:])
            words = ["lorakit", *launch.training_script_args]
        args = build_parser().parse_args(words[1:])
        assert args.command == "train"


@pytest.mark.parametrize(
    ("value", "expected"),
    [("pissa", "pissa"), ("PiSSA_niter_4", "pissa_niter_4"), ("olora", "olora"), ("true", True)],
)
def test_init_flag_takes_the_layer_inits(value: str, expected: object) -> None:
    options = gather_options(INPUTS, _flags("--init-lora-weights", value))
    assert options.lora["init_lora_weights"] == expected


def test_init_flag_refuses_an_unknown_init(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        _flags("--init-lora-weights", "pissa_niter_x")
    assert "use one of true, false, gaussian" in capsys.readouterr().err
