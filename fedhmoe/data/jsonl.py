"""A local JSON Lines file of instruction/output records."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from fedhmoe.data.types import Example

__all__ = ["join_prompt", "jsonl_client_id", "load_jsonl"]


def join_prompt(instruction: str, input_text: str = "") -> str:
    """The instruction, followed by a blank line and the input when the input is non-empty."""
    return f"{instruction}\n\n{input_text}" if input_text else instruction


def jsonl_client_id(example: Example) -> int | None:
    """The ``client_id`` a jsonl row carried, or None."""
    cid = example.meta_fields().get("client_id")
    return cid if isinstance(cid, int) and not isinstance(cid, bool) else None


def _row(path: str, lineno: int, obj: Any) -> Example:
    def fail(problem: str) -> ValueError:
        return ValueError(f"{path}, line {lineno}: {problem}")

    if not isinstance(obj, dict):
        raise fail(f"expected a JSON object, got {type(obj).__name__}")
    for key in ("instruction", "output"):
        if key not in obj:
            raise fail(f"missing required key {key!r}")
        if not isinstance(obj[key], str):
            raise fail(f"key {key!r} must be a string, got {type(obj[key]).__name__}")
    input_text = obj.get("input", "")
    if input_text is None:
        input_text = ""
    if not isinstance(input_text, str):
        raise fail(f"key 'input' must be a string, got {type(input_text).__name__}")
    category = obj.get("category", "default")
    if not isinstance(category, str) or not category:
        raise fail(f"key 'category' must be a non-empty string, got {category!r}")
    choices: tuple[str, ...] = ()
    if obj.get("choices") is not None:
        raw = obj["choices"]
        if not isinstance(raw, list) or not raw or not all(isinstance(c, str) for c in raw):
            raise fail(f"key 'choices' must be a non-empty list of strings, got {raw!r}")
        choices = tuple(raw)
        if obj["output"] not in choices:
            raise fail(f"output {obj['output']!r} is not one of the choices {list(choices)}")
    meta = ""
    if obj.get("client_id") is not None:
        cid = obj["client_id"]
        if not isinstance(cid, int) or isinstance(cid, bool) or cid < 0:
            raise fail(f"key 'client_id' must be a non-negative integer, got {cid!r}")
        meta = json.dumps({"client_id": cid})
    return Example(
        prompt=join_prompt(obj["instruction"], input_text),
        answer=obj["output"],
        task=category,
        choices=choices,
        meta=meta,
        uid=f"{Path(path).name}/{lineno}",
    )


def load_jsonl(path: str) -> list[Example]:
    """Read one example per line.

    Keys: ``instruction`` and ``output`` (required strings), ``input`` (optional, appended to the
    prompt after a blank line), ``category`` (the task, default ``"default"``), ``choices`` (optional
    list of strings containing ``output``) and ``client_id`` (optional int, kept in ``meta`` as
    ``{"client_id": ...}``). Blank lines are skipped; other keys are ignored.

    Args:
        path: The file to read.

    Returns:
        The examples in file order.

    Raises:
        FileNotFoundError: If the file does not exist.
        ValueError: Naming the file and line of bad JSON, a missing key or an output not in its choices.
    """
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"jsonl data file '{path}' does not exist (set data.path)")
    out: list[Example] = []
    with p.open(encoding="utf-8") as fh:
        for lineno, line in enumerate(fh, start=1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}, line {lineno}: invalid JSON ({e.msg} at column {e.colno})") from e
            out.append(_row(str(path), lineno, obj))
    if not out:
        raise ValueError(f"{path}: the file holds no examples")
    return out
