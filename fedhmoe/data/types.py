"""Plain data records shared by every data source, partitioner and formatter."""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["SPLITS", "ClientData", "Example"]

SPLITS: tuple[str, ...] = ("train", "aux", "val", "test")


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
