"""The Hugging Face Hub: adapters read from a repo id, and pushed to one, with `huggingface_hub`.

Reading resolves a repo id to a local folder of the Hugging Face cache (the one transformers
and peft share: `HF_HUB_CACHE`, `HF_HUB_OFFLINE` honoured), and the local loaders do the rest,
so a Hub adapter is checked exactly as a folder is. Pushing writes what `save_pretrained`
writes into a temporary folder and uploads that folder alone: never the base model.
`huggingface_hub` is imported only when the Hub is used.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .errors import UnsupportedOptionError
from .extras import import_optional
from .io import (
    CONFIG_NAME,
    PICKLE_WEIGHTS_NAME,
    SAFETENSORS_WEIGHTS_NAME,
    AdapterNotFoundError,
    adapter_directory,
)
from .io.atomic import write_text
from .keywords import is_unused

if TYPE_CHECKING:
    from .model import PeftModel

PathLike = str | os.PathLike[str]
# Tags every pushed model card carries (beside the caller's `tags`).
MODEL_CARD_TAGS: tuple[str, ...] = ("lora", "lorakit")
# The card's library: the files are PEFT's, so the Hub shows how to load them with peft.
MODEL_CARD_LIBRARY = "peft"
MODEL_CARD_NAME = "README.md"
DEFAULT_MAX_SHARD_SIZE = "50GB"
# The lorakit extra that installs huggingface_hub (transformers depends on it).
HUB_EXTRA = "transformers"


def resolve_adapter_folder(
    method: str,
    model_id: PathLike,
    subfolder: str | None,
    hub_options: Mapping[str, Any],
    *,
    used_elsewhere: Sequence[str] = (),
    with_weights: bool = True,
) -> Path:
    """The local folder holding the adapter `model_id` names: itself, or its Hub download.

    A string that is not an existing folder is read as a Hub repo id, downloaded with
    `huggingface_hub.hf_hub_download` into its cache (or found there when offline), and the
    folder of the downloaded files returned. A `Path`, or a folder that exists, is local.

    Args:
        method: The caller, for messages (e.g. "from_pretrained").
        model_id: A local folder or a Hub repo id ("org/name").
        subfolder: The adapter's subfolder in the folder or repo.
        hub_options: `hf_hub_download`'s keywords (`revision`, `token`, `cache_dir`, ...).
        used_elsewhere: Keywords of `hub_options` the caller used for something else (the
            base model), so they may hold values although the adapter is local.
        with_weights: Download the weights file too, not only `adapter_config.json`.

    Raises:
        UnsupportedOptionError: `model_id` is a local folder and a Hub option holds a value
            (it would select or download nothing).
        AdapterNotFoundError: `model_id` is neither a folder nor an adapter found on the Hub
            or, offline, in the cache.
    """
    if isinstance(model_id, os.PathLike) or Path(model_id).is_dir():
        for keyword, value in hub_options.items():
            asks = keyword != "local_files_only" and not is_unused(keyword, value)
            if asks and keyword not in used_elsewhere:
                raise UnsupportedOptionError(
                    f"{method}({keyword}={value!r}): {str(model_id)!r} is a local folder, so "
                    f"nothing is downloaded from the Hugging Face Hub and {keyword} would do "
                    "nothing. Fix: remove it, or pass the Hub repo id ('org/name') to download "
                    "the adapter from."
                )
        return Path(model_id) if subfolder is None else Path(model_id) / subfolder
    return _download_adapter(method, model_id, subfolder, hub_options, with_weights)


def _download_adapter(
    method: str,
    repo_id: str,
    subfolder: str | None,
    hub_options: Mapping[str, Any],
    with_weights: bool,
) -> Path:
    """Download the adapter's config and weights file; the folder they are in.

    The weights are `adapter_model.safetensors`, else `adapter_model.bin` (refused later by
    the reader unless `allow_pickle`), as PEFT looks for them.
    """
    hub = import_optional("huggingface_hub", HUB_EXTRA, f"{method} with a Hub repo id")
    errors = import_optional("huggingface_hub.errors", HUB_EXTRA, method)

    def download(filename: str) -> Path:
        return Path(hub.hf_hub_download(repo_id, filename, subfolder=subfolder, **hub_options))

    try:
        folder = download(CONFIG_NAME).parent
    except (OSError, ValueError, errors.EntryNotFoundError) as error:
        raise _not_found(method, repo_id, subfolder, hub_options, error) from None
    if not with_weights:
        return folder
    for weights_name in (SAFETENSORS_WEIGHTS_NAME, PICKLE_WEIGHTS_NAME):
        try:
            weights_folder = download(weights_name).parent
        except errors.EntryNotFoundError:
            continue
        except (OSError, ValueError) as error:
            raise _not_found(method, repo_id, subfolder, hub_options, error) from None
        if weights_folder != folder:  # a branch moved between the two downloads
            raise AdapterNotFoundError(
                f"{method}: {repo_id!r} changed while its files were downloaded ({folder} and "
                f"{weights_folder} are different snapshots). Fix: call it again, or pin "
                "revision= to a commit hash."
            )
        return folder
    return folder  # the local reader names the missing weights file


def _not_found(
    method: str,
    repo_id: str,
    subfolder: str | None,
    hub_options: Mapping[str, Any],
    error: BaseException,
) -> AdapterNotFoundError:
    """The error for an adapter that is neither a local folder nor found on the Hub."""
    constants = import_optional("huggingface_hub.constants", HUB_EXTRA, method)
    reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
    where = f"{repo_id}/{subfolder}" if subfolder else repo_id
    revision = hub_options.get("revision")
    at = f" at revision {revision!r}" if revision is not None else ""
    cache = hub_options.get("cache_dir") or constants.HF_HUB_CACHE
    offline = (
        f" Offline (HF_HUB_OFFLINE=1) it must already be in the Hugging Face cache ({cache}): "
        "download it once online, e.g. `hf download org/name`."
        if constants.HF_HUB_OFFLINE or hub_options.get("local_files_only")
        else ""
    )
    return AdapterNotFoundError(
        f"{method}: {where!r} does not exist as a local folder, and no adapter "
        f"({CONFIG_NAME}) was found for it as a Hub repo id{at} ({type(error).__name__}: "
        f"{reason}). Fix: pass the folder save_pretrained wrote, or a Hub repo id 'org/name' "
        f"with revision= and subfolder= where the adapter is.{offline}"
    )


def push_adapters(
    model: PeftModel,
    repo_id: str,
    *,
    commit_message: str | None,
    commit_description: str | None,
    private: bool | None,
    token: bool | str | None,
    revision: str | None,
    create_pr: bool,
    tags: Sequence[str] | None,
    selected_adapters: Sequence[str] | None,
    safe_serialization: bool,
) -> Any:
    """Upload the selected adapters' files (as `save_pretrained` writes them) and a model card.

    The repo is created if missing (`private` applies then only), and the branch `revision`
    too. A weights file of the other format left by an earlier push is deleted in the same
    commit, since readers prefer safetensors and would load a stale one.

    Returns:
        `HfApi.upload_folder`'s `CommitInfo` (its `str` is the commit's URL).
    """
    hub = import_optional("huggingface_hub", HUB_EXTRA, "push_to_hub")
    names = list(model.peft_config) if selected_adapters is None else list(selected_adapters)
    model._check_exist(names)
    api = hub.HfApi(token=token)
    repo_id = api.create_repo(repo_id, private=private, exist_ok=True).repo_id
    if revision is not None and not revision.startswith("refs/pr/"):
        api.create_branch(repo_id, branch=revision, exist_ok=True)
    stale_name = PICKLE_WEIGHTS_NAME if safe_serialization else SAFETENSORS_WEIGHTS_NAME
    stale = [adapter_directory("", name) / stale_name for name in names]
    with tempfile.TemporaryDirectory() as staging:
        model.save_pretrained(
            staging, safe_serialization=safe_serialization, selected_adapters=names
        )
        card = _model_card(api, repo_id, model, names, tags)
        write_text(Path(staging) / MODEL_CARD_NAME, card)
        return api.upload_folder(
            repo_id=repo_id,
            folder_path=staging,
            commit_message=commit_message or "Upload adapter with lorakit",
            commit_description=commit_description,
            revision=revision,
            create_pr=create_pr,
            delete_patterns=[path.as_posix() for path in stale],
        )


def _model_card(
    api: Any,
    repo_id: str,
    model: PeftModel,
    names: Sequence[str],
    tags: Sequence[str] | None,
) -> str:
    """The repo's model card with this push's tags and base model added, or a new card.

    An existing card's text is kept, as transformers' `push_to_hub` keeps it.
    """
    hub = import_optional("huggingface_hub", HUB_EXTRA, "push_to_hub")
    errors = import_optional("huggingface_hub.errors", HUB_EXTRA, "push_to_hub")
    try:
        card = hub.ModelCard.load(repo_id, token=api.token)
    except (errors.EntryNotFoundError, errors.RepositoryNotFoundError):
        description = (
            f"LoRA adapter(s) {', '.join(names)}, saved by lorakit in PEFT's format "
            f"({CONFIG_NAME} + adapter weights): load with peft or lorakit's "
            "`PeftModel.from_pretrained(base, repo_id)`."
        )
        card = hub.ModelCard(
            f"---\n{hub.ModelCardData().to_yaml()}\n---\n\n# {repo_id}\n\n{description}\n"
        )
    data = card.data
    card_tags = list(data.tags or [])
    for tag in (*MODEL_CARD_TAGS, *(tags or ())):
        if tag not in card_tags:
            card_tags.append(tag)
    data.tags = card_tags
    data.library_name = data.library_name or MODEL_CARD_LIBRARY
    base = model.peft_config[names[0]].base_model_name_or_path
    if base and not data.base_model and not Path(base).is_dir():
        data.base_model = base  # a Hub id only: a local path means nothing on the Hub
    return str(card)
