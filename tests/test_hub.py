"""Hub repo ids for loading (offline, from a cache folder the test builds) and push_to_hub.

No hub is reachable here: loading reads a Hugging Face cache laid out as huggingface_hub lays
it out (`models--org--name/snapshots/<commit>/...`, `refs/<branch>`) with the Hub offline, and
pushing runs with `HfApi`'s network calls replaced by recorders that keep the uploaded folder.
"""

from __future__ import annotations

import inspect
import json
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import huggingface_hub
import peft
import pytest
import torch
from huggingface_hub import constants
from huggingface_hub.errors import EntryNotFoundError
from safetensors.torch import load_file

from lorakit import (
    AutoPeftModelForCausalLM,
    LoraConfig,
    PeftModel,
    get_peft_model,
    load_peft_weights,
)
from lorakit.errors import UnsupportedOptionError
from lorakit.extras import MissingDependencyError
from lorakit.io import AdapterNotFoundError
from lorakit.layers import LoraLayer
from tiny_models import tiny_llama, token_batch

ADAPTER_REPO = "someorg/tiny-adapter"
BASE_REPO = "someorg/tiny-base"
MAIN_COMMIT = "0123456789abcdef0123456789abcdef01234567"
BRANCH_COMMIT = "89abcdef0123456789abcdef0123456789abcdef"
BRANCH = "v2"
# lorakit and peft run the same fp32 products in the same order: a few ulps apart.
PEFT_FORWARD_TOL = 1e-6


def _adapter_model(seed: int, **options: Any) -> PeftModel:
    """Tiny Llama with a non-zero LoRA on q/v; `seed` picks the adapter weights."""
    base = tiny_llama()  # seeds torch itself
    torch.manual_seed(seed)
    config = LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
    return get_peft_model(base, config, **options)


def _cache_repo(cache: Path, repo_id: str, snapshots: dict[str, tuple[str, Path]]) -> Path:
    """Put folders in the cache as snapshots of `repo_id`: ref name -> (commit, folder)."""
    repo = cache / ("models--" + repo_id.replace("/", "--"))
    (repo / "refs").mkdir(parents=True, exist_ok=True)
    for ref, (commit, folder) in snapshots.items():
        shutil.copytree(folder, repo / "snapshots" / commit, dirs_exist_ok=True)
        (repo / "refs" / ref).write_text(commit)
    return repo


@pytest.fixture
def hub_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """An empty Hugging Face cache, with the Hub offline (huggingface_hub reads its
    environment at import, so its constants are set too; transformers reads those)."""
    cache = tmp_path / "hub"
    cache.mkdir()
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    return cache


@pytest.fixture
def adapters(tmp_path: Path, hub_cache: Path) -> dict[str, Path]:
    """Folders of two adapters (main: lorakit's, with a second adapter in `second/`; v2:
    peft's), also cached as ADAPTER_REPO's main and v2 snapshots."""
    main, branch = tmp_path / "main", tmp_path / "branch"
    model = _adapter_model(0)
    model.add_adapter("second", LoraConfig(r=2, target_modules=["k_proj"], init_lora_weights=False))
    model.save_pretrained(main)
    base = tiny_llama()
    torch.manual_seed(1)
    theirs = peft.get_peft_model(
        base,
        peft.LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False),
    )
    theirs.save_pretrained(branch)
    _cache_repo(
        hub_cache, ADAPTER_REPO, {"main": (MAIN_COMMIT, main), BRANCH: (BRANCH_COMMIT, branch)}
    )
    return {"main": main, "branch": branch}


def _logits(model: torch.nn.Module) -> torch.Tensor:
    with torch.no_grad():
        logits: torch.Tensor = model(token_batch()).logits
    return logits


def test_a_hub_id_loads_as_its_cached_folder_does(adapters: dict[str, Path]) -> None:
    from_folder = _logits(PeftModel.from_pretrained(tiny_llama(), adapters["main"]))
    assert torch.equal(_logits(PeftModel.from_pretrained(tiny_llama(), ADAPTER_REPO)), from_folder)
    model = get_peft_model(tiny_llama(), LoraConfig(r=2, target_modules=["o_proj"]))
    model.load_adapter(ADAPTER_REPO, "hub")
    model.set_adapter("hub")
    assert torch.equal(_logits(model), from_folder)
    weights = load_peft_weights(ADAPTER_REPO, device="cpu")
    saved = load_file(adapters["main"] / "adapter_model.safetensors")
    assert weights.keys() == saved.keys()
    assert all(torch.equal(weights[key], saved[key]) for key in saved)
    assert LoraConfig.from_pretrained(ADAPTER_REPO).r == 4


def test_revision_picks_the_snapshot_of_its_branch_or_commit(adapters: dict[str, Path]) -> None:
    from_folder = _logits(PeftModel.from_pretrained(tiny_llama(), adapters["branch"]))
    main = _logits(PeftModel.from_pretrained(tiny_llama(), ADAPTER_REPO))
    for revision in (BRANCH, BRANCH_COMMIT):
        loaded = PeftModel.from_pretrained(tiny_llama(), ADAPTER_REPO, revision=revision)
        assert torch.equal(_logits(loaded), from_folder)
    assert not torch.allclose(main, from_folder)  # the branch holds other weights
    model = get_peft_model(tiny_llama(), LoraConfig(r=2, target_modules=["o_proj"]))
    model.load_adapter(ADAPTER_REPO, "v2", revision=BRANCH)
    model.set_adapter("v2")
    assert torch.equal(_logits(model), from_folder)


def test_subfolder_reads_the_adapter_in_the_repos_subfolder(adapters: dict[str, Path]) -> None:
    from_folder = PeftModel.from_pretrained(tiny_llama(), adapters["main"], subfolder="second")
    loaded = PeftModel.from_pretrained(tiny_llama(), ADAPTER_REPO, subfolder="second")
    assert loaded.peft_config["default"].r == 2
    assert torch.equal(_logits(loaded), _logits(from_folder))
    assert not torch.allclose(_logits(loaded), _logits(tiny_llama()))


@pytest.mark.parametrize(
    ("repo_id", "options", "named"),
    [
        ("someorg/absent", {}, r"'someorg/absent' does not exist as a local folder"),
        (ADAPTER_REPO, {"revision": "nope"}, r"at revision 'nope'"),
        (ADAPTER_REPO, {"subfolder": "nope"}, rf"'{ADAPTER_REPO}/nope' does not exist"),
    ],
)
def test_an_id_neither_a_folder_nor_cached_names_the_fix(
    adapters: dict[str, Path], repo_id: str, options: dict[str, Any], named: str
) -> None:
    base = tiny_llama()
    fix = r"Fix: pass the folder save_pretrained wrote, or a Hub repo id .*HF_HUB_OFFLINE=1"
    with pytest.raises(AdapterNotFoundError, match=rf"from_pretrained: .*{named}.*{fix}"):
        PeftModel.from_pretrained(base, repo_id, **options)
    assert not any(isinstance(module, LoraLayer) for module in base.modules())
    model = get_peft_model(tiny_llama(), LoraConfig(r=2, target_modules=["o_proj"]))
    with pytest.raises(AdapterNotFoundError, match=rf"load_adapter: .*{named}"):
        model.load_adapter(repo_id, "other", **options)
    assert list(model.peft_config) == ["default"]


def test_token_and_other_download_options_reach_huggingface_hub(
    adapters: dict[str, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    calls: list[tuple[str, dict[str, Any]]] = []
    download = huggingface_hub.hf_hub_download

    def recording_download(repo_id: str, filename: str, **options: Any) -> str:
        calls.append((filename, options))
        return download(repo_id, filename, **options)

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", recording_download)
    PeftModel.from_pretrained(
        tiny_llama(), ADAPTER_REPO, revision=BRANCH, token="hf_secret", etag_timeout=3.0
    )
    assert [filename for filename, _ in calls] == [
        "adapter_config.json",
        "adapter_model.safetensors",
    ]
    for _, options in calls:
        assert options == {
            "subfolder": None,
            "revision": BRANCH,
            "token": "hf_secret",
            "etag_timeout": 3.0,
        }


def test_hub_options_with_a_local_folder_raise(adapters: dict[str, Path]) -> None:
    base = tiny_llama()
    with pytest.raises(
        UnsupportedOptionError,
        match=r"from_pretrained\(revision='v2'\): .* is a local folder, so nothing is "
        r"downloaded from the Hugging Face Hub and revision would do nothing\. Fix: remove it",
    ):
        PeftModel.from_pretrained(base, adapters["main"], revision=BRANCH)
    assert not any(isinstance(module, LoraLayer) for module in base.modules())
    # local_files_only=True holds for a folder: nothing is downloaded.
    loaded = PeftModel.from_pretrained(tiny_llama(), adapters["main"], local_files_only=True)
    assert torch.equal(
        _logits(loaded), _logits(PeftModel.from_pretrained(tiny_llama(), adapters["main"]))
    )


def test_a_hub_id_without_huggingface_hub_names_the_extra(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "huggingface_hub", None)  # as if not installed
    with pytest.raises(
        MissingDependencyError,
        match=r"from_pretrained with a Hub repo id needs the package 'huggingface_hub'.*"
        r'pip install "lorakit\[transformers\]"',
    ):
        PeftModel.from_pretrained(tiny_llama(), ADAPTER_REPO)
    with pytest.raises(MissingDependencyError, match=r"push_to_hub needs the package"):
        _adapter_model(0).push_to_hub("someorg/pushed")


def _cache_base_and_adapter(hub_cache: Path, tmp_path: Path) -> dict[str, Path]:
    """BASE_REPO with main and v1 (other weights) snapshots; ADAPTER_REPO's main names the
    base's v1 (get_peft_model(revision="v1")), its v2 branch names no revision."""
    base_main, base_v1 = tmp_path / "base-main", tmp_path / "base-v1"
    tiny_llama().save_pretrained(base_main)
    other = tiny_llama()
    with torch.no_grad():
        other.model.layers[0].mlp.down_proj.weight.mul_(2.0)
    other.save_pretrained(base_v1)
    _cache_repo(
        hub_cache, BASE_REPO, {"main": (MAIN_COMMIT, base_main), "v1": (BRANCH_COMMIT, base_v1)}
    )
    at_v1, at_main = tmp_path / "adapter-v1", tmp_path / "adapter-main"
    for folder, seed, revision in ((at_v1, 0, "v1"), (at_main, 1, None)):
        model = _adapter_model(seed, revision=revision)
        model.peft_config["default"].base_model_name_or_path = BASE_REPO
        model.peft_config["default"].task_type = "CAUSAL_LM"
        model.save_pretrained(folder)
    _cache_repo(
        hub_cache, ADAPTER_REPO, {"main": (MAIN_COMMIT, at_v1), BRANCH: (BRANCH_COMMIT, at_main)}
    )
    return {"base-main": base_main, "base-v1": base_v1, "at-v1": at_v1, "at-main": at_main}


def _expected(base_folder: Path, adapter_folder: Path) -> torch.Tensor:
    import transformers

    base = transformers.AutoModelForCausalLM.from_pretrained(base_folder)
    return _logits(PeftModel.from_pretrained(base, adapter_folder))


def test_auto_peft_model_loads_the_adapter_and_the_base_revision_from_the_hub(
    hub_cache: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import transformers

    folders = _cache_base_and_adapter(hub_cache, tmp_path)
    at_v1 = _expected(folders["base-v1"], folders["at-v1"])
    assert not torch.allclose(at_v1, _expected(folders["base-main"], folders["at-v1"]))
    loaded = AutoPeftModelForCausalLM.from_pretrained(ADAPTER_REPO)
    assert torch.equal(_logits(loaded), at_v1)
    # revision picks the adapter's snapshot; that adapter names no base revision: main.
    loaded = AutoPeftModelForCausalLM.from_pretrained(ADAPTER_REPO, revision=BRANCH)
    assert torch.equal(_logits(loaded), _expected(folders["base-main"], folders["at-main"]))
    # token and cache_dir reach both downloads, other keywords the base only.
    base_calls: list[dict[str, Any]] = []
    adapter_calls: list[dict[str, Any]] = []
    build_base = transformers.AutoModelForCausalLM.from_pretrained
    download = huggingface_hub.hf_hub_download

    def recording_build(*args: Any, **options: Any) -> Any:
        base_calls.append(options)
        return build_base(*args, **options)

    def recording_download(repo_id: str, filename: str, **options: Any) -> str:
        adapter_calls.append(options)
        return download(repo_id, filename, **options)

    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", recording_build)
    monkeypatch.setattr(huggingface_hub, "hf_hub_download", recording_download)
    hub = {"token": "hf_secret", "cache_dir": str(hub_cache)}
    loaded = AutoPeftModelForCausalLM.from_pretrained(ADAPTER_REPO, dtype=torch.float32, **hub)
    assert torch.equal(_logits(loaded), at_v1)
    assert base_calls == [{"revision": "v1", **hub, "dtype": torch.float32}]
    assert adapter_calls == 2 * [{"subfolder": None, "revision": None, **hub}]
    # A folder holding the adapter: the token still reaches the base; a revision, nothing.
    base_calls.clear()
    loaded = AutoPeftModelForCausalLM.from_pretrained(folders["at-v1"], token="hf_secret")
    assert torch.equal(_logits(loaded), at_v1)
    assert base_calls == [{"revision": "v1", "token": "hf_secret"}]
    with pytest.raises(UnsupportedOptionError, match=r"revision='v2'\): .* is a local folder"):
        AutoPeftModelForCausalLM.from_pretrained(folders["at-v1"], revision=BRANCH)
    with pytest.raises(UnsupportedOptionError, match=r"import_allowlist=\['x'\]\): .*Fix"):
        AutoPeftModelForCausalLM.from_pretrained(ADAPTER_REPO, import_allowlist=["x"])


def test_auto_peft_model_reads_the_cache_named_by_the_environment(
    hub_cache: Path, tmp_path: Path
) -> None:
    """As a user runs it: HF_HUB_CACHE and HF_HUB_OFFLINE=1 set before Python starts."""
    folders = _cache_base_and_adapter(hub_cache, tmp_path)
    script = (
        "import sys, torch\n"
        "from safetensors.torch import save_file\n"
        "from lorakit import AutoPeftModelForCausalLM\n"
        "sys.path.insert(0, 'tests')\n"
        "from tiny_models import token_batch\n"
        f"model = AutoPeftModelForCausalLM.from_pretrained({ADAPTER_REPO!r})\n"
        "with torch.no_grad():\n"
        "    logits = model(token_batch()).logits\n"
        f"save_file({{'logits': logits}}, {str(tmp_path / 'logits.safetensors')!r})\n"
    )
    environment = {
        "PATH": "/usr/bin:/bin",
        "HOME": str(tmp_path),
        "HF_HUB_CACHE": str(hub_cache),
        "HF_HUB_OFFLINE": "1",
        "OMP_NUM_THREADS": "1",
    }
    result = subprocess.run(
        [sys.executable, "-c", script],
        env=environment,
        cwd=Path(__file__).parents[1],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    logits = load_file(tmp_path / "logits.safetensors")["logits"]
    assert torch.equal(logits, _expected(folders["base-v1"], folders["at-v1"]))


# --- push_to_hub ----------------------------------------------------------------------------


class HubRecorder:
    """Stands in for the Hub: records `HfApi`'s calls and copies each uploaded folder."""

    def __init__(self, uploads: Path, card: huggingface_hub.ModelCard | None = None) -> None:
        self.uploads = uploads
        self.card = card
        self.calls: list[tuple[str, dict[str, Any]]] = []

    def install(self, monkeypatch: pytest.MonkeyPatch) -> None:
        recorder = self

        def create_repo(api: huggingface_hub.HfApi, repo_id: str, **options: Any) -> Any:
            recorder.calls.append(("create_repo", {"token": api.token, **options}))
            return huggingface_hub.RepoUrl(f"https://huggingface.co/{repo_id}")

        def create_branch(api: huggingface_hub.HfApi, repo_id: str, **options: Any) -> None:
            recorder.calls.append(("create_branch", {"repo_id": repo_id, **options}))

        def upload_folder(api: huggingface_hub.HfApi, **options: Any) -> str:
            recorder.calls.append(("upload_folder", options))
            shutil.copytree(options["folder_path"], recorder.uploads)
            return "https://huggingface.co/commit/1"

        def load_card(repo_id: str, **options: Any) -> huggingface_hub.ModelCard:
            recorder.calls.append(("ModelCard.load", {"repo_id": repo_id, **options}))
            if recorder.card is None:
                raise EntryNotFoundError(f"{repo_id} has no README.md")
            return recorder.card

        monkeypatch.setattr(huggingface_hub.HfApi, "create_repo", create_repo)
        monkeypatch.setattr(huggingface_hub.HfApi, "create_branch", create_branch)
        monkeypatch.setattr(huggingface_hub.HfApi, "upload_folder", upload_folder)
        monkeypatch.setattr(huggingface_hub.ModelCard, "load", load_card)

    def files(self) -> list[str]:
        return sorted(
            path.relative_to(self.uploads).as_posix()
            for path in self.uploads.rglob("*")
            if path.is_file()
        )


def test_push_to_hub_uploads_the_adapter_folder_only_and_peft_loads_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    recorder = HubRecorder(tmp_path / "uploaded")
    recorder.install(monkeypatch)
    model = _adapter_model(0)
    model.peft_config["default"].base_model_name_or_path = BASE_REPO
    result = model.push_to_hub(
        "someorg/pushed",
        commit_message="first adapter",
        private=True,
        token="hf_secret",
        revision="dev",
        create_pr=True,
        tags=["chat"],
    )
    assert result == "https://huggingface.co/commit/1"
    assert recorder.files() == ["README.md", "adapter_config.json", "adapter_model.safetensors"]
    names = [name for name, _ in recorder.calls]
    assert names == ["create_repo", "create_branch", "ModelCard.load", "upload_folder"]
    create_repo, create_branch, load_card, upload = (options for _, options in recorder.calls)
    assert load_card == {"repo_id": "someorg/pushed", "token": "hf_secret"}
    assert create_repo == {"token": "hf_secret", "private": True, "exist_ok": True}
    assert create_branch == {"repo_id": "someorg/pushed", "branch": "dev", "exist_ok": True}
    assert {key: upload[key] for key in upload if key != "folder_path"} == {
        "repo_id": "someorg/pushed",
        "commit_message": "first adapter",
        "commit_description": None,
        "revision": "dev",
        "create_pr": True,
        "delete_patterns": ["adapter_model.bin"],  # a stale pickle of an earlier push
    }
    saved = load_file(recorder.uploads / "adapter_model.safetensors")
    assert all(key.startswith("base_model.model.") and ".lora_" in key for key in saved)
    card = huggingface_hub.ModelCard((recorder.uploads / "README.md").read_text())
    assert card.data.tags == ["lora", "lorakit", "chat"]
    assert (card.data.library_name, card.data.base_model) == ("peft", BASE_REPO)
    theirs = peft.PeftModel.from_pretrained(tiny_llama(), recorder.uploads)
    torch.testing.assert_close(_logits(theirs), _logits(model), atol=PEFT_FORWARD_TOL, rtol=0)


def test_push_to_hub_selected_adapters_pickles_and_an_existing_card(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    existing = huggingface_hub.ModelCard("---\ntags:\n- mine\n---\n\n# My notes\n")
    recorder = HubRecorder(tmp_path / "uploaded", card=existing)
    recorder.install(monkeypatch)
    model = _adapter_model(0)
    model.add_adapter("second", LoraConfig(r=2, target_modules=["k_proj"]))
    model.add_adapter("third", LoraConfig(r=2, target_modules=["o_proj"]))
    model.push_to_hub("someorg/pushed", selected_adapters=["second"], safe_serialization=False)
    assert recorder.files() == [
        "README.md",
        "second/adapter_config.json",
        "second/adapter_model.bin",
    ]
    upload = recorder.calls[-1][1]
    assert upload["delete_patterns"] == ["second/adapter_model.safetensors"]
    assert upload["revision"] is None and upload["commit_message"] == "Upload adapter with lorakit"
    readme = (recorder.uploads / "README.md").read_text()
    assert "# My notes" in readme
    assert huggingface_hub.ModelCard(readme).data.tags == ["mine", "lora", "lorakit"]
    config = json.loads((recorder.uploads / "second" / "adapter_config.json").read_text())
    assert config["r"] == 2 and config["target_modules"] == ["k_proj"]


@pytest.mark.parametrize(
    ("options", "error", "named"),
    [
        ({"max_shard_size": "1GB"}, UnsupportedOptionError, r"max_shard_size='1GB'.*Fix"),
        ({"selected_adapters": ["nope"]}, KeyError, r"'nope' does not exist"),
    ],
)
def test_push_to_hub_refuses_before_creating_anything(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    options: dict[str, Any],
    error: type[Exception],
    named: str,
) -> None:
    recorder = HubRecorder(tmp_path / "uploaded")
    recorder.install(monkeypatch)
    with pytest.raises(error, match=named):
        _adapter_model(0).push_to_hub("someorg/pushed", **options)
    assert recorder.calls == []


@pytest.mark.parametrize(
    ("ours", "theirs"),
    [
        (PeftModel.push_to_hub, peft.PeftModel.push_to_hub),
        (AutoPeftModelForCausalLM.from_pretrained, peft.AutoPeftModelForCausalLM.from_pretrained),
    ],
    ids=["push_to_hub", "AutoPeftModel.from_pretrained"],
)
def test_peft_keywords_are_named_in_the_same_order(ours: Any, theirs: Any) -> None:
    def named(function: Any) -> list[str]:
        parameters = inspect.signature(function).parameters.values()
        return [p.name for p in parameters if p.kind is not inspect.Parameter.VAR_KEYWORD]

    # The first is `self`, or the adapter's path (PEFT's pretrained_model_name_or_path, given
    # by position).
    assert named(ours)[1 : len(named(theirs))] == named(theirs)[1:]
