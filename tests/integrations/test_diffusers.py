"""LoRA on diffusers models (UNet, SD3 transformer) against peft, and diffusers' LoRA file.

The models are diffusers' own classes built from tiny configs with seeded random weights; the
Stable Diffusion pipeline around them (VAE, CLIP text encoder, a tokenizer from a vocabulary
written here) is built offline. peft is the oracle for the adapted models, and diffusers' own
loaders (`pipeline.load_lora_weights`, `load_lora_adapter`, which build peft adapters from the
file) read what lorakit writes.
"""

from __future__ import annotations

import copy
import json
import warnings
from pathlib import Path
from typing import Any

import diffusers
import peft
import pytest
import safetensors
import torch
from torch import nn

import lorakit
from lorakit.errors import AdapterStateError, ConfigError, UnsupportedOptionError
from lorakit.integrations.diffusers import (
    LORA_ADAPTER_METADATA_KEY,
    LORA_WEIGHT_NAME_SAFE,
    save_lora_weights,
)
from parity.parity_support import (
    MERGE_TOL,
    STATE_TOL,
    adapted_names,
    assert_forward_matches_peft,
    changes_output,
    max_abs_diff,
)

SEED = 0
# Every linear and conv kind of a UNet: attention, feed-forward, resnet convs and shortcut,
# the transformer's proj_in/proj_out (1x1 convs here) and the time-embedding projection.
UNET_TARGETS = [
    "to_q",
    "to_k",
    "to_v",
    "to_out.0",
    "proj_in",
    "proj_out",
    "ff.net.2",
    "conv1",
    "conv2",
    "conv_shortcut",
    "time_emb_proj",
]
# SD3's joint attention (image and context projections) and the patch-embedding conv.
SD3_TARGETS = [
    "to_q",
    "to_k",
    "to_v",
    "to_out.0",
    "add_q_proj",
    "add_k_proj",
    "add_v_proj",
    "to_add_out",
    "pos_embed.proj",
]
# Two denoising steps through a VAE decode of images in [0, 1]: the same fp32 network in both
# pipelines, so agreement is at the level of a few fp32 roundings of values of order 1.
IMAGE_TOL = 1e-5


class SampleOnly(nn.Module):
    """A diffusers model whose forward returns the `sample` tensor (what parity helpers read)."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, **inputs: Any) -> torch.Tensor:
        return self.model(**inputs).sample


def tiny_unet() -> nn.Module:
    torch.manual_seed(SEED)
    return diffusers.UNet2DConditionModel(
        block_out_channels=(8, 16),
        layers_per_block=1,
        sample_size=8,
        in_channels=4,
        out_channels=4,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=8,
        norm_num_groups=4,
        attention_head_dim=2,
    ).eval()


def tiny_sd3_transformer() -> nn.Module:
    torch.manual_seed(SEED)
    return diffusers.SD3Transformer2DModel(
        sample_size=8,
        patch_size=1,
        in_channels=4,
        num_layers=2,  # the last block is context_pre_only: the first one has to_add_out
        attention_head_dim=8,
        num_attention_heads=4,
        caption_projection_dim=32,
        joint_attention_dim=32,
        pooled_projection_dim=64,
        out_channels=4,
    ).eval()


def unet_inputs() -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(1)
    return {
        "sample": torch.randn(2, 4, 8, 8, generator=generator),
        "timestep": torch.tensor([3, 700]),
        "encoder_hidden_states": torch.randn(2, 5, 8, generator=generator),
    }


def sd3_inputs() -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(1)
    return {
        "hidden_states": torch.randn(2, 4, 8, 8, generator=generator),
        "encoder_hidden_states": torch.randn(2, 5, 32, generator=generator),
        "pooled_projections": torch.randn(2, 64, generator=generator),
        "timestep": torch.tensor([3, 700]),
    }


def sample_of(model: nn.Module, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
    with torch.no_grad():
        return model(**inputs).sample


def lorakit_injected(base: nn.Module, **config: Any) -> nn.Module:
    """A copy of `base` with a lorakit adapter of random, non-zero A and B."""
    torch.manual_seed(1)
    model = copy.deepcopy(base)
    lorakit.inject_adapter_in_model(lorakit.LoraConfig(init_lora_weights=False, **config), model)
    return model.eval()


# --- the adapted models equal peft's -------------------------------------------------------


def test_unet_lora_with_conv_layers_equals_peft() -> None:
    """get_peft_model on a UNet adapts the same modules as peft and, with peft's A and B
    copied in, gives peft's output (within peft's own measured fp32 error)."""
    base = tiny_unet()
    config = {"r": 4, "lora_alpha": 8, "target_modules": UNET_TARGETS, "init_lora_weights": False}
    peft_model = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(**config))
    model = lorakit.get_peft_model(copy.deepcopy(base), lorakit.LoraConfig(**config))
    assert adapted_names(model) == adapted_names(peft_model)
    assert any(name.endswith("resnets.0.conv1") for name in adapted_names(model))  # a Conv2d
    model.load_state_dict(peft_model.state_dict(), strict=True)
    inputs = unet_inputs()

    got = sample_of(model, inputs)

    assert changes_output(got, sample_of(base, inputs))
    assert_forward_matches_peft(got, SampleOnly(peft_model), inputs)


def test_unet_merge_and_unmerge_equal_peft_and_restore_the_base() -> None:
    base = tiny_unet()
    config = {
        "r": 4,
        "lora_alpha": 2,
        "target_modules": UNET_TARGETS,
        "init_lora_weights": False,
        "rank_pattern": {"conv2": 2},
    }
    peft_model = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(**config))
    model = lorakit.get_peft_model(copy.deepcopy(base), lorakit.LoraConfig(**config))
    model.load_state_dict(peft_model.state_dict(), strict=True)
    inputs = unet_inputs()
    unmerged = sample_of(model, inputs)

    model.merge_adapter()
    peft_model.merge_adapter()

    merged_weights = model.get_base_model().state_dict()
    for key, value in peft_model.get_base_model().state_dict().items():
        if ".lora_" not in key:
            assert max_abs_diff(merged_weights[key], value) <= STATE_TOL, key
    assert max_abs_diff(sample_of(model, inputs), unmerged) <= MERGE_TOL
    assert changes_output(unmerged, sample_of(base, inputs))

    model.unmerge_adapter()

    restored = {
        key.replace(".base_layer", ""): value
        for key, value in model.get_base_model().state_dict().items()
        if ".lora_" not in key
    }
    for key, value in base.state_dict().items():
        assert max_abs_diff(restored[key], value) <= STATE_TOL, key
    assert max_abs_diff(sample_of(model, inputs), unmerged) <= MERGE_TOL
    plain = model.merge_and_unload()
    assert type(plain) is diffusers.UNet2DConditionModel
    assert max_abs_diff(sample_of(plain, inputs), unmerged) <= MERGE_TOL


def test_sd3_transformer_injection_equals_peft() -> None:
    """inject_adapter_in_model on SD3's transformer (joint attention and the patch conv)."""
    base = tiny_sd3_transformer()
    config = {"r": 4, "lora_alpha": 2, "target_modules": SD3_TARGETS, "init_lora_weights": False}
    peft_model = peft.inject_adapter_in_model(peft.LoraConfig(**config), copy.deepcopy(base))
    model = lorakit.inject_adapter_in_model(lorakit.LoraConfig(**config), copy.deepcopy(base))
    assert adapted_names(model) == adapted_names(peft_model)
    assert "pos_embed.proj" in adapted_names(model)
    model.load_state_dict(peft_model.state_dict(), strict=True)
    inputs = sd3_inputs()

    got = sample_of(model, inputs)

    assert changes_output(got, sample_of(base, inputs))
    assert_forward_matches_peft(got, SampleOnly(peft_model), inputs)


# --- diffusers' LoRA file ------------------------------------------------------------------


def write_clip_tokenizer_files(folder: Path) -> tuple[Path, Path]:
    """A CLIP BPE vocabulary of single letters (with and without the word-end mark), no merges."""
    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for letter in "abcdefghijklmnopqrstuvwxyz":
        vocab[letter] = len(vocab)
        vocab[letter + "</w>"] = len(vocab)
    vocab_file, merges_file = folder / "vocab.json", folder / "merges.txt"
    vocab_file.write_text(json.dumps(vocab))
    merges_file.write_text("#version: 0.2\n")
    return vocab_file, merges_file


def tiny_pipeline_parts(folder: Path) -> dict[str, Any]:
    """UNet, VAE, CLIP text encoder and tokenizer, scheduler: a Stable Diffusion pipeline."""
    import transformers

    vocab_file, merges_file = write_clip_tokenizer_files(folder)
    tokenizer = transformers.CLIPTokenizer(str(vocab_file), str(merges_file), model_max_length=8)
    torch.manual_seed(SEED)
    text_encoder = transformers.CLIPTextModel(
        transformers.CLIPTextConfig(
            vocab_size=len(tokenizer),
            hidden_size=8,
            intermediate_size=16,
            num_hidden_layers=2,
            num_attention_heads=2,
            max_position_embeddings=8,
            bos_token_id=0,
            eos_token_id=1,
            pad_token_id=1,
        )
    ).eval()
    vae = diffusers.AutoencoderKL(
        block_out_channels=(8,),
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",),
        up_block_types=("UpDecoderBlock2D",),
        latent_channels=4,
        norm_num_groups=4,
        sample_size=8,
    ).eval()
    return {
        "unet": tiny_unet(),
        "vae": vae,
        "text_encoder": text_encoder,
        "tokenizer": tokenizer,
        "scheduler": diffusers.DDIMScheduler(clip_sample=False, steps_offset=1),
        "safety_checker": None,
        "feature_extractor": None,
        "requires_safety_checker": False,
    }


def pipeline_images(parts: dict[str, Any]) -> torch.Tensor:
    pipeline = diffusers.StableDiffusionPipeline(**parts)
    pipeline.set_progress_bar_config(disable=True)
    with torch.no_grad():
        images = pipeline(
            "a cat",
            num_inference_steps=2,
            height=8,
            width=8,
            output_type="pt",
            generator=torch.Generator().manual_seed(4),
        ).images
    assert isinstance(images, torch.Tensor)
    return images


def read_lora_file(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """A diffusers LoRA file's tensors and its parsed adapter metadata."""
    with safetensors.safe_open(path, "pt") as file:
        tensors = {key: file.get_tensor(key) for key in file.keys()}  # noqa: SIM118
        header = file.metadata()
    return tensors, json.loads(header[LORA_ADAPTER_METADATA_KEY])


def test_stable_diffusion_pipeline_loads_lorakit_file_at_lorakit_scale(tmp_path: Path) -> None:
    """`pipeline.load_lora_weights(folder)` on a file save_lora_weights wrote gives the UNet
    and text encoder lorakit's outputs; lora_alpha != r, per-module ranks and alphas: a file
    read at diffusers' default scale 1 would differ by the adapters' whole size."""
    parts = tiny_pipeline_parts(tmp_path)
    unet = lorakit_injected(
        parts["unet"],
        r=4,
        lora_alpha=2,
        target_modules=UNET_TARGETS,
        rank_pattern={"conv1": 2},
        alpha_pattern={"to_k": 12},
    )
    text_encoder = lorakit_injected(
        parts["text_encoder"], r=2, lora_alpha=8, target_modules=["q_proj", "v_proj", "fc1"]
    )
    folder = tmp_path / "lora"

    written = save_lora_weights(folder, unet=unet, text_encoder=text_encoder)

    assert written == folder / LORA_WEIGHT_NAME_SAFE
    models = {
        "unet": copy.deepcopy(parts["unet"]),
        "text_encoder": copy.deepcopy(parts["text_encoder"]),
    }
    pipeline = diffusers.StableDiffusionPipeline(**{**parts, **models})
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pipeline.load_lora_weights(folder, adapter_name="loaded")
    conv1 = "down_blocks.0.resnets.0.conv1"
    assert pipeline.unet.get_submodule(conv1).scaling["loaded"] == 2 / 2
    assert pipeline.unet.get_submodule(conv1).r["loaded"] == 2
    to_k = "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_k"
    assert pipeline.unet.get_submodule(to_k).scaling["loaded"] == 12 / 4
    to_q = "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q"
    assert pipeline.unet.get_submodule(to_q).scaling["loaded"] == 2 / 4
    inputs = unet_inputs()
    got = sample_of(unet, inputs)
    assert changes_output(got, sample_of(parts["unet"], inputs))
    assert_forward_matches_peft(got, SampleOnly(pipeline.unet), inputs)
    ids = parts["tokenizer"](["a cat", "a dog"], padding="max_length", return_tensors="pt")
    with torch.no_grad():
        text = text_encoder(ids.input_ids).last_hidden_state
        base_text = parts["text_encoder"](ids.input_ids).last_hidden_state
    assert changes_output(text, base_text)
    assert_forward_matches_peft(text, pipeline.text_encoder, ids.input_ids)
    lorakit_images = pipeline_images({**parts, "unet": unet, "text_encoder": text_encoder})
    loaded_images = pipeline_images({**parts, **pipeline.components})
    assert max_abs_diff(lorakit_images, loaded_images) <= IMAGE_TOL
    assert max_abs_diff(lorakit_images, pipeline_images(parts)) > 100 * IMAGE_TOL


def test_file_has_diffusers_keys_and_config_metadata(tmp_path: Path) -> None:
    """The keys are those diffusers' own save_lora_weights writes for a peft UNet with the
    same config; the metadata names each adapted module with its rank and alpha."""
    base = tiny_unet()
    config = {"r": 4, "lora_alpha": 2, "target_modules": UNET_TARGETS}
    unet = lorakit_injected(base, **config)
    peft_unet = peft.inject_adapter_in_model(peft.LoraConfig(**config), copy.deepcopy(base))
    diffusers.StableDiffusionPipeline.save_lora_weights(
        tmp_path / "diffusers", unet_lora_layers=peft.get_peft_model_state_dict(peft_unet)
    )

    save_lora_weights(tmp_path / "lorakit", unet=unet)

    tensors, metadata = read_lora_file(tmp_path / "lorakit" / LORA_WEIGHT_NAME_SAFE)
    with safetensors.safe_open(tmp_path / "diffusers" / LORA_WEIGHT_NAME_SAFE, "pt") as file:
        assert set(tensors) == set(file.keys())
    assert metadata["unet.target_modules"] == adapted_names(peft_unet)
    assert (metadata["unet.r"], metadata["unet.lora_alpha"]) == (4, 2)
    assert metadata["unet.rank_pattern"] == metadata["unet.alpha_pattern"] == {}


def test_sd3_transformer_loads_lorakit_file_with_rslora_and_patterns(tmp_path: Path) -> None:
    """The model-level loader of diffusion transformers (`load_lora_adapter`, prefix
    "transformer") reads lorakit's file: rsLoRA scale alpha/sqrt(r), per-module r and alpha."""
    base = tiny_sd3_transformer()
    model = lorakit_injected(
        base,
        r=4,
        lora_alpha=3,
        use_rslora=True,
        target_modules=SD3_TARGETS,
        rank_pattern={"add_k_proj": 8},
        alpha_pattern={"pos_embed.proj": 5},
    )
    save_lora_weights(tmp_path, transformer=model)
    loaded = copy.deepcopy(base)

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        loaded.load_lora_adapter(
            tmp_path,
            prefix="transformer",
            adapter_name="loaded",
            weight_name=LORA_WEIGHT_NAME_SAFE,
        )

    assert loaded.get_submodule("pos_embed.proj").scaling["loaded"] == 5 / 2
    inputs = sd3_inputs()
    got = sample_of(model, inputs)
    assert changes_output(got, sample_of(base, inputs))
    assert_forward_matches_peft(got, SampleOnly(loaded), inputs)


def test_get_peft_model_unet_saves_same_file_as_injected(tmp_path: Path) -> None:
    """A PeftModel's keys lose `base_model.model.`: the file is the injected model's."""
    base = tiny_unet()
    injected = lorakit_injected(base, r=2, target_modules=["to_q", "conv1"])
    wrapped = lorakit.get_peft_model(
        copy.deepcopy(base), lorakit.LoraConfig(r=2, target_modules=["to_q", "conv1"])
    )
    wrapped.load_state_dict(
        {f"base_model.model.{key}": value for key, value in injected.state_dict().items()}
    )

    save_lora_weights(tmp_path / "injected", unet=injected)
    save_lora_weights(tmp_path / "wrapped", unet=wrapped)

    injected_file, wrapped_file = (
        read_lora_file(tmp_path / name / LORA_WEIGHT_NAME_SAFE) for name in ("injected", "wrapped")
    )
    assert injected_file[1] == wrapped_file[1]
    assert injected_file[0].keys() == wrapped_file[0].keys()
    for key, tensor in injected_file[0].items():
        assert torch.equal(tensor, wrapped_file[0][key]), key
    assert "unet.down_blocks.0.resnets.0.conv1.lora_A.weight" in injected_file[0]


# --- refusals ------------------------------------------------------------------------------


def test_adapter_with_bias_is_refused_before_writing(tmp_path: Path) -> None:
    unet = lorakit_injected(tiny_unet(), r=2, target_modules=["to_out.0"], bias="lora_only")

    with pytest.raises(ConfigError, match=r"not LoRA factors .*bias='none'"):
        save_lora_weights(tmp_path, unet=unet)

    assert list(tmp_path.iterdir()) == []


def test_model_without_adapters_is_refused(tmp_path: Path) -> None:
    with pytest.raises(AdapterStateError, match="holds no lorakit adapters"):
        save_lora_weights(tmp_path, unet=tiny_unet())


def test_no_component_and_pickle_names_are_refused(tmp_path: Path) -> None:
    unet = lorakit_injected(tiny_unet(), r=2, target_modules=["to_q"])
    with pytest.raises(UnsupportedOptionError, match="got no model"):
        save_lora_weights(tmp_path)
    with pytest.raises(UnsupportedOptionError, match=r"weight_name='lora.bin'.*\.safetensors"):
        save_lora_weights(tmp_path, unet=unet, weight_name="lora.bin")
    assert list(tmp_path.iterdir()) == []


def test_not_main_process_writes_nothing(tmp_path: Path) -> None:
    unet = lorakit_injected(tiny_unet(), r=2, target_modules=["to_q"])

    assert save_lora_weights(tmp_path, unet=unet, is_main_process=False) is None

    assert list(tmp_path.iterdir()) == []
