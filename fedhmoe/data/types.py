"""Plain data records shared by every data source, partitioner and formatter."""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

__all__ = ["META_TUPLE_KEY", "SPLITS", "ClientData", "Example", "decode_meta"]

SPLITS: tuple[str, ...] = ("train", "aux", "val", "test")

#: ``Example.meta`` writes a tuple as ``{META_TUPLE_KEY: [...]}`` (JSON has none); :func:`decode_meta` restores it.
META_TUPLE_KEY = "__tuple__"


def _restore_tuples(d: dict[str, Any]) -> Any:
    if len(d) == 1 and META_TUPLE_KEY in d and isinstance(d[META_TUPLE_KEY], list):
        return tuple(d[META_TUPLE_KEY])
    return d


def decode_meta(meta: str) -> dict[str, Any]:
    """Parse :attr:`Example.meta` text into a dict (tagged tuples become tuples again).

    Args:
        meta: JSON text, possibly empty.

    Returns:
        The decoded dict; ``{}`` for empty text; ``{"value": x}`` when the JSON is not an object.

    Raises:
        json.JSONDecodeError: If the text is not JSON.
    """
    if not meta:
        return {}
    out = json.loads(meta, object_hook=_restore_tuples)
    return out if isinstance(out, dict) else {"value": out}


@dataclass(frozen=True)
class Example:
    """One prompt/answer pair.

    Attributes:
        prompt: The question or instruction (plus its input), with no chat template applied.
        answer: Reference target text.
        task: Task family (reasoning-gym dataset name) or category name.
        label: Partition label for label-skew partitioning; empty means use ``task``.
        choices: Verbalised options for classification tasks; ``answer`` is one of them.
        meta: JSON string the task's scorer needs (e.g. the reasoning-gym entry).
        uid: Stable id, e.g. ``"basic_arithmetic/17"``.
    """

    prompt: str
    answer: str
    task: str
    label: str = ""
    choices: tuple[str, ...] = ()
    meta: str = ""
    uid: str = ""

    @property
    def partition_label(self) -> str:
        """The label used by label-skew partitioners: ``label`` when set, else ``task``."""
        return self.label or self.task

    def meta_fields(self) -> dict[str, Any]:
        """``meta`` decoded by :func:`decode_meta`; ``{}`` when it is empty or not JSON (such an example simply
        carries no fields: its readers then fall back to ``answer`` and ``task``).

        Parsed anew on every call and not cached, so a caller may modify the result, and examples kept in
        memory hold only the text.
        """
        try:
            return decode_meta(self.meta)
        except json.JSONDecodeError:
            return {}


@dataclass(frozen=True)
class ClientData:
    """The examples one client owns, already split.

    Attributes:
        client: Client id in ``0..N-1``.
        train: Local training examples.
        aux: Examples reserved for method statistics (may be empty).
        val: Validation examples (model selection).
        test: Final test examples.
    """

    client: int
    train: tuple[Example, ...]
    aux: tuple[Example, ...]
    val: tuple[Example, ...]
    test: tuple[Example, ...]

    @property
    def tasks(self) -> list[str]:
        """Sorted distinct tasks over all of the client's splits."""
        return sorted({ex.task for name in SPLITS for ex in getattr(self, name)})

    def split(self, name: str) -> tuple[Example, ...]:
        """Return one split by name.

        Args:
            name: One of ``"train"``, ``"aux"``, ``"val"``, ``"test"``.

        Raises:
            ValueError: If ``name`` is not a split name.
        """
        if name not in SPLITS:
            raise ValueError(f"unknown split {name!r}; expected one of {', '.join(SPLITS)}")
        return getattr(self, name)
