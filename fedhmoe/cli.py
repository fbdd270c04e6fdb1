"""Command line: ``fedhmoe run``, ``report``, ``export``, ``generate``, ``show-config``, ``prepare-model``.

Each subcommand imports the layers it uses when it runs (torch, transformers, Flower, Ray take seconds to load),
so ``fedhmoe --help`` and ``fedhmoe show-config`` start at once; no import here stands in for a cycle.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from pathlib import Path

from fedhmoe.config import ConfigError

log = logging.getLogger("fedhmoe")

_OFFLINE_ENV = {
    "FLWR_TELEMETRY_ENABLED": "0",
    "FLWR_DISABLE_UPDATE_CHECK": "1",
    "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",
    "HF_HUB_OFFLINE": "1",
    "TRANSFORMERS_OFFLINE": "1",
    "HF_DATASETS_OFFLINE": "1",
    "TOKENIZERS_PARALLELISM": "false",
}


def _setup_logging(verbose: bool) -> None:
    from fedhmoe.utils.logs import formatter

    handler = logging.StreamHandler(sys.stdout)
    handler.setFormatter(formatter())
    log.handlers[:] = [handler]
    log.setLevel(logging.DEBUG if verbose else logging.INFO)
    log.propagate = False


def cmd_run(args: argparse.Namespace) -> int:
    from fedhmoe.config import load_config
    from fedhmoe.evaluation.rundir import RunLockedError, new_run_dir, run_lock
    from fedhmoe.validate import validate

    if args.resume:
        run_dir = Path(args.resume)
        if not (run_dir / "config.toml").is_file():
            raise ConfigError(f"{run_dir} is not a run directory (no config.toml)")
        cfg = validate(load_config(run_dir / "config.toml", args.set))
    else:
        if args.allow_config_change:
            raise ConfigError("--allow-config-change applies to --resume only")
        if args.config is None:
            raise ConfigError("fedhmoe run needs a CONFIG file (or --resume RUN_DIR)")
        cfg = validate(load_config(args.config, args.set))  # before any folder is made
        run_dir = Path(args.out) if args.out else new_run_dir(cfg.run.out_dir, cfg.run.name)
        if args.out:
            if run_dir.exists() and any(run_dir.iterdir()):
                raise ConfigError(f"--out {run_dir} exists and is not empty (use --resume to continue a run)")
            run_dir.mkdir(parents=True, exist_ok=True)
    try:
        with run_lock(run_dir):  # held through the run (a simulation's server shares it)
            return _run_locked(args, cfg, run_dir)
    except RunLockedError as e:
        raise ConfigError(str(e)) from e


def _run_locked(args: argparse.Namespace, cfg, run_dir: Path) -> int:  # type: ignore[no-untyped-def]
    from fedhmoe.evaluation.report import client_table
    from fedhmoe.evaluation.rundir import LOCK_FILE, RunDirectory
    from fedhmoe.runtime.server import check_resume

    if args.out and not args.resume and any(p.name != LOCK_FILE for p in run_dir.iterdir()):
        # another run filled the folder between the check above and taking the lock
        raise ConfigError(f"--out {run_dir} exists and is not empty (use --resume to continue a run)")
    if args.resume:  # every check before any worker starts; the run folder is left as it is when one fails
        try:
            check_resume(RunDirectory(run_dir), cfg, args.allow_config_change)
        except ValueError as e:
            raise ConfigError(f"cannot resume {run_dir}: {e}") from e
    engine = args.engine or cfg.federation.engine
    _check_data(cfg)
    _prepare_model(cfg)
    log.info("run %s: %s on %d clients, %d rounds, engine %s", run_dir, cfg.algorithm.name,
             cfg.federation.num_clients, cfg.federation.num_rounds, engine)
    from fedhmoe.runtime.discovery import DiscoveryError
    from fedhmoe.runtime.progress import make_progress
    from fedhmoe.runtime.server import RoundFailed
    from fedhmoe.runtime.simulation import SimulationError

    progress = make_progress(args.quiet)
    try:
        if engine == "inprocess":
            from fedhmoe.runtime.engines import inprocess_grid
            from fedhmoe.runtime.server_app import serve

            summary, report = serve(inprocess_grid(cfg), cfg, run_dir, resume=bool(args.resume), engine=engine,
                                    allow_config_change=args.allow_config_change, progress=progress)
        else:  # the server runs in Flower's simulation process, which writes the report and feeds the trackers
            from fedhmoe.runtime.simulation import run_simulation_engine

            summary = run_simulation_engine(cfg, run_dir, resume=bool(args.resume),
                                            allow_config_change=args.allow_config_change, progress=progress,
                                            verbose=args.verbose)
            report = run_dir / "report.md"
    except (RoundFailed, DiscoveryError, SimulationError) as e:  # the run cannot go on: say why, exit non-zero
        print(f"fedhmoe: the run stopped: {e}\nrun directory (rows and checkpoints so far): {run_dir}",
              file=sys.stderr)
        return 1
    print()
    print(f"{cfg.algorithm.name} on {cfg.model.name}: test score per client (data.source = {cfg.data.source})")
    print(client_table(summary))
    print(f"\nrun directory: {run_dir}\nreport: {report}")
    print(f"a client's model: fedhmoe export {run_dir} --client 0 --out <folder>; "
          f"fedhmoe generate {run_dir} --client 0 --prompt <text>")
    return 0


def _check_data(cfg) -> None:  # type: ignore[no-untyped-def]
    """Partition and split the data once in the driver, so that infeasible data fails before any worker starts."""
    from fedhmoe.data.splits import build_federated_data

    try:
        clients = build_federated_data(cfg)
    except ValueError as e:
        raise ConfigError(f"data ({cfg.data.source}, partition {cfg.data.partition}): {e}") from e
    for c in clients:
        log.info("client %d: %s; %d train, %d aux, %d val, %d test examples", c.client, "+".join(c.tasks),
                 len(c.train), len(c.aux), len(c.val), len(c.test))


def _prepare_model(cfg) -> None:  # type: ignore[no-untyped-def]
    """Convert the built-in SmolLM2 once, in the driver, so that workers find it cached."""
    if cfg.model.name == "smollm2-135m-instruct":
        from fedhmoe.models.smollm2 import prepare_smollm2

        prepare_smollm2(Path(cfg.model.cache_dir) if cfg.model.cache_dir else None)


def cmd_report(args: argparse.Namespace) -> int:
    from fedhmoe.evaluation.report import client_table, compare_runs, load_summary, plot_runs

    text = ["# fedhmoe report", "", compare_runs(args.runs), ""]
    for d in args.runs:
        text += [f"## {Path(d).name} ({load_summary(d)['algorithm']})", "", client_table(load_summary(d)), ""]
    out = Path(args.out) if args.out else Path(args.runs[0]) / "comparison.md"
    plots = plot_runs(args.runs, out.parent / "plots")
    text += [f"![{p.stem}](plots/{p.name})" for p in plots]
    out.write_text("\n".join(text) + "\n")
    print("\n".join(text[:-len(plots)] if plots else text))
    print(f"written: {out}")
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    from fedhmoe.export import export_client

    try:
        out = export_client(args.run, args.client, args.out, round=args.round, state_dir=args.state_dir,
                            merge=args.merge, format=args.format)
    except (ValueError, OSError) as e:  # unknown client or round, corrupt state, impossible merge or PEFT form
        raise ConfigError(str(e)) from e
    print(out)
    return 0


def cmd_generate(args: argparse.Namespace) -> int:
    from fedhmoe.export import PACKAGE_FILE, PEFT_CONFIG_FILE, generate_text, load_client_model, load_exported

    path = Path(args.model)
    try:
        if (path / PEFT_CONFIG_FILE).is_file() and not (path / PACKAGE_FILE).is_file():
            raise ConfigError(f"{path} is a PEFT adapter: load it with peft.PeftModel.from_pretrained on its base "
                              "model (its README.md says how); fedhmoe generate reads a native export or a run")
        if (path / PACKAGE_FILE).is_file():
            if args.client is not None or args.round is not None or args.state_dir:
                raise ConfigError(f"{path} is an exported model (one client, one round): --client, --round and "
                                  "--state-dir apply to run directories")
            cm = load_exported(path)
        elif args.client is None:
            raise ConfigError(f"{path} is not an exported model; for a run directory say which client with --client")
        else:
            cm = load_client_model(path, args.client, round=args.round, state_dir=args.state_dir)
    except (ValueError, OSError) as e:  # unknown client or round, corrupt files, backbone not available
        raise ConfigError(str(e)) from e
    prompts = list(args.prompt) or [line.rstrip("\n") for line in sys.stdin if line.strip()]
    for prompt, answer in zip(prompts, generate_text(cm, prompts, args.max_new_tokens), strict=True):
        print(json.dumps({"prompt": prompt, "answer": answer}, ensure_ascii=False))
    return 0


def cmd_prepare_model(args: argparse.Namespace) -> int:
    from fedhmoe.models.smollm2 import prepare_smollm2

    path = prepare_smollm2(Path(args.cache_dir) if args.cache_dir else None, force=args.force)
    print(path)
    return 0


def cmd_show_config(args: argparse.Namespace) -> int:
    from fedhmoe.config import config_to_documented_toml, load_config
    from fedhmoe.validate import validate

    print(config_to_documented_toml(validate(load_config(args.config, args.set))))
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="fedhmoe", description=__doc__)
    p.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = p.add_subparsers(dest="command", required=True)
    r = sub.add_parser("run", help="run one experiment")
    r.add_argument("config", nargs="?", help="experiment TOML file (configs/*.toml)")
    r.add_argument("--engine", choices=["inprocess", "simulation"], help="default: federation.engine")
    r.add_argument("--out", help="run directory (default: <run.out-dir>/<run.name>-<UTC timestamp>)")
    r.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a config key")
    r.add_argument("--resume", metavar="RUN_DIR",
                   help="continue a run from its newest checkpoint (from round 1 when it has none)")
    r.add_argument("--allow-config-change", action="store_true",
                   help="with --resume: accept a config that differs from the checkpoint's (recorded in the run)")
    r.add_argument("-q", "--quiet", action="store_true",
                   help="no progress display (a live line on a terminal, plain log lines otherwise)")
    r.set_defaults(func=cmd_run)
    rep = sub.add_parser("report", help="compare finished runs (markdown table and plots)")
    rep.add_argument("runs", nargs="+", help="run directories")
    rep.add_argument("--out", help="markdown file (default: <first run>/comparison.md)")
    rep.set_defaults(func=cmd_report)
    ex = sub.add_parser("export", help="write one client's model (as it was scored) to a folder")
    ex.add_argument("run", help="run directory")
    ex.add_argument("--client", type=int, required=True, help="client id")
    ex.add_argument("--out", required=True, help="new or empty folder")
    ex.add_argument("--round", type=int, help="a checkpointed round (default: the newest evaluated one)")
    ex.add_argument("--state-dir", help="personal states (default: <run>/clients; a SuperNode's state-dir)")
    ex.add_argument("--merge", action="store_true",
                    help="LoRA methods: fold the adapter into the weights, write a plain Hugging Face model")
    ex.add_argument("--format", choices=["native", "peft"], default="native",
                    help="native: fedhmoe's folder (default); peft: PEFT's adapter_config.json and "
                         "adapter_model.safetensors (LoRA methods on a dense backbone)")
    ex.set_defaults(func=cmd_export)
    gen = sub.add_parser("generate", help="answer prompts with one client's model (one JSON line per prompt)")
    gen.add_argument("model", help="an exported folder, or a run directory with --client")
    gen.add_argument("--client", type=int, help="client id (with a run directory)")
    gen.add_argument("--round", type=int, help="a checkpointed round (default: the newest evaluated one)")
    gen.add_argument("--state-dir", help="personal states (default: <run>/clients; a SuperNode's state-dir)")
    gen.add_argument("--prompt", action="append", default=[], help="a prompt (repeatable; default: stdin lines)")
    gen.add_argument("--max-new-tokens", type=int, help="default: the run's eval.max-new-tokens")
    gen.set_defaults(func=cmd_generate)
    sc = sub.add_parser("show-config", help="print the resolved config, every key documented")
    sc.add_argument("config", nargs="?", help="experiment TOML file (default: all defaults)")
    sc.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a config key")
    sc.set_defaults(func=cmd_show_config)
    pm = sub.add_parser("prepare-model", help="convert the shipped SmolLM2-135M-Instruct GGUF once")
    pm.add_argument("--cache-dir", help="default: $FEDHMOE_CACHE or ~/.cache/fedhmoe")
    pm.add_argument("--force", action="store_true", help="convert again")
    pm.set_defaults(func=cmd_prepare_model)
    return p


def main(argv: list[str] | None = None) -> int:
    for k, v in _OFFLINE_ENV.items():
        os.environ.setdefault(k, v)
    args = build_parser().parse_args(argv)
    _setup_logging(args.verbose)
    try:
        return int(args.func(args))
    except (ConfigError, FileNotFoundError) as e:
        print(f"fedhmoe: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    raise SystemExit(main())
