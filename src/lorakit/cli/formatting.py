"""Help output of the `lorakit` command: one formatter, option texts read from docstrings.

Each option is documented once, in its owner's Google-style docstring (`TrainConfig`,
`LoraConfig`, `QuantConfig`, `load_quantized`); `attribute_docs` reads those entries, so
`--help` shows the words the API documentation shows.
"""

from __future__ import annotations

import argparse
import inspect
import re
import shutil
import textwrap

# Lines stay readable on wide terminals; narrower ones (80 columns) get their own width.
MAX_WIDTH = 100
# Column where option help starts; an option with a longer name puts its help on the next line.
HELP_POSITION = 28
SHOWN_DEFAULT = "shown_default"  # attribute of an argparse action: the default to display
_ENTRY = re.compile(r"^ {4}(\w+): (.*)$")  # "    name: text" (continuations are indented more)


class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """Wraps option help to the terminal and keeps descriptions and examples as written.

    An action carrying a ``shown_default`` attribute (see `show_default`) gets
    "(default: ...)" after its help: the flags themselves default to None so that a flag
    given overrides the config file and one left out does not.
    """

    def __init__(self, prog: str) -> None:
        width = min(shutil.get_terminal_size().columns, MAX_WIDTH) - 2
        super().__init__(prog, max_help_position=HELP_POSITION, width=width)

    def _split_lines(self, text: str, width: int) -> list[str]:
        # argparse's own split, without breaking words such as all-linear at their hyphens
        return textwrap.wrap(" ".join(text.split()), width, break_on_hyphens=False)

    def _get_help_string(self, action: argparse.Action) -> str | None:
        text = action.help
        default = getattr(action, SHOWN_DEFAULT, None)
        if text is None or default is None:
            return text
        return f"{text} (default: {escape(str(default))})"


def show_default(action: argparse.Action, value: object) -> argparse.Action:
    """Make `HelpFormatter` display ``value`` as the default of ``action`` (None: nothing)."""
    setattr(action, SHOWN_DEFAULT, None if value is None or value is False else value)
    return action


def escape(text: str) -> str:
    """``text`` as an argparse help string (argparse %-formats help, so % is doubled)."""
    return text.replace("%", "%%")


def attribute_docs(owner: object, section: str = "Attributes") -> dict[str, str]:
    """The entries of a Google-style docstring section, each description on one line.

    Args:
        owner: a class or function whose docstring has the section.
        section: the section's title, e.g. "Attributes" or "Args".

    Returns:
        name -> description, continuation lines joined with single spaces.
    """
    lines = (inspect.getdoc(owner) or "").splitlines()
    header = f"{section}:"
    if header not in lines:
        return {}
    entries: dict[str, list[str]] = {}
    name = ""
    for line in lines[lines.index(header) + 1 :]:
        if line and not line.startswith(" "):  # the next section
            break
        match = _ENTRY.match(line)
        if match:
            name = match.group(1)
            entries[name] = [match.group(2).strip()]
        elif line.strip() and name:
            entries[name].append(line.strip())
    return {key: " ".join(parts) for key, parts in entries.items()}
