"""Adapter folders a client may load: inside the adapters root, safetensors only (real files)."""

from __future__ import annotations

from pathlib import Path

import pytest

from lorakit.serve.http_adapters import check_adapter_name, resolve_adapter_folder
from lorakit.serve.http_errors import AdapterFolderError, error_payload


def _adapter_folder(folder: Path) -> Path:
    folder.mkdir(parents=True)
    (folder / "adapter_config.json").write_text('{"peft_type": "LORA", "r": 2}')
    (folder / "adapter_model.safetensors").write_bytes(b"not read by these checks")
    return folder


@pytest.fixture
def root(tmp_path: Path) -> Path:
    root = tmp_path / "adapters"
    _adapter_folder(root / "sql")
    _adapter_folder(root / "customers" / "acme")
    _adapter_folder(tmp_path / "outside")
    return root


def test_folders_inside_the_root_resolve_to_their_real_path(root: Path) -> None:
    assert resolve_adapter_folder(root, "sql") == (root / "sql").resolve()
    assert resolve_adapter_folder(root, "customers/acme") == (root / "customers/acme").resolve()
    (root / "latest").symlink_to(root / "sql")  # a link that stays inside is fine
    assert resolve_adapter_folder(root, "latest") == (root / "sql").resolve()


@pytest.mark.parametrize(
    ("relative", "message"),
    [
        ("../outside", "leaves the adapters root: '..' is not allowed"),
        ("sql/../../outside", "leaves the adapters root"),
        ("/etc", "must be a folder relative to the adapters root"),
        ("", "must be a folder relative to the adapters root"),
        ("..\\outside", "must be a folder relative to the adapters root"),
        (
            "missing",
            r"'missing' does not exist in the adapters root; folders there: \['customers', 'sql'\]",
        ),
        ("customers", "has no adapter_model.safetensors"),
    ],
)
def test_paths_that_escape_or_do_not_exist_are_refused(
    root: Path, relative: str, message: str
) -> None:
    with pytest.raises(AdapterFolderError, match=message) as raised:
        resolve_adapter_folder(root, relative)
    assert error_payload(raised.value)[0] == 400


def test_symlinks_pointing_out_of_the_root_are_refused(root: Path, tmp_path: Path) -> None:
    (root / "escape").symlink_to(tmp_path / "outside", target_is_directory=True)
    with pytest.raises(AdapterFolderError, match=r"outside the adapters root \(a symlink"):
        resolve_adapter_folder(root, "escape")
    # A real folder inside whose weights file links to a file outside is refused as well.
    linked = root / "linked"
    linked.mkdir()
    (linked / "adapter_config.json").write_text("{}")
    (linked / "adapter_model.safetensors").symlink_to(
        tmp_path / "outside" / "adapter_model.safetensors"
    )
    with pytest.raises(AdapterFolderError, match=r"'linked/adapter_model\.safetensors' resolves"):
        resolve_adapter_folder(root, "linked")


@pytest.mark.parametrize("name", ["adapter_model.bin", "optimizer.pt", "extra.pkl", "x.ckpt"])
def test_folders_holding_pickle_files_are_refused(root: Path, name: str) -> None:
    (root / "sql" / name).write_bytes(b"\x80\x04")
    with pytest.raises(AdapterFolderError, match=rf"holds pickle-format files \['{name}'\]"):
        resolve_adapter_folder(root, "sql")


def test_a_folder_with_only_pickle_weights_names_the_safetensors_file(root: Path) -> None:
    old = root / "old"
    old.mkdir()
    (old / "adapter_config.json").write_text("{}")
    (old / "adapter_model.bin").write_bytes(b"\x80\x04")
    with pytest.raises(AdapterFolderError, match=r"'old' has no adapter_model\.safetensors"):
        resolve_adapter_folder(root, "old")


def test_adapter_names_are_url_safe() -> None:
    assert check_adapter_name("sql-v2.1_b") == "sql-v2.1_b"
    for bad in ("", "a/b", "-x", "x" * 65, "name with space"):
        with pytest.raises(AdapterFolderError, match="is not allowed: use 1 to 64 letters"):
            check_adapter_name(bad)
