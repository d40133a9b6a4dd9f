"""Adapter management over HTTP: the request bodies, and the folders a client may load.

`POST /v1/adapters` names a folder relative to the root given at start-up (``--adapters-root``).
A client must not reach anything else on the server's disk, and must not make it unpickle a
file (pickle runs code while loading), so a folder is accepted only when, with every symlink
followed, it and the files lorakit reads lie inside the root, it holds
``adapter_model.safetensors`` and ``adapter_config.json``, and no pickle-format weights.
"""

from __future__ import annotations

import re
from dataclasses import asdict
from pathlib import Path, PurePosixPath
from typing import Any

from .http_errors import AdapterFolderError, RequestFieldError
from .types import BASE_ADAPTER

ADAPTER_WEIGHTS = "adapter_model.safetensors"
ADAPTER_CONFIG = "adapter_config.json"
# Files in pickle format (torch.save, pickle): loading one can run arbitrary code.
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".pickle", ".ckpt")
# An adapter's name in URLs and in the OpenAI `model` field.
ADAPTER_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")


def check_adapter_name(name: str) -> str:
    """Return `name` if it can name an adapter in a URL and a `model` field.

    Raises:
        AdapterFolderError: It is empty, too long or holds other characters than letters,
            digits, '.', '_' and '-'.
    """
    if not ADAPTER_NAME.fullmatch(name):
        raise AdapterFolderError(
            f"adapter name {name!r} is not allowed: use 1 to 64 letters, digits, '.', '_' or "
            "'-', starting with a letter or digit"
        )
    return name


def resolve_adapter_folder(root: Path, relative: str) -> Path:
    """The real path of the adapter folder `relative` inside `root`, after every check.

    Args:
        root: The adapters root the server was started with.
        relative: The folder as the client gave it, relative to `root` ('/'-separated).

    Returns:
        The folder with symlinks resolved, inside the resolved root.

    Raises:
        AdapterFolderError: The path is absolute or escapes the root (by '..' or a symlink),
            the folder does not exist, lacks its safetensors weights or config, or holds
            pickle-format weights.
    """
    real_root = root.resolve(strict=True)
    parts = PurePosixPath(relative).parts
    if not relative or PurePosixPath(relative).is_absolute() or "\\" in relative:
        raise AdapterFolderError(
            f"adapter path {relative!r} must be a folder relative to the adapters root, "
            "e.g. 'sql' or 'customers/acme'"
        )
    if ".." in parts:
        raise AdapterFolderError(
            f"adapter path {relative!r} leaves the adapters root: '..' is not allowed"
        )
    folder = _inside(real_root, real_root.joinpath(*parts), relative)
    if not folder.is_dir():
        raise AdapterFolderError(
            f"adapter path {relative!r} is not a folder in the adapters root; folders there: "
            f"{_folders(real_root)}"
        )
    for name in (ADAPTER_WEIGHTS, ADAPTER_CONFIG):
        file = folder / name
        if file.is_symlink() or file.exists():
            file = _inside(real_root, file, f"{relative}/{name}")
        if not file.is_file():
            raise AdapterFolderError(
                f"adapter folder {relative!r} has no {name}: the server loads only PEFT "
                f"folders with safetensors weights (save_pretrained writes {ADAPTER_WEIGHTS})"
            )
    pickles = sorted(path.name for path in folder.iterdir() if path.suffix in PICKLE_SUFFIXES)
    if pickles:
        raise AdapterFolderError(
            f"adapter folder {relative!r} holds pickle-format files {pickles}, which can run "
            f"code when loaded; keep only {ADAPTER_WEIGHTS} and {ADAPTER_CONFIG} (convert with "
            "lorakit's or peft's save_pretrained(..., safe_serialization=True))"
        )
    return folder


def _inside(real_root: Path, path: Path, shown: str) -> Path:
    """`path` with symlinks resolved; an error if that leaves the root."""
    try:
        real = path.resolve(strict=True)
    except (FileNotFoundError, NotADirectoryError):
        raise AdapterFolderError(
            f"adapter path {shown!r} does not exist in the adapters root; folders there: "
            f"{_folders(real_root)}"
        ) from None
    if not real.is_relative_to(real_root):
        raise AdapterFolderError(
            f"adapter path {shown!r} resolves to a place outside the adapters root (a "
            "symlink pointing out of it): copy the adapter into the root instead"
        )
    return real


def _folders(real_root: Path) -> list[str]:
    """The root's top-level folders, for error messages."""
    return sorted(path.name for path in real_root.iterdir() if path.is_dir())[:20]


def adapter_json(info: Any) -> dict[str, Any]:
    """An `AdapterInfo` as JSON, with OpenAI's `id` and `object` fields."""
    return {"id": info.name, "object": "adapter", **asdict(info)}


def parse_load(body: dict[str, Any]) -> tuple[str, str]:
    """`POST /v1/adapters`'s {"name", "path"} (path relative to the adapters root)."""
    if set(body) != {"name", "path"} or not all(isinstance(body[k], str) for k in body):
        raise RequestFieldError(
            'POST /v1/adapters takes {"name": NAME, "path": FOLDER}, FOLDER relative to the '
            f"adapters root; got the fields {sorted(body)}"
        )
    if body["name"] == BASE_ADAPTER:
        raise RequestFieldError(f"{BASE_ADAPTER!r} names the base; choose another name", "name")
    return check_adapter_name(body["name"]), body["path"]


def parse_wait(query: dict[str, str]) -> bool:
    """`DELETE /v1/adapters/{name}`'s ``?wait=true|false`` (default true)."""
    unknown = sorted(set(query) - {"wait"})
    value = query.get("wait", "true")
    if unknown or value not in ("true", "false"):
        raise RequestFieldError(
            f"DELETE /v1/adapters/NAME takes only ?wait=true|false; got {query}", "wait"
        )
    return value == "true"
