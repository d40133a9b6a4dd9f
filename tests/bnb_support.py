"""bitsandbytes as a test oracle: imported once, with the reason to skip where it cannot be."""

from __future__ import annotations

import importlib
import warnings
from types import ModuleType


def import_bitsandbytes(module: str = "bitsandbytes") -> tuple[ModuleType | None, str]:
    """(the module, "") or (None, why it cannot be imported here), for `pytest.mark.skipif`.

    A missing native library raises more than ImportError, so every exception counts.
    """
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return importlib.import_module(module), ""
    except Exception as error:
        return None, f"bitsandbytes cannot be imported here ({error!r})"
