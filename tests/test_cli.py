"""The command line as a user drives it: run, report, errors."""

import json
from pathlib import Path

from fedhmoe.cli import main

SMOKE = str(Path(__file__).resolve().parents[1] / "configs" / "smoke.toml")
FAST = ["--set", "train.num-threads=1", "--set", "data.max-test-examples=3", "--set", "data.max-val-examples=2"]


def test_run_then_report(tmp_path, capsys):
    a, b = tmp_path / "a", tmp_path / "b"
    assert main(["run", SMOKE, "--engine", "inprocess", "--out", str(a), *FAST]) == 0
    out = capsys.readouterr().out
    assert "| client | tasks | before | after |" in out and "basic_arithmetic" in out
    assert main(["run", SMOKE, "--engine", "inprocess", "--out", str(b), *FAST, "--set", "algorithm.name=local"]) == 0
    for d in (a, b):
        assert (d / "report.md").is_file() and (d / "plots" / "score_by_round.png").stat().st_size > 1000
        assert "[algorithm]" in (d / "config.toml").read_text()
    assert json.loads((b / "summary.json").read_text())["algorithm"] == "local"
    capsys.readouterr()
    assert main(["report", str(a), str(b), "--out", str(tmp_path / "cmp.md")]) == 0
    text = (tmp_path / "cmp.md").read_text()
    assert "| a | fedit |" in text and "| b | local |" in text
    # local sends no adapters: far fewer bytes up than fedit
    rows = {line.split("|")[1].strip(): line.split("|") for line in text.splitlines() if line.startswith("| a |")
            or line.startswith("| b |")}
    assert float(rows["b"][8]) < float(rows["a"][8])
    assert (tmp_path / "plots" / "score_by_round.png").is_file()


def test_bad_config_fails_fast_with_exit_code_2(tmp_path, capsys):
    assert main(["run", SMOKE, "--out", str(tmp_path / "x"), "--set", "federation.num-client=4"]) == 2
    err = capsys.readouterr().err
    assert "unknown config key 'federation.num-client'" in err and "federation.num-clients" in err
    assert not (tmp_path / "x").exists()  # nothing started


def test_out_dir_must_be_empty_and_resume_needs_a_run(tmp_path, capsys):
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "file").write_text("x")
    assert main(["run", SMOKE, "--out", str(tmp_path / "busy")]) == 2
    assert main(["run", "--resume", str(tmp_path)]) == 2
    assert "not a run directory" in capsys.readouterr().err


def test_cli_resume_extends_a_finished_run(tmp_path, capsys):
    d = tmp_path / "r"
    assert main(["run", SMOKE, "--engine", "inprocess", "--out", str(d), *FAST,
                 "--set", "federation.engine='simulation'"]) == 0
    assert f"fedhmoe export {d} --client 0 --out" in capsys.readouterr().out  # where the models are
    assert json.loads((d / "summary.json").read_text())["engine"] == "inprocess"  # what ran it, not the default
    assert main(["run", "--resume", str(d), "--engine", "inprocess", "--set", "federation.num-rounds=3"]) == 0
    summary = json.loads((d / "summary.json").read_text())
    assert summary["totals"]["rounds"] == 3
    assert all(v["final-round"] == 3 for v in summary["clients"].values())


def test_show_config_prints_documented_resolved_toml(capsys):
    from fedhmoe.config import load_config

    assert main(["show-config", SMOKE, "--set", "train.local-steps=9"]) == 0
    text = capsys.readouterr().out
    assert "# Optimizer steps per client per round." in text and "local-steps = 9" in text
    assert load_config(text=text).train.local_steps == 9


def test_infeasible_data_fails_before_any_client_starts(tmp_path, capsys):
    jsonl = Path(__file__).resolve().parent / "assets" / "jsonl" / "sample.jsonl"  # 4 examples
    args = ["run", SMOKE, "--out", str(tmp_path / "x"), "--set", "data.source='jsonl'",
            "--set", f"data.path='{jsonl}'", "--set", "data.tasks=[]", "--set", "data.partition='iid'",
            "--set", "data.min-examples-per-client=2"]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert "data (jsonl, partition iid)" in err and "3 clients" in err
    assert not (tmp_path / "x" / "metrics.jsonl").exists()


def test_fedmoe_on_the_tiny_mixtral_from_the_command_line(tmp_path, capsys):
    d = tmp_path / "moe"
    assert main(["run", SMOKE, "--out", str(d), *FAST, "--set", "algorithm.name=fedmoe",
                 "--set", "model.name=tiny-mixtral"]) == 0
    out = capsys.readouterr().out
    assert "fedhmoe export" in out and "| client | tasks | before | after |" in out
    summary = json.loads((d / "summary.json").read_text())
    assert summary["algorithm"] == "fedmoe" and summary["engine"] == "inprocess"
    report = (d / "report.md").read_text()
    assert "## Experts held per client" in report
    for name in ("experts_by_round.png", "memory_by_client.png"):
        assert (d / "plots" / name).stat().st_size > 1000
    # round 1 profiles, round 2 trains sub-MoEs: the smoke budget keeps at least one client below the full MoE
    held = json.loads((d / "assignments" / "round-2.json").read_text())
    per_client = {c: sum(len(per[c]) for per in held.values()) for c in next(iter(held.values()))}
    full = len(held) * 4  # tiny-mixtral: 4 experts per layer
    assert min(per_client.values()) < full and min(per_client.values()) >= len(held)
