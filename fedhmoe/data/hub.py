"""Hub datasets of the papers, read from local copies the user downloaded.

``path`` is a data file (``.jsonl``, ``.json``, ``.parquet``), a folder holding such files (searched
recursively; every file found is used), or a folder written by ``datasets.save_to_disk``. Nothing is
fetched from the network.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from fedhmoe.data.jsonl import join_prompt
from fedhmoe.data.types import Example

__all__ = ["AG_NEWS_CLASSES", "HUB_SOURCES", "SNLI_ANSWERS", "load_hub", "load_hub_mix"]

SNLI_ANSWERS: tuple[str, ...] = ("Yes", "Maybe", "No")
AG_NEWS_CLASSES: tuple[str, ...] = ("World", "Sports", "Business", "Sci/Tech")

_FORMATS = {".jsonl": "json", ".json": "json", ".parquet": "parquet"}
_NOT_DATA = {"dataset_info.json", "dataset_infos.json", "state.json", "dataset_dict.json"}

# Canonical column -> accepted names, in order of preference. Columns marked optional may be absent.
_COLUMNS: dict[str, dict[str, tuple[str, ...]]] = {
    "snli": {"premise": ("premise",), "hypothesis": ("hypothesis",), "label": ("label",)},
    "dolly": {"instruction": ("instruction",), "context": ("context",), "response": ("response",),
              "category": ("category",)},
    "natural-instructions": {"task_name": ("task_name", "task"), "definition": ("definition", "Definition"),
                             "input": ("input", "inputs"), "output": ("output", "outputs", "targets")},
    "ag-news": {"text": ("text",), "label": ("label",)},
    "squad": {"context": ("context",), "question": ("question",), "answers": ("answers",), "title": ("title",)},
    "xsum": {"document": ("document",), "summary": ("summary",)},
}
_OPTIONAL: dict[str, set[str]] = {
    "dolly": {"context", "category"},
    "natural-instructions": {"input"},
    "squad": {"title"},
}

HUB_SOURCES: tuple[str, ...] = tuple(_COLUMNS)


def _snli(row: dict[str, Any], uid: str) -> Example | None:
    label = row["label"]
    if isinstance(label, str):
        label = {"entailment": 0, "neutral": 1, "contradiction": 2}.get(label.lower(), -1)
    if label is None or not 0 <= int(label) <= 2:
        return None
    answer = SNLI_ANSWERS[int(label)]
    prompt = f'Suppose {row["premise"]} Can we infer that "{row["hypothesis"]}"? Yes, No, or Maybe?'
    return Example(prompt=prompt, answer=answer, task="snli", label=answer, choices=SNLI_ANSWERS, uid=uid)


def _dolly(row: dict[str, Any], uid: str) -> Example | None:
    category = row.get("category") or "default"
    prompt = join_prompt(str(row["instruction"]), str(row.get("context") or ""))
    return Example(prompt=prompt, answer=str(row["response"]), task=category, label=category, uid=uid)


def _natural_instructions(row: dict[str, Any], uid: str) -> Example | None:
    definition = row["definition"]
    if isinstance(definition, list):
        definition = definition[0] if definition else ""
    output = row["output"]
    if isinstance(output, list):
        if not output:
            return None
        output = output[0]
    if output is None:
        return None
    prompt = join_prompt(str(definition), str(row.get("input") or ""))
    return Example(prompt=prompt, answer=str(output), task=str(row["task_name"]), uid=uid)


def _ag_news(row: dict[str, Any], uid: str) -> Example | None:
    label = row["label"]
    if isinstance(label, str):
        if label not in AG_NEWS_CLASSES:
            return None
        answer = label
    else:
        if label is None or not 0 <= int(label) < len(AG_NEWS_CLASSES):
            return None
        answer = AG_NEWS_CLASSES[int(label)]
    prompt = (
        "What is the topic of this news article? Answer with one of: "
        f"{', '.join(AG_NEWS_CLASSES)}.\n\n{row['text']}"
    )
    return Example(prompt=prompt, answer=answer, task="ag-news", label=answer, choices=AG_NEWS_CLASSES, uid=uid)


def _squad(row: dict[str, Any], uid: str) -> Example | None:
    answers = row["answers"]
    texts: list[str] = []
    if isinstance(answers, dict):
        texts = list(answers.get("text") or [])
    elif isinstance(answers, list):
        texts = [a.get("text", "") if isinstance(a, dict) else str(a) for a in answers]
    texts = [t for t in texts if t]
    if not texts:
        return None
    prompt = (
        "Read the passage and answer the question with a short span from it.\n\n"
        f"Passage: {row['context']}\n\nQuestion: {row['question']}"
    )
    return Example(prompt=prompt, answer=texts[0], task="squad", label=str(row.get("title") or ""), uid=uid,
                   meta=json.dumps({"answers": texts}))  # token F1 takes the best of the reference answers


def _xsum(row: dict[str, Any], uid: str) -> Example | None:
    prompt = f"Summarize the following article in one sentence.\n\n{row['document']}"
    return Example(prompt=prompt, answer=str(row["summary"]), task="xsum", uid=uid)


_CONVERTERS: dict[str, Callable[[dict[str, Any], str], Example | None]] = {
    "snli": _snli,
    "dolly": _dolly,
    "natural-instructions": _natural_instructions,
    "ag-news": _ag_news,
    "squad": _squad,
    "xsum": _xsum,
}


@contextmanager
def _quiet_datasets() -> Iterator[None]:
    import datasets  # heavy (pyarrow, pandas): loaded only when a Hub source is read

    was_enabled = datasets.is_progress_bar_enabled()
    datasets.disable_progress_bars()
    try:
        yield
    finally:
        if was_enabled:
            datasets.enable_progress_bars()


def _data_files(root: Path) -> list[Path]:
    if root.is_file():
        if root.suffix not in _FORMATS:
            raise ValueError(f"data file '{root}' must end in {', '.join(sorted(_FORMATS))}")
        return [root]
    files = sorted(
        p for p in root.rglob("*")
        if p.is_file() and p.suffix in _FORMATS and p.name not in _NOT_DATA
        and not any(part.startswith(".") for part in p.relative_to(root).parts)
    )
    if not files:
        raise ValueError(f"folder '{root}' holds no {', '.join(sorted(_FORMATS))} files")
    return files


def _tables(root: Path) -> Iterator[tuple[str, Any]]:
    """Yield (name, datasets.Dataset) for every table under ``root``."""
    import datasets  # heavy: loaded only when a Hub source is read

    if root.is_dir() and ((root / "dataset_dict.json").is_file() or (root / "state.json").is_file()):
        loaded = datasets.load_from_disk(str(root))
        if isinstance(loaded, datasets.DatasetDict):
            for split in sorted(loaded):
                yield f"{root.name}/{split}", loaded[split]
        else:
            yield root.name, loaded
        return
    for f in _data_files(root):
        try:
            ds = datasets.load_dataset(_FORMATS[f.suffix], data_files=[str(f)], split="train")
        except Exception as e:
            raise ValueError(f"could not read data file '{f}': {e}") from e
        yield (str(f.relative_to(root)) if root.is_dir() else f.name), ds


def _resolve_columns(source: str, name: str, columns: list[str]) -> dict[str, str]:
    out: dict[str, str] = {}
    for canon, names in _COLUMNS[source].items():
        found = next((n for n in names if n in columns), None)
        if found is not None:
            out[canon] = found
        elif canon not in _OPTIONAL.get(source, set()):
            raise ValueError(
                f"{source} data '{name}' has no column {canon!r} (accepted names: {', '.join(names)}); "
                f"found columns: {', '.join(columns)}"
            )
    return out


def load_hub(source: str, path: str, tasks: list[str]) -> list[Example]:
    """Load one of the papers' Hub datasets from a local copy.

    Args:
        source: One of ``snli``, ``dolly``, ``natural-instructions``, ``ag-news``, ``squad``, ``xsum``.
        path: Local file or folder with the data (see the module docstring).
        tasks: Tasks or categories to keep (matched against ``task`` or ``label``); empty keeps all.

    Returns:
        The examples in file and row order.

    Raises:
        ValueError: For an unknown source, a missing path or column, or when nothing is left after
            filtering by ``tasks``.
        FileNotFoundError: If ``path`` does not exist.
    """
    if source not in _CONVERTERS:
        raise ValueError(f"unknown Hub source {source!r}; known: {', '.join(HUB_SOURCES)}")
    if not path:
        raise ValueError(
            f"the {source} dataset is not bundled: download it yourself (e.g. with `huggingface-cli download "
            f"--repo-type dataset ...` on a machine with network) and pass the local file or folder via data.path"
        )
    root = Path(path).expanduser()
    if not root.exists():
        raise FileNotFoundError(
            f"data.path '{path}' does not exist; the {source} dataset must be downloaded by the user and "
            "its local file or folder passed via data.path"
        )
    convert = _CONVERTERS[source]
    keep = set(tasks)
    out: list[Example] = []
    seen: set[str] = set()
    with _quiet_datasets():
        for name, ds in _tables(root):
            cols = _resolve_columns(source, name, list(ds.column_names))
            index = 0
            for batch in ds.iter(batch_size=4096):
                size = len(next(iter(batch.values()))) if batch else 0
                for i in range(size):
                    row = {canon: batch[col][i] for canon, col in cols.items()}
                    ex = convert(row, f"{source}/{name}/{index}")
                    index += 1
                    if ex is None:
                        continue
                    seen.add(ex.task)
                    if keep and ex.task not in keep and ex.label not in keep:
                        continue
                    out.append(ex)
    if not out:
        if keep:
            raise ValueError(
                f"no {source} examples left after keeping data.tasks {sorted(keep)}; the data has tasks "
                f"{sorted(seen)[:20]}; set data.tasks = [] to keep everything"
            )
        raise ValueError(f"the {source} data at '{path}' holds no usable examples")
    return out


def load_hub_mix(path: str, sources: list[str]) -> list[Example]:
    """Several Hub datasets as one pool, one task per dataset (FedMoE: AG News, SQuAD and XSum side by side).

    Args:
        path: A folder with one sub-folder (or file stem) per source, named as the source (``ag-news/``,
            ``squad/``, ``xsum/``, ...), each readable by :func:`load_hub`.
        sources: The Hub sources to mix; each becomes the ``task`` of its examples, and the dataset's own
            category or class stays the partition ``label``.

    Returns:
        The examples of every source, source by source.
    """
    if not sources:
        raise ValueError("the hub-mix source needs data.tasks: the Hub datasets to mix, e.g. ['ag-news', 'squad']")
    root = Path(path).expanduser()
    out: list[Example] = []
    for src in sources:
        found = [p for p in (root / src, *root.glob(f"{src}.*")) if p.exists()]
        if not found:
            raise FileNotFoundError(f"hub-mix: no '{src}' folder or file under {root}")
        for ex in load_hub(src, str(found[0]), []):
            out.append(dataclasses.replace(ex, task=src, label=ex.partition_label))
    return out
