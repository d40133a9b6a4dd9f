"""lorakit adapters through OpenVINO GenAI's LLMPipeline, against lorakit's own greedy tokens.

A tiny Llama and its tokenizer are exported to OpenVINO IR by optimum-intel's `optimum-cli`
(run from its own virtualenv, .venv-optimum/, which `bash .ci/system-deps.sh` builds), once per
test run, while three adapters with different scales (rank and alpha patterns, rsLoRA, plain)
are made and exported: the patterned one by `lorakit export --to openvino` in a subprocess, the
others by `lorakit.export.to_openvino`. One pipeline has them all, exported and original,
registered; each test picks adapters and alphas per call.
"""

from __future__ import annotations

import math
import os
import re
import shutil
import subprocess
import sys
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch

from lorakit import LoraConfig, PeftModel, get_peft_model
from lorakit.export import to_openvino
from serve.conftest import build_serve_tokenizer, serve_llama

REPO = Path(__file__).resolve().parents[2]
OPTIMUM_CLI = REPO / ".venv-optimum" / "bin" / "optimum-cli"
DEPLOY_DOC = REPO / "docs" / "deploy.md"
PROMPT = [5, 17, 42, 9, 100, 23]
NEW_TOKENS = 12
# OpenVINO's CPU defaults on CPUs with bf16 support (bf16 compute, u8 KV cache) are not the
# float32 model lorakit runs; greedy tokens of a random tiny model diverge under them.
FLOAT32 = {"INFERENCE_PRECISION_HINT": "f32", "KV_CACHE_PRECISION": "f32"}
BUILT = "built"  # marker file: the shared folder is complete
SUBPROCESS_TIMEOUT = 300  # seconds: optimum-cli's export traces the model on a loaded machine
# name -> (r, lora_alpha, LoraConfig options): scales far from 1, different per adapter.
ADAPTERS: dict[str, tuple[int, float, dict[str, Any]]] = {
    "sql": (
        4,
        12,
        {
            "target_modules": ["q_proj", "v_proj", "down_proj"],
            "rank_pattern": {"down_proj": 2},
            "alpha_pattern": {"v_proj": 3.0},
        },
    ),
    "polite": (2, 5, {"target_modules": "all-linear", "use_rslora": True}),
    "terse": (8, 2, {"target_modules": ["q_proj", "k_proj", "v_proj", "o_proj"]}),
}


@dataclass(frozen=True)
class OpenVinoSetup:
    """The exported base, the adapter folders, and one pipeline knowing every adapter file."""

    base: Path
    ir: Path
    originals: dict[str, Path]
    exported: dict[str, Path]
    pipeline: Any
    adapters: dict[str, Any]  # "sql" (original file) or "sql-openvino" -> openvino_genai.Adapter


def _start(command: list[str], **options: Any) -> subprocess.Popen[str]:
    return subprocess.Popen(
        command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **options
    )


def _wait(process: subprocess.Popen[str]) -> None:
    try:
        stdout, stderr = process.communicate(timeout=SUBPROCESS_TIMEOUT)
    except subprocess.TimeoutExpired:
        process.kill()
        stdout, stderr = process.communicate()
    assert process.returncode == 0, f"{process.args} failed:\n{stdout}\n{stderr}"


def _save_base(folder: Path) -> None:
    """The serving tests' tiny Llama and tokenizer, with an end-of-sequence token.

    OpenVINO GenAI refuses a generation config without one; both sides stop on it alike.
    """
    tokenizer = build_serve_tokenizer()
    model = serve_llama(len(tokenizer))
    for config in (model.config, model.generation_config):
        config.eos_token_id = tokenizer.pad_token_id
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)


def _save_adapter(base: Path, name: str, folder: Path) -> None:
    import transformers

    r, alpha, options = ADAPTERS[name]
    config = LoraConfig(r=r, lora_alpha=alpha, init_lora_weights="gaussian", **options)
    model = get_peft_model(transformers.AutoModelForCausalLM.from_pretrained(base), config)
    torch.manual_seed(sorted(ADAPTERS).index(name))
    with torch.no_grad():
        for key, parameter in model.named_parameters():
            if "lora_B" in key:
                parameter.normal_(0, 0.4)
    model.save_pretrained(folder)


def _build(root: Path) -> None:
    """The base, its IR and the adapters, original and exported, under `root`."""
    base, ir = root / "base", root / "base-openvino"
    _save_base(base)
    env = {**os.environ, "OMP_NUM_THREADS": "2"}
    exporting_base = _start(
        [str(OPTIMUM_CLI), "export", "openvino", "-m", str(base), "--task",
         "text-generation-with-past", "--weight-format", "fp32", str(ir)],
        env=env,
    )  # fmt: skip
    for name in ADAPTERS:
        _save_adapter(base, name, root / name)
    # The patterned adapter goes through the command line, the others through the function.
    exporting_sql = _start(
        [sys.executable, "-m", "lorakit", "export", "--to", "openvino",
         str(root / "sql"), str(root / "sql-openvino")]
    )  # fmt: skip
    for name in ADAPTERS.keys() - {"sql"}:
        to_openvino(root / name, root / f"{name}-openvino")
    _wait(exporting_sql)
    _wait(exporting_base)


@pytest.fixture(scope="session")
def openvino_setup(tmp_path_factory: pytest.TempPathFactory) -> OpenVinoSetup:
    """Built once per test run: xdist workers share the run's folder (the first one builds it)."""
    if not OPTIMUM_CLI.is_file():
        pytest.fail(
            f"{OPTIMUM_CLI} is missing: optimum-intel, which exports the test model to "
            "OpenVINO IR, lives in its own virtualenv. Fix: run `bash .ci/system-deps.sh`."
        )
    import openvino_genai
    from filelock import FileLock

    basetemp = tmp_path_factory.getbasetemp()
    if "PYTEST_XDIST_WORKER" in os.environ:  # a worker's basetemp is in the run's own folder
        basetemp = basetemp.parent
    root = basetemp / "openvino-export"
    with FileLock(f"{root}.lock"):
        if not (root / BUILT).is_file():
            shutil.rmtree(root, ignore_errors=True)  # a build that failed half-way
            root.mkdir()
            _build(root)
            (root / BUILT).touch()
    originals = {name: root / name for name in ADAPTERS}
    exported = {name: root / f"{name}-openvino" for name in ADAPTERS}
    adapters = {}
    for name in ADAPTERS:
        for label, folder in ((name, originals[name]), (f"{name}-openvino", exported[name])):
            adapters[label] = openvino_genai.Adapter(str(folder / "adapter_model.safetensors"))
    every = openvino_genai.AdapterConfig(list(adapters.values()))
    ir = root / "base-openvino"
    pipeline = openvino_genai.LLMPipeline(str(ir), "CPU", adapters=every, **FLOAT32)
    return OpenVinoSetup(root / "base", ir, originals, exported, pipeline, adapters)


def _openvino_tokens(setup: OpenVinoSetup, alphas: Mapping[str, float]) -> list[int]:
    """Greedy tokens of the pipeline with the adapters `alphas` names (label -> alpha)."""
    import numpy as np
    import openvino
    import openvino_genai

    config = setup.pipeline.get_generation_config()
    config.max_new_tokens, config.do_sample = NEW_TOKENS, False
    adapters = openvino_genai.AdapterConfig()
    for label, alpha in alphas.items():
        adapters.add(setup.adapters[label], alpha)
    ids = openvino.Tensor(np.array([PROMPT], dtype=np.int64))
    mask = openvino.Tensor(np.ones((1, len(PROMPT)), dtype=np.int64))
    inputs = openvino_genai.TokenizedInputs(ids, mask)
    result = setup.pipeline.generate(inputs, config, adapters=adapters)
    return [int(token) for token in result.tokens[0]]


def _merged_blend(setup: OpenVinoSetup, blend: Mapping[str, float]) -> torch.nn.Module:
    """The base with lorakit's blend {name: w} merged in: Σ wᵢ·sᵢ·BᵢAᵢ.

    The blend is lorakit's exact "cat" combination (the serving engine's blends are the same
    sum); a single adapter at weight 1 is the adapter itself, no adapter the base.
    """
    import transformers

    base = transformers.AutoModelForCausalLM.from_pretrained(setup.base)
    if not blend:
        return base
    names = list(blend)
    model = PeftModel.from_pretrained(base, setup.originals[names[0]], adapter_name=names[0])
    for name in names[1:]:
        model.load_adapter(setup.originals[name], adapter_name=name)
    if list(blend.values()) != [1.0]:
        model.add_weighted_adapter(names, list(blend.values()), "blend", "cat")
        model.set_adapter("blend")
    merged: torch.nn.Module = model.merge_and_unload()
    return merged


def _lorakit_tokens(setup: OpenVinoSetup, blend: Mapping[str, float]) -> list[int]:
    """lorakit's greedy tokens for PROMPT with a blend {name: w} (see `_merged_blend`)."""
    with torch.no_grad():
        output = _merged_blend(setup, blend).generate(  # type: ignore[operator]
            torch.tensor([PROMPT]), max_new_tokens=NEW_TOKENS, do_sample=False
        )
    return [int(token) for token in output[0, len(PROMPT) :]]


def test_exported_adapter_at_alpha_one_gives_lorakit_greedy_tokens(
    openvino_setup: OpenVinoSetup,
) -> None:
    for name in ("sql", "polite"):
        expected = _lorakit_tokens(openvino_setup, {name: 1.0})
        assert _openvino_tokens(openvino_setup, {f"{name}-openvino": 1.0}) == expected
        assert expected != _lorakit_tokens(openvino_setup, {})  # the adapter matters


def test_original_file_at_alpha_one_is_another_model(openvino_setup: OpenVinoSetup) -> None:
    """The issue's point: OpenVINO GenAI ignores lora_alpha / r, so alpha 1.0 is not s."""
    expected = _lorakit_tokens(openvino_setup, {"sql": 1.0})
    assert _openvino_tokens(openvino_setup, {"sql": 1.0}) != expected


def test_base_tokens_agree_without_adapters(openvino_setup: OpenVinoSetup) -> None:
    assert _openvino_tokens(openvino_setup, {}) == _lorakit_tokens(openvino_setup, {})


def test_blend_of_exported_adapters_takes_the_lorakit_weights_as_alphas(
    openvino_setup: OpenVinoSetup,
) -> None:
    blend = {"sql": 0.7, "polite": 0.5}
    alphas = {f"{name}-openvino": weight for name, weight in blend.items()}
    expected = _lorakit_tokens(openvino_setup, blend)
    assert expected not in (_lorakit_tokens(openvino_setup, {n: 1.0}) for n in blend)
    assert _openvino_tokens(openvino_setup, alphas) == expected


def test_blend_of_original_files_takes_weight_times_scale(openvino_setup: OpenVinoSetup) -> None:
    """Without rank/alpha patterns an adapter has one s; the original file's alpha is w·s."""
    blend = {"polite": 0.5, "terse": 1.5}
    scales = {"polite": 5 / math.sqrt(2), "terse": 2 / 8}  # rsLoRA: alpha / sqrt(r); alpha / r
    alphas = {name: weight * scales[name] for name, weight in blend.items()}
    assert _openvino_tokens(openvino_setup, alphas) == _lorakit_tokens(openvino_setup, blend)


def test_deploy_doc_openvino_example_runs_on_the_exported_files(
    openvino_setup: OpenVinoSetup, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """docs/deploy.md's OpenVINO block runs here, in a folder holding the paths it names.

    It is fenced `python title=openvino_blend.py` (as serving.md's examples, run by their own
    tests): tests/test_docs.py runs plain `python` blocks with a MiniLM classifier, which cannot
    feed an LLMPipeline. Its greedy answer must be lorakit's blend on
    the prompt as the pipeline tokenizes it (chat template applied), decoded alike.
    """
    blocks = re.findall(
        r"```python title=openvino_blend.py\n(.*?)```", DEPLOY_DOC.read_text(), re.DOTALL
    )
    assert len(blocks) == 1
    for link, target in {
        "my-model-openvino": openvino_setup.ir,
        "sql-openvino": openvino_setup.exported["sql"],
        "polite-openvino": openvino_setup.exported["polite"],
    }.items():
        (tmp_path / link).symlink_to(target)
    monkeypatch.chdir(tmp_path)
    namespace: dict[str, Any] = {"__name__": "docs"}
    exec(compile(blocks[0], str(DEPLOY_DOC), "exec"), namespace)
    tokenizer = namespace["pipe"].get_tokenizer()
    chat = [{"role": "user", "content": namespace["prompt"]}]
    text = tokenizer.apply_chat_template(chat, add_generation_prompt=True)
    prompt = tokenizer.encode(text, add_special_tokens=False).input_ids.data.tolist()[0]
    merged = _merged_blend(openvino_setup, {"sql": 0.7, "polite": 0.5})
    with torch.no_grad():
        output = merged.generate(  # type: ignore[operator]
            torch.tensor([prompt]), max_new_tokens=namespace["max_new_tokens"], do_sample=False
        )
    expected = [int(token) for token in output[0, len(prompt) :]]
    assert str(namespace["answer"]) == tokenizer.decode(expected)
