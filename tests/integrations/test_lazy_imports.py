"""The integrations import without transformers or trl; their trainers then name the fix."""

from __future__ import annotations

import subprocess
import sys

# Run in a fresh interpreter where importing these packages fails, as on a plain install.
PROBE = """
import sys
for name in ("transformers", "trl", "accelerate", "peft", "datasets"):
    sys.modules[name] = None
import lorakit.integrations.transformers as hf, lorakit.integrations.trl as trl_module
for module, name in ((hf, "LorakitTrainer"), (trl_module, "LorakitSFTTrainer")):
    try:
        getattr(module, name)
    except ImportError as error:
        print(error)
"""


def test_trainers_without_their_library_raise_import_errors_naming_the_fix() -> None:
    result = subprocess.run([sys.executable, "-c", PROBE], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines() == [
        "lorakit.integrations.transformers.LorakitTrainer needs transformers. Fix: pip install "
        '"lorakit[transformers]".',
        "lorakit.integrations.trl.LorakitSFTTrainer needs trl. Fix: pip install trl.",
    ]
