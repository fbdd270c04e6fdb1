"""reasoning-gym: offline procedural task families with their own answer scorers.

Each entry is stored whole in :attr:`Example.meta` as JSON so the family's scorer can be called later
in any process. Tuples are written as ``{"__tuple__": [...]}`` so that scorers comparing against tuples
(e.g. ARC boards) see the same values after a round trip; :func:`decode_meta` (kept in
:mod:`fedhmoe.data.types`, beside :class:`Example`, and re-exported here) restores them.
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import math
import os
import subprocess
import sys
from collections.abc import Callable
from functools import cache, lru_cache
from typing import Any

from fedhmoe.data.types import META_TUPLE_KEY, Example, decode_meta
from fedhmoe.utils.seeding import derive_seed

__all__ = ["decode_meta", "encode_meta", "family_seed", "known_families", "load_reasoning_gym", "score_reasoning_gym"]

_RESERVED_OPTIONS = ("seed", "size")


@lru_cache(maxsize=1)
def _known_families() -> tuple[str, ...]:
    from reasoning_gym.factory import DATASETS  # imports every generator (seconds): only when asked

    return tuple(sorted(DATASETS))


def known_families() -> list[str]:
    """Sorted names of all reasoning-gym task families (cached after the first call)."""
    return list(_known_families())


def _json_safe(obj: Any) -> Any:
    if obj is None or isinstance(obj, (str, bool, int)):
        return obj
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else str(obj)
    if isinstance(obj, dict):
        return {str(k): _json_safe(v) for k, v in obj.items()}
    if isinstance(obj, tuple):
        return {META_TUPLE_KEY: [_json_safe(v) for v in obj]}
    if isinstance(obj, list):
        return [_json_safe(v) for v in obj]
    if isinstance(obj, (set, frozenset)):
        items = [_json_safe(v) for v in obj]
        try:
            return sorted(items)
        except TypeError:
            return sorted(items, key=repr)
    item = getattr(obj, "item", None)  # numpy scalars
    if callable(item):
        try:
            return _json_safe(item())
        except (TypeError, ValueError):
            pass
    return str(obj)


def encode_meta(entry: dict[str, Any]) -> str:
    """Serialise a reasoning-gym entry (question, answer, metadata) as JSON text.

    Args:
        entry: The dict a reasoning-gym dataset yields.

    Returns:
        A JSON string; tuples are tagged so :func:`decode_meta` restores them.
    """
    body = {"question": entry.get("question"), "answer": entry.get("answer"), "metadata": entry.get("metadata", {})}
    return json.dumps(_json_safe(body), ensure_ascii=False)


def family_seed(seed: int, family: str) -> int:
    """The 32-bit generation seed of one family, derived from the run seed."""
    return derive_seed(seed, "data:" + family) & 0xFFFFFFFF


def _config_fields(family: str) -> set[str]:
    from reasoning_gym.factory import DATASETS  # imports every generator (seconds): only when asked

    _, config_cls = DATASETS[family]
    return {f.name for f in dataclasses.fields(config_cls)}


def _check_family(family: str) -> None:
    fams = _known_families()
    if family not in fams:
        close = difflib.get_close_matches(family, fams, n=3)
        hint = f" Did you mean: {', '.join(close)}?" if close else ""
        raise ValueError(f"reasoning-gym has no task family {family!r}.{hint}")


def _check_options(family: str, options: dict[str, Any]) -> None:
    if not isinstance(options, dict):
        raise ValueError(f"reasoning-gym options for family {family!r} must be a table, got {options!r}")
    allowed = _config_fields(family) - set(_RESERVED_OPTIONS)
    for name in options:
        if name in _RESERVED_OPTIONS:
            raise ValueError(
                f"reasoning-gym family {family!r}: option {name!r} is set by fedhmoe "
                "(from data.examples-per-task and run.seed); remove it from data.task-options"
            )
        if name not in allowed:
            close = difflib.get_close_matches(name, sorted(allowed), n=3)
            hint = f" Did you mean: {', '.join(close)}?" if close else ""
            raise ValueError(
                f"reasoning-gym family {family!r} has no option {name!r}.{hint} "
                f"Known options: {', '.join(sorted(allowed))}"
            )


def load_reasoning_gym(
    tasks: list[str], examples_per_task: int, task_options: dict[str, dict], seed: int
) -> list[Example]:
    """Generate examples from reasoning-gym families.

    Args:
        tasks: Family names, e.g. ``["basic_arithmetic", "syllogism"]`` (duplicates are ignored).
        examples_per_task: Entries generated per family.
        task_options: Per-family keyword arguments for the family's config.
        seed: Run seed; each family's seed is derived from it and the family name.

    Returns:
        Examples grouped by family in the order of ``tasks``.

    Raises:
        ValueError: For an unknown family, an unknown or invalid option, or entries without an answer.
    """
    if examples_per_task < 1:
        raise ValueError(f"examples_per_task must be at least 1, got {examples_per_task}")
    families = list(dict.fromkeys(tasks))
    for family in families:
        _check_family(family)
    stray = sorted(set(task_options) - set(families))
    if stray:
        raise ValueError(f"reasoning-gym options given for families not in tasks: {stray}")
    for family in families:
        _check_options(family, task_options.get(family, {}))

    rows = _generate_deterministic(families, examples_per_task, task_options, seed)
    return [
        Example(prompt=r["question"], answer=r["answer"], task=r["family"], meta=r["meta"], uid=r["uid"])
        for r in rows
    ]


def _generate(families: list[str], n: int, task_options: dict[str, dict], seed: int) -> list[dict[str, str]]:
    """Generate entries in this process (rows of family, uid, question, answer, meta)."""
    import reasoning_gym  # slow to import (every generator): loaded only when tasks are generated or scored

    rows = []
    for family in families:
        options = dict(task_options.get(family, {}))
        try:
            dataset = reasoning_gym.create_dataset(family, size=n, seed=family_seed(seed, family), **options)
        except (AssertionError, TypeError, ValueError) as e:
            raise ValueError(f"reasoning-gym family {family!r} rejected options {options}: {e}") from e
        for i in range(n):
            entry = dataset[i]
            answer = entry.get("answer")
            if answer is None:
                raise ValueError(
                    f"reasoning-gym family {family!r} yields entries without a reference answer; "
                    "it cannot be used for fine-tuning"
                )
            rows.append({"family": family, "uid": f"{family}/{i}", "question": str(entry["question"]),
                         "answer": str(answer), "meta": encode_meta(entry)})
    return rows


def _generate_deterministic(
    families: list[str], n: int, task_options: dict[str, dict], seed: int
) -> list[dict[str, str]]:
    """Generate with Python's string hashing fixed, so every process and machine gets the same data.

    Some generators iterate over sets of strings (e.g. ``ransom_note``), whose order depends on the
    per-process hash seed; a client in a Ray worker and the driver would otherwise see different examples.
    Generation runs in a child interpreter with ``PYTHONHASHSEED=0`` unless this process already has it.
    """
    if os.environ.get("PYTHONHASHSEED") == "0":
        return _generate(families, n, task_options, seed)
    request = json.dumps({"families": families, "n": n, "options": task_options, "seed": seed})
    env = {**os.environ, "PYTHONHASHSEED": "0"}
    proc = subprocess.run([sys.executable, "-m", "fedhmoe.data.reasoning_gym"], input=request, env=env,
                          capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        lines = [ln for ln in proc.stderr.strip().splitlines() if ln.strip()]
        raise ValueError(lines[-1].split(": ", 1)[-1] if lines else "reasoning-gym generation failed")
    return json.loads(proc.stdout)


@cache
def _score_fn(family: str) -> Callable[[str, dict[str, Any]], float]:
    import reasoning_gym  # slow to import (every generator): loaded only when tasks are generated or scored

    return reasoning_gym.get_score_answer_fn(family)


def score_reasoning_gym(prediction: str, example: Example) -> float:
    """Score a prediction with the family's own scorer.

    Surrounding whitespace is removed first; a trailing period is also tried without it (unless the
    reference answer itself ends with one) and the better score is kept, so the family scorer decides.

    Args:
        prediction: Generated answer text.
        example: A reasoning-gym example (its ``meta`` holds the entry).

    Returns:
        The score in ``[0, 1]``; 0.0 if the scorer fails on this prediction.
    """
    entry = example.meta_fields()
    if not entry:
        raise ValueError(f"example {example.uid or example.task!r} has no reasoning-gym entry in meta")
    metadata = entry.get("metadata") or {}
    family = metadata.get("source_dataset") if isinstance(metadata, dict) else None
    family = family if family in _known_families() else example.task
    fn = _score_fn(family)

    text = (prediction or "").strip()
    candidates = [text]
    reference = str(entry.get("answer") or "")
    if text.endswith(".") and not reference.rstrip().endswith("."):
        candidates.append(text[:-1].rstrip())
    best = 0.0
    for cand in candidates:
        try:
            score = float(fn(cand, entry))
        except Exception:  # a family scorer may raise on malformed answers
            score = 0.0
        if math.isfinite(score):
            best = max(best, score)
    return min(1.0, best)


if __name__ == "__main__":  # the child interpreter of _generate_deterministic
    _req = json.loads(sys.stdin.read())
    sys.stdout.write(json.dumps(_generate(_req["families"], _req["n"], _req["options"], _req["seed"])))
