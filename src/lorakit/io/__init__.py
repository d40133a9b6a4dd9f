"""PEFT's adapter format: state-dict keys (`keys`) and files (`files`), nothing else.

`atomic` holds the one way lorakit writes any file; import it as `lorakit.io.atomic`.
"""

from lorakit.io.errors import (
    AdapterConfigError,
    AdapterDeviceError,
    AdapterFileError,
    AdapterMismatch,
    AdapterMismatchError,
    AdapterNotFoundError,
    CorruptAdapterFileError,
    PickleAdapterRefusedError,
    ShapeMismatch,
)
from lorakit.io.files import (
    CONFIG_NAME,
    DEFAULT_ADAPTER_NAME,
    PICKLE_WEIGHTS_NAME,
    SAFETENSORS_WEIGHTS_NAME,
    adapter_directory,
    load_adapter_files,
    read_adapter_config,
    reader_device,
    save_adapter_files,
    save_adapters_together,
)
from lorakit.io.keys import (
    adapter_state_dict,
    embedding_prefixes_to_save,
    find_mismatches,
    is_embedding_targeted,
    model_keys_for,
)

__all__ = [
    "CONFIG_NAME",
    "DEFAULT_ADAPTER_NAME",
    "PICKLE_WEIGHTS_NAME",
    "SAFETENSORS_WEIGHTS_NAME",
    "AdapterConfigError",
    "AdapterDeviceError",
    "AdapterFileError",
    "AdapterMismatch",
    "AdapterMismatchError",
    "AdapterNotFoundError",
    "CorruptAdapterFileError",
    "PickleAdapterRefusedError",
    "ShapeMismatch",
    "adapter_directory",
    "adapter_state_dict",
    "embedding_prefixes_to_save",
    "find_mismatches",
    "is_embedding_targeted",
    "load_adapter_files",
    "model_keys_for",
    "read_adapter_config",
    "reader_device",
    "save_adapter_files",
    "save_adapters_together",
]
