"""Data sources: reasoning-gym generation and scoring, jsonl files, local copies of Hub datasets."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from fedhmoe.data.scoring import match_choice, score_answer
from fedhmoe.data.types import Example
from fedhmoe.data.hub import HUB_SOURCES, load_hub
from fedhmoe.data.jsonl import jsonl_client_id, load_jsonl
from fedhmoe.data.reasoning_gym import (
    decode_meta,
    encode_meta,
    known_families,
    load_reasoning_gym,
    score_reasoning_gym,
)

ASSETS = Path(__file__).parent / "assets"
HUB = ASSETS / "hub"


# --------------------------------------------------------------------------------------------------
# reasoning-gym


def test_known_families() -> None:
    fams = known_families()
    assert fams == sorted(fams)
    assert {"basic_arithmetic", "word_sorting", "syllogism"} <= set(fams)
    assert known_families() == fams


def test_reasoning_gym_deterministic_and_seeded() -> None:
    a = load_reasoning_gym(["basic_arithmetic", "syllogism"], 8, {}, seed=1)
    b = load_reasoning_gym(["basic_arithmetic", "syllogism"], 8, {}, seed=1)
    c = load_reasoning_gym(["basic_arithmetic", "syllogism"], 8, {}, seed=2)
    assert a == b
    assert [e.prompt for e in a] != [e.prompt for e in c]
    assert [e.task for e in a] == ["basic_arithmetic"] * 8 + ["syllogism"] * 8
    assert a[3].uid == "basic_arithmetic/3"
    assert len({e.uid for e in a}) == len(a)
    # A family's examples do not depend on which other families are loaded.
    alone = load_reasoning_gym(["syllogism"], 8, {}, seed=1)
    assert alone == a[8:]


def test_reasoning_gym_meta_and_options() -> None:
    (ex,) = load_reasoning_gym(["basic_arithmetic"], 1, {"basic_arithmetic": {"max_terms": 2}}, seed=0)
    entry = decode_meta(ex.meta)
    assert entry["question"] == ex.prompt and entry["answer"] == ex.answer
    assert entry["metadata"]["source_dataset"] == "basic_arithmetic"
    assert entry["metadata"]["num_terms"] == 2
    json.loads(ex.meta)  # plain JSON


def test_meta_round_trip_keeps_tuples() -> None:
    entry = {"question": "q", "answer": "a", "metadata": {"grid": ((1, 2), (3, 4)), "s": {2, 1}, "x": object()}}
    back = decode_meta(encode_meta(entry))
    assert back["metadata"]["grid"] == ((1, 2), (3, 4))
    assert back["metadata"]["s"] == [1, 2]
    assert isinstance(back["metadata"]["x"], str)
    ex = Example(prompt="q", answer="a", task="t", meta=encode_meta(entry))
    assert ex.meta_fields() == back
    ex.meta_fields()["metadata"]["grid"] = "changed"  # each call parses anew: callers cannot spoil the example
    assert ex.meta_fields()["metadata"]["grid"] == ((1, 2), (3, 4))


@pytest.mark.parametrize("meta, fields", [("", {}), ("{not json", {}), ("[1, 2]", {"value": [1, 2]}),
                                          ('"text"', {"value": "text"}), ('{"client_id": 2}', {"client_id": 2})])
def test_example_meta_fields(meta: str, fields: dict) -> None:
    from fedhmoe.data.scoring import generated_score, is_reasoning_gym

    ex = Example(prompt="q", answer="Denver Broncos", task="squad", meta=meta)
    assert ex.meta_fields() == fields
    # every reader of meta goes through meta_fields: text without fields means "no fields", never an error
    assert not is_reasoning_gym(ex)
    assert jsonl_client_id(ex) == fields.get("client_id")
    assert generated_score("Denver Broncos", ex) == pytest.approx(1.0)  # no answers list: the reference answer
    if not fields:
        with pytest.raises(ValueError, match="no reasoning-gym entry"):
            score_reasoning_gym("x", Example(prompt="q", answer="a", task="basic_arithmetic", meta=meta))
    if meta.startswith("{n"):
        with pytest.raises(json.JSONDecodeError):
            decode_meta(meta)  # the text decoder itself is strict


def test_reasoning_gym_unknown_option_and_family() -> None:
    with pytest.raises(ValueError, match=r"basic_arithmetic.*max_termz.*max_terms"):
        load_reasoning_gym(["basic_arithmetic"], 2, {"basic_arithmetic": {"max_termz": 2}}, seed=0)
    with pytest.raises(ValueError, match="set by fedhmoe"):
        load_reasoning_gym(["basic_arithmetic"], 2, {"basic_arithmetic": {"seed": 2}}, seed=0)
    with pytest.raises(ValueError, match="no task family 'basic_arithmetc'.*basic_arithmetic"):
        load_reasoning_gym(["basic_arithmetc"], 2, {}, seed=0)


@pytest.mark.parametrize("family", ["basic_arithmetic", "word_sorting", "syllogism", "arc_1d", "rearc"])
def test_reasoning_gym_scoring(family: str) -> None:
    for ex in load_reasoning_gym([family], 3, {}, seed=4):
        assert score_reasoning_gym(ex.answer, ex) == 1.0
        assert score_reasoning_gym(f"  {ex.answer}\n", ex) == 1.0
        assert score_reasoning_gym("certainly not the answer", ex) == 0.0
        assert score_answer(ex.answer, ex) == 1.0
        assert score_answer("certainly not the answer", ex) == 0.0


def test_reasoning_gym_trailing_period() -> None:
    (ex,) = load_reasoning_gym(["basic_arithmetic"], 1, {}, seed=0)
    assert score_answer(ex.answer + ".", ex) == 1.0


# --------------------------------------------------------------------------------------------------
# generic scoring


def test_exact_match_and_choices() -> None:
    ex = Example(prompt="Capital of France?", answer="Paris", task="qa")
    assert score_answer("  paris. ", ex) == 1.0
    assert score_answer("Lyon", ex) == 0.0
    nli = Example(prompt="p", answer="Maybe", task="snli", choices=("Yes", "Maybe", "No"))
    assert match_choice("maybe", nli.choices) == 1
    assert match_choice("No, it does not follow.", nli.choices) == 2
    assert match_choice("The answer is yes", nli.choices) == 0
    assert match_choice("it could be yes or no", nli.choices) is None
    assert match_choice("perhaps", nli.choices) is None
    assert score_answer("Maybe.", nli) == 1.0
    assert score_answer("Yes", nli) == 0.0
    assert match_choice("Sci/Tech", ("World", "Sports", "Business", "Sci/Tech")) == 3


def test_paper_metrics_for_squad_and_xsum() -> None:
    from fedhmoe.data.scoring import generated_score
    from fedhmoe.evaluation.metrics import rouge_2, token_f1

    # SQuAD normalisation drops case, punctuation and articles: "the Eiffel tower!" -> eiffel, tower
    assert token_f1("the Eiffel tower!", "Eiffel Tower") == 1.0
    # 2 common tokens, precision 2/3, recall 2/2 -> F1 0.8; the best reference counts
    assert token_f1("in Paris France", ["Paris, France", "Lyon"]) == pytest.approx(0.8)
    assert token_f1("", "") == 1.0 and token_f1("x", "") == 0.0
    # ROUGE-2: bigrams of "the cat sat down" vs "the cat sat": 2 common of 3 and 2 -> F1 0.8
    assert rouge_2("the cat sat down", "the cat sat") == pytest.approx(0.8)
    squad = Example(prompt="q", answer="Denver Broncos", task="squad",
                    meta='{"answers": ["Denver Broncos", "the Broncos"]}')
    assert generated_score("Broncos", squad) == pytest.approx(1.0)  # the second reference matches exactly
    xsum = Example(prompt="q", answer="the cat sat", task="xsum")
    assert generated_score("the cat sat down", xsum) == pytest.approx(0.8)
    other = Example(prompt="q", answer="the cat sat", task="dolly")  # ROUGE-L: LCS 3 of 4 and 3 -> 6/7
    assert generated_score("the cat sat down", other) == pytest.approx(6 / 7)
    ex = load_hub("squad", str(HUB / "squad"), [])[0]
    assert json.loads(ex.meta)["answers"][0] == ex.answer


# --------------------------------------------------------------------------------------------------
# jsonl


def test_jsonl_sample() -> None:
    exs = load_jsonl(str(ASSETS / "jsonl" / "sample.jsonl"))
    assert len(exs) == 3
    assert exs[0].prompt == "Translate to French.\n\nGood morning"
    assert exs[0].task == "translation" and exs[0].answer == "Bonjour"
    assert exs[1].choices == ("positive", "negative")
    assert exs[2].prompt == "What is 2 + 2?" and exs[2].task == "default"
    assert exs[2].uid == "sample.jsonl/4"
    assert jsonl_client_id(exs[0]) is None


def write(tmp_path: Path, lines: list[str]) -> str:
    p = tmp_path / "data.jsonl"
    p.write_text("\n".join(lines) + "\n")
    return str(p)


def test_jsonl_client_id(tmp_path: Path) -> None:
    path = write(tmp_path, ['{"instruction": "i", "output": "o", "client_id": 2}'])
    (ex,) = load_jsonl(path)
    assert json.loads(ex.meta) == {"client_id": 2}
    assert jsonl_client_id(ex) == 2


@pytest.mark.parametrize(
    ("line", "message"),
    [
        ('{"instruction": "i", "output": "o"', "line 2: invalid JSON"),
        ('{"output": "o"}', "line 2: missing required key 'instruction'"),
        ('{"instruction": "i"}', "line 2: missing required key 'output'"),
        ('{"instruction": "i", "output": "c", "choices": ["a", "b"]}', "line 2: output 'c' is not one of the choices"),
        ('{"instruction": "i", "output": 3}', "line 2: key 'output' must be a string"),
        ('{"instruction": "i", "output": "o", "client_id": "x"}', "line 2: key 'client_id'"),
        ('["not", "an", "object"]', "line 2: expected a JSON object"),
    ],
)
def test_jsonl_errors(tmp_path: Path, line: str, message: str) -> None:
    path = write(tmp_path, ['{"instruction": "fine", "output": "ok"}', line])
    with pytest.raises(ValueError, match="data.jsonl, " + message.replace("(", r"\(")):
        load_jsonl(path)


def test_jsonl_missing_file(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_jsonl(str(tmp_path / "nope.jsonl"))


# --------------------------------------------------------------------------------------------------
# Hub datasets (local fixtures)


def test_snli_fixture() -> None:
    exs = load_hub("snli", str(HUB / "snli"), [])
    assert len(exs) == 5  # the row with label -1 is dropped
    first = exs[0]
    assert first.prompt == (
        'Suppose A man inspects the uniform of a figure in some East Asian country. '
        'Can we infer that "The man is sleeping."? Yes, No, or Maybe?'
    )
    assert first.answer == "No" and first.label == "No" and first.task == "snli"
    assert first.choices == ("Yes", "Maybe", "No")
    assert [e.answer for e in exs] == ["No", "Maybe", "No", "Yes", "Maybe"]
    assert load_hub("snli", str(HUB / "snli" / "train.jsonl"), []) == exs


def test_dolly_fixture_and_category_filter() -> None:
    exs = load_hub("dolly", str(HUB / "dolly"), [])
    assert len(exs) == 5
    assert exs[0].task == exs[0].label == "closed_qa"
    assert exs[0].prompt.startswith("When did Virgin Australia start operating?\n\nVirgin Australia commenced")
    assert exs[1].prompt == "Which is a species of fish? Tope or Rope"
    kept = load_hub("dolly", str(HUB / "dolly"), ["open_qa"])
    assert [e.task for e in kept] == ["open_qa", "open_qa"]
    with pytest.raises(ValueError, match=r"no dolly examples left.*closed_qa.*data.tasks = \[\]"):
        load_hub("dolly", str(HUB / "dolly"), ["basic_arithmetic"])


def test_natural_instructions_fixture() -> None:
    exs = load_hub("natural-instructions", str(HUB / "natural-instructions"), [])
    assert [e.answer for e in exs] == ["Who did the dog bark at?", "What did Ann bake?", "Yes", "No"]
    assert exs[0].task == "task001_quoref_question_generation"
    assert exs[0].prompt == "Write a question about the passage.\n\nPassage: The dog barked at the mailman."
    assert {e.task for e in load_hub("natural-instructions", str(HUB / "natural-instructions"),
                                      ["task020_mctaco_span_based_question"])} == {
        "task020_mctaco_span_based_question"}


def test_ag_news_fixture() -> None:
    exs = load_hub("ag-news", str(HUB / "ag-news"), [])
    assert [e.answer for e in exs] == ["Business", "Sports", "World", "Sci/Tech", "Business"]
    assert all(e.answer in e.choices and e.label == e.answer for e in exs)
    assert exs[0].prompt.endswith("Wall St. Bears Claw Back Into the Black. Short-sellers are seeing green again.")


def test_squad_fixture() -> None:
    exs = load_hub("squad", str(HUB / "squad"), [])
    assert len(exs) == 2  # the unanswerable row is dropped
    assert exs[0].answer == "Denver Broncos"
    assert "Which team won Super Bowl 50?" in exs[0].prompt and "Super Bowl 50 was" in exs[0].prompt


def test_xsum_fixture() -> None:
    exs = load_hub("xsum", str(HUB / "xsum"), [])
    assert len(exs) == 3
    assert exs[2].answer == "A new town-centre library has been approved."
    assert exs[2].prompt.endswith("which will open next spring.")


def test_hub_errors(tmp_path: Path) -> None:
    for source in HUB_SOURCES:
        with pytest.raises(ValueError, match="download.*data.path"):
            load_hub(source, "", [])
    with pytest.raises(FileNotFoundError, match="must be downloaded by the user"):
        load_hub("snli", str(tmp_path / "missing"), [])
    with pytest.raises(ValueError, match="holds no"):
        load_hub("snli", str(tmp_path), [])
    with pytest.raises(ValueError, match="no column 'premise'"):
        load_hub("snli", str(HUB / "xsum"), [])
    with pytest.raises(ValueError, match="unknown Hub source"):
        load_hub("imagenet", str(HUB / "xsum"), [])


def test_hub_parquet_and_saved_dataset(tmp_path: Path) -> None:
    import datasets

    rows = {"text": ["Stocks rally.", "Team wins."], "label": [2, 1]}
    datasets.Dataset.from_dict(rows).to_parquet(str(tmp_path / "train-00000.parquet"))
    assert [e.answer for e in load_hub("ag-news", str(tmp_path), [])] == ["Business", "Sports"]
    saved = tmp_path / "saved"
    datasets.DatasetDict({"train": datasets.Dataset.from_dict(rows)}).save_to_disk(str(saved))
    assert [e.answer for e in load_hub("ag-news", str(saved), [])] == ["Business", "Sports"]


def test_reasoning_gym_data_do_not_depend_on_the_process_hash_seed():
    """Some generators iterate over sets of strings; every process must still see the same examples."""
    import hashlib
    import os
    import subprocess
    import sys

    code = (
        "import hashlib; from fedhmoe.data.reasoning_gym import load_reasoning_gym as L; "
        "ex = L(['ransom_note'], 30, {}, 0); "
        "print(hashlib.md5(''.join(e.prompt + e.answer + e.meta for e in ex).encode()).hexdigest())"
    )
    digests = set()
    for hash_seed in ("1", "2", "random"):
        env = {**os.environ, "PYTHONHASHSEED": hash_seed}
        out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
        digests.add(out.stdout.strip())
    ex = load_reasoning_gym(["ransom_note"], 30, {}, 0)
    digests.add(hashlib.md5("".join(e.prompt + e.answer + e.meta for e in ex).encode()).hexdigest())
    assert len(digests) == 1


def test_hub_mix_makes_each_dataset_a_task_and_keeps_its_classes() -> None:
    from fedhmoe.data.hub import load_hub_mix

    exs = load_hub_mix(str(HUB), ["ag-news", "squad", "xsum"])
    assert {e.task for e in exs} == {"ag-news", "squad", "xsum"}
    assert {e.label for e in exs if e.task == "ag-news"} <= {"World", "Sports", "Business", "Sci/Tech"}
    with pytest.raises(FileNotFoundError, match="no 'snli' folder"):
        load_hub_mix(str(HUB / "squad"), ["snli"])
