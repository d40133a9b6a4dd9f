"""The integrations import without transformers or trl; their trainers then name the extra."""

from __future__ import annotations

import subprocess
import sys

# Run in a fresh interpreter where importing these packages fails, as on a plain install.
PROBE = """
import sys
for name in ("transformers", "trl", "accelerate", "peft", "datasets"):
    sys.modules[name] = None
import lorakit.integrations.transformers as hf, lorakit.integrations.trl as trl_module
from lorakit.extras import MissingDependencyError
for module, name in ((hf, "LorakitTrainer"), (trl_module, "LorakitSFTTrainer")):
    try:
        getattr(module, name)
    except MissingDependencyError as error:
        print(error)
"""


def test_trainers_without_their_library_raise_errors_naming_the_extra() -> None:
    result = subprocess.run([sys.executable, "-c", PROBE], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert len(lines) == 2, result.stdout
    assert lines[0].startswith(
        "lorakit.integrations.transformers.LorakitTrainer needs the package 'transformers'"
    )
    assert lines[0].endswith('pip install "lorakit[transformers]"')
    assert lines[1].startswith("lorakit.integrations.trl.LorakitSFTTrainer needs the package 'trl'")
    assert lines[1].endswith('pip install "lorakit[trl]"')
