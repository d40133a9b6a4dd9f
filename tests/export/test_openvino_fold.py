"""`lorakit export --to openvino` without OpenVINO: the fold's numbers, the files, the refusals.

The exported copy must hold B' = s · B per module (so OpenVINO GenAI's alpha 1.0 adds s · B A),
load back as the original adapter in lorakit and peft, and refuse by name what OpenVINO GenAI
would not apply.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from lorakit import LoraConfig, PeftModel, get_peft_model
from lorakit.cli import main
from lorakit.errors import ExportError
from lorakit.export import to_openvino
from lorakit.export.openvino import EXPORT_NOTE, fold_scales, folded_scales
from tiny_models import tiny_llama, token_batch

EXACT = 1e-10  # float64 hand computation
# The exported B' = s · B is rounded to float32 once: relative error below 2^-23 per entry,
# a few ulps after the product with A.
FLOAT32_PRODUCT = 1e-6
# Logits of the copy against the original adapter: the same forward up to that rounding.
LOGITS = 1e-5
PREFIX = "base_model.model."
TARGETS = ["q_proj", "v_proj", "down_proj"]
R, LORA_ALPHA = 4, 12
RANK_PATTERN = {"down_proj": 2}
ALPHA_PATTERN = {"v_proj": 3.0}


def _hand_scale(module: str, use_rslora: bool) -> float:
    """s of a module of the patterned adapter, written out by hand."""
    r = 2 if module == "down_proj" else R
    alpha = 3.0 if module == "v_proj" else LORA_ALPHA
    return alpha / math.sqrt(r) if use_rslora else alpha / r


def _patterned_adapter(
    folder: Path, use_rslora: bool = False, dtype: torch.dtype = torch.float32, **options: object
) -> Path:
    """A lorakit adapter with rank/alpha patterns and non-zero B, saved to `folder`."""
    config = LoraConfig(
        r=R,
        lora_alpha=LORA_ALPHA,
        target_modules=TARGETS,
        rank_pattern=RANK_PATTERN,
        alpha_pattern=ALPHA_PATTERN,
        use_rslora=use_rslora,
        init_lora_weights="gaussian",
        **options,  # type: ignore[arg-type]
    )
    model = get_peft_model(tiny_llama().to(dtype), config)
    torch.manual_seed(1)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if "lora_B" in name:
                parameter.normal_(0, 0.5)
    model.save_pretrained(folder)
    return folder


def _edit_config(folder: Path, **fields: object) -> None:
    path = folder / "adapter_config.json"
    config = json.loads(path.read_text())
    config.update(fields)
    path.write_text(json.dumps(config))


@pytest.mark.parametrize("use_rslora", [False, True])
def test_fold_multiplies_each_b_by_its_module_scale(tmp_path: Path, use_rslora: bool) -> None:
    source = _patterned_adapter(tmp_path / "adapter", use_rslora, dtype=torch.float64)
    tensors = load_file(source / "adapter_model.safetensors")
    config = json.loads((source / "adapter_config.json").read_text())
    scales = folded_scales(tensors, config)
    folded = fold_scales(tensors, scales)
    assert len(scales) == 2 * len(TARGETS)  # 2 layers
    for path, scale in scales.items():
        module = path.rsplit(".", 1)[1]
        assert scale == pytest.approx(_hand_scale(module, use_rslora), abs=EXACT)
        A, B = (tensors[f"{PREFIX}{path}.lora_{f}.weight"] for f in "AB")
        folded_A, folded_B = (folded[f"{PREFIX}{path}.lora_{f}.weight"] for f in "AB")
        assert torch.equal(folded_A, A)
        expected = _hand_scale(module, use_rslora) * (B @ A)
        torch.testing.assert_close(folded_B @ folded_A, expected, atol=EXACT, rtol=0)


def test_exported_file_products_are_the_scaled_products(tmp_path: Path) -> None:
    source = _patterned_adapter(tmp_path / "adapter", use_rslora=True)
    out = to_openvino(source, tmp_path / "openvino")
    original = load_file(source / "adapter_model.safetensors")
    exported = load_file(out / "adapter_model.safetensors")
    assert sorted(exported) == sorted(original)  # PEFT's names: OpenVINO GenAI matches them
    note = json.loads((out / EXPORT_NOTE).read_text())
    assert note["alpha"] == 1.0 and note["source"] == str(source)
    for path, scale in note["folded_scales"].items():
        module = path.rsplit(".", 1)[1]
        assert scale == pytest.approx(_hand_scale(module, True), abs=EXACT)
        A, B = (original[f"{PREFIX}{path}.lora_{f}.weight"].double() for f in "AB")
        folded_B = exported[f"{PREFIX}{path}.lora_B.weight"]
        assert folded_B.dtype == torch.float32
        expected = _hand_scale(module, True) * (B @ A)
        got = folded_B.double() @ A
        assert ((got - expected).abs().max() / expected.abs().max()).item() < FLOAT32_PRODUCT


def test_exported_config_has_unit_scale_and_loads_back_as_the_adapter(tmp_path: Path) -> None:
    peft = pytest.importorskip("peft")
    source = _patterned_adapter(tmp_path / "adapter", use_rslora=True)
    out = to_openvino(source, tmp_path / "openvino")
    config = json.loads((out / "adapter_config.json").read_text())
    assert (config["lora_alpha"], config["use_rslora"]) == (R, False)
    assert config["alpha_pattern"] == config["rank_pattern"] == RANK_PATTERN
    batch = token_batch()
    with torch.no_grad():
        trained = PeftModel.from_pretrained(tiny_llama(), source)(batch).logits
        copy = PeftModel.from_pretrained(tiny_llama(), out)(batch).logits
        by_peft = peft.PeftModel.from_pretrained(tiny_llama(), str(out))(batch).logits
        base = tiny_llama()(batch).logits
    assert (trained - base).abs().max() > 100 * LOGITS  # the adapter changes the logits
    torch.testing.assert_close(copy, trained, atol=LOGITS, rtol=0)
    torch.testing.assert_close(by_peft, trained, atol=LOGITS, rtol=0)


def test_a_second_export_replaces_the_first_as_a_whole(tmp_path: Path) -> None:
    out = tmp_path / "openvino"
    to_openvino(_patterned_adapter(tmp_path / "first"), out)
    (out / "stale.txt").write_text("from before")
    to_openvino(_patterned_adapter(tmp_path / "second", use_rslora=True), out)
    assert sorted(p.name for p in out.iterdir()) == sorted(
        ["adapter_config.json", "adapter_model.safetensors", EXPORT_NOTE]
    )
    assert json.loads((out / EXPORT_NOTE).read_text())["source"] == str(tmp_path / "second")


@pytest.mark.parametrize(
    ("fields", "match"),
    [
        ({"use_dora": True}, "use_dora=True.*DoRA's magnitude vectors"),
        ({"lora_bias": True}, "lora_bias=True"),
        ({"bias": "all"}, "bias='all'.*biases"),
        ({"modules_to_save": ["lm_head"]}, r"modules_to_save=\['lm_head'\].*saved whole.*tested"),
        ({"trainable_token_indices": [1, 2]}, "trainable_token_indices"),
        ({"target_parameters": ["experts.gate_up_proj"]}, "target_parameters"),
        ({"layer_replication": [[0, 2]]}, "layer_replication"),
        ({"alora_invocation_tokens": [5]}, "alora_invocation_tokens"),
        ({"fan_in_fan_out": True}, "fan_in_fan_out=True.*Conv1D.*tested.*Linear layers only"),
        ({"task_type": "SEQ_CLS"}, "task_type='SEQ_CLS'.*CAUSAL_LM"),
    ],
)
def test_options_openvino_would_not_apply_are_refused_by_name(
    tmp_path: Path, fields: dict[str, object], match: str
) -> None:
    source = _patterned_adapter(tmp_path / "adapter")
    _edit_config(source, **fields)
    with pytest.raises(ExportError, match=match):
        to_openvino(source, tmp_path / "openvino")
    assert not (tmp_path / "openvino").exists()


def test_lora_on_an_embedding_is_refused_naming_its_tensor(tmp_path: Path) -> None:
    model = get_peft_model(tiny_llama(), LoraConfig(r=2, target_modules=["embed_tokens", "q_proj"]))
    model.save_pretrained(tmp_path / "adapter")
    with pytest.raises(
        ExportError, match=r"embed_tokens\.lora_embedding_A.*LoRA on an embedding layer"
    ):
        to_openvino(tmp_path / "adapter", tmp_path / "openvino")


def test_a_rank_that_contradicts_the_config_is_refused(tmp_path: Path) -> None:
    source = _patterned_adapter(tmp_path / "adapter")
    _edit_config(source, rank_pattern={})
    with pytest.raises(ExportError, match=r"down_proj' rank 4, but its lora_A has 2 rows"):
        to_openvino(source, tmp_path / "openvino")


def test_a_dtype_openvino_cannot_read_is_refused(tmp_path: Path) -> None:
    source = _patterned_adapter(tmp_path / "adapter", dtype=torch.float64)
    with pytest.raises(ExportError, match=r"torch\.float64.*Fix: save the adapter in float32"):
        to_openvino(source, tmp_path / "openvino")


def test_a_folder_export_did_not_write_is_never_replaced(tmp_path: Path) -> None:
    source = _patterned_adapter(tmp_path / "adapter")
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep me")
    with pytest.raises(ExportError, match=f"not a folder `lorakit export` wrote.*{EXPORT_NOTE}"):
        to_openvino(source, tmp_path / "mine")
    assert (tmp_path / "mine" / "notes.txt").read_text() == "keep me"
    for out in (source, source / "inside", tmp_path):
        with pytest.raises(ExportError, match=r"is the adapter folder.*inside it or holds it"):
            to_openvino(source, out)


def test_cli_refusal_is_one_message_and_exit_status_2(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    source = _patterned_adapter(tmp_path / "adapter")
    _edit_config(source, use_dora=True)
    status = main(["export", "--to", "openvino", str(source), str(tmp_path / "openvino")])
    captured = capsys.readouterr()
    assert status == 2
    assert captured.err.startswith("lorakit export: error: Adapter")
    assert "use_dora=True" in captured.err and "Traceback" not in captured.err
