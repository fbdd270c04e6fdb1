"""A model card for an exported client model: ``README.md`` in the Hugging Face style.

YAML front matter (``base_model``, ``library_name``, ``tags``), then what the model is (method, client, round,
base model), how to load the folder, the client's tasks and test scores (from the run's ``metrics.jsonl`` and
``summary.json``), and the run's resolved config in a TOML block. Plain text in, text out: no torch here.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

__all__ = ["CardFacts", "model_card"]

# columns of a metrics row that are bookkeeping, not scores
_NOT_SCORES = {"round", "client", "split", "num-examples", "bytes-up", "bytes-down", "eval-seconds", "train-seconds"}


@dataclass(frozen=True)
class CardFacts:
    """What a model card says of one exported client model.

    Attributes:
        algorithm: The method's registry name (``algorithm.name``).
        method_text: One sentence on the method.
        adapter_kind: The adapter kind the model carries (``lora``, ``amole``, ``moe``).
        client: Client id.
        round: The checkpointed round the model is from.
        num_rounds: ``federation.num-rounds`` of the run.
        source: ``global`` (the client's keys of the server state) or ``personal`` (its own state).
        run_name: The run directory's name.
        base_model: The base model's id or path (front matter ``base_model``).
        base_text: What the base model is, in a sentence or two.
        library: Front matter ``library_name`` (``peft``, ``transformers``, ``fedhmoe``).
        files_text: What the folder holds and how to load it.
        config_toml: The run's resolved config.
        tasks: The client's tasks.
        data_text: Where the client's data came from (source, partition).
    """

    algorithm: str
    method_text: str
    adapter_kind: str
    client: int
    round: int
    num_rounds: int
    source: str
    run_name: str
    base_model: str
    base_text: str
    library: str
    files_text: str
    config_toml: str
    tasks: tuple[str, ...]
    data_text: str


def _yaml_str(text: str) -> str:
    """A YAML double-quoted scalar (JSON's string syntax is a subset of it)."""
    return json.dumps(text, ensure_ascii=False)


def _num(v: Any) -> str:
    return f"{v:.4g}" if isinstance(v, (int, float)) and not isinstance(v, bool) else "–"


def _test_row(rows: Sequence[Mapping[str, Any]], client: int, r: int) -> Mapping[str, Any] | None:
    found = [x for x in rows if x.get("split") == "test" and x.get("client") == client and x.get("round") == r]
    return found[-1] if found else None  # a resumed run may have logged a round twice: the later row counts


def _scores(facts: CardFacts, summary: Mapping[str, Any], rows: Sequence[Mapping[str, Any]]) -> list[str]:
    """The client's tasks and a table of its test scores: before training, this model, best on validation."""
    mine = dict(summary.get("clients", {}).get(str(facts.client), {}))
    tasks = ", ".join(f"`{t}`" for t in facts.tasks) or "not recorded (the run has no summary.json)"
    out = [f"Tasks: {tasks}. {facts.data_text}", ""]
    wanted = [("before training", 0), ("this model", facts.round)]
    best = mine.get("best-val-round")
    if isinstance(best, int) and best != facts.round:
        wanted.append(("best on validation", best))
    table = [(label, r, _test_row(rows, facts.client, r)) for label, r in wanted]
    cols = sorted({k for _, _, row in table if row for k, v in row.items()
                   if k not in _NOT_SCORES and isinstance(v, (int, float))}, key=lambda k: (k != "score", k))
    if any(row for _, _, row in table):
        out += ["Test split of this client (`metrics.jsonl`):", "",
                "| | round | " + " | ".join(cols) + " |", "|---|---|" + "---|" * len(cols)]
        for label, r, row in table:
            cells = [_num(row.get(c)) if row else "not evaluated" for c in cols]
            out.append(f"| {label} | {r} | " + " | ".join(cells) + " |")
        out.append("")
    else:
        out += [f"The run logged no test score of client {facts.client} (no `metrics.jsonl` rows).", ""]
    if best is not None and "best" in mine:
        out.append(f"Chosen on validation, the run's best round for this client was {best} (test score "
                   f"{_num(mine['best'])}).")
    final = summary.get("final")
    if isinstance(final, Mapping) and "mean" in final:
        n = len(summary.get("clients", {}))
        out.append(f"Over the run's {n} clients after the last round: test score {_num(final['mean'])} ± "
                   f"{_num(final.get('std'))} (`summary.json`).")
    return out


def model_card(facts: CardFacts, summary: Mapping[str, Any], rows: Sequence[Mapping[str, Any]]) -> str:
    """The ``README.md`` of an exported client model.

    Args:
        facts: What the model is.
        summary: The run's ``summary.json`` (empty when the run has none).
        rows: The run's ``metrics.jsonl`` rows.
    """
    trained = sorted({int(x["round"]) for x in rows if x.get("split") == "train" and x.get("client") == facts.client
                      and int(x["round"]) <= facts.round})
    held = ("the method's global state as sent to this client for evaluation" if facts.source == "global"
            else "this client's personal state")
    tags = ["fedhmoe", "federated-learning", facts.algorithm, facts.adapter_kind]
    # a code fence longer than any run of backticks in the config (a system prompt may hold some)
    fence = "`" * max(3, 1 + max((len(m) for m in re.findall(r"`+", facts.config_toml)), default=0))
    lines = ["---", f"base_model: {_yaml_str(facts.base_model)}", f"library_name: {_yaml_str(facts.library)}",
             "tags:", *(f"- {_yaml_str(t)}" for t in dict.fromkeys(tags)), "---", "",
             f"# {facts.algorithm}: client {facts.client} of run {facts.run_name}", "",
             f"Client {facts.client}'s model from the fedhmoe run `{facts.run_name}`, trained with "
             f"`{facts.algorithm}`: {facts.method_text}. It is the model the run scored for this client after "
             f"round {facts.round} of {facts.num_rounds} ({held}, `{facts.adapter_kind}` adapters); the client "
             f"trained in {len(trained)} of those {facts.round} rounds.", "",
             "## Base model", "", facts.base_text, "",
             "## Files and loading", "", facts.files_text, "",
             "## Data and scores", "", *_scores(facts, summary, rows), "",
             "## Config", "", "The run's resolved config (every default written out):", "",
             f"{fence}toml", facts.config_toml.rstrip("\n"), fence, ""]
    return "\n".join(lines)
