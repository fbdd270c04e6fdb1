"""Shared by the benchmark scripts: print a markdown table and optionally append it to a file."""

from __future__ import annotations


def emit(text: str, write: str | None) -> None:
    """Print ``text``; when ``write`` names a file, append ``text`` and a blank line to it."""
    print(text)
    if write:
        with open(write, "a") as f:
            f.write(text + "\n\n")
