"""CPU speed settings of the client: freed memory kept for the next step (glibc's mmap and trim thresholds
raised) and Adam/AdamW's fused update."""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys

import pytest
import torch

from fedhmoe.client.train import make_optimizer
from fedhmoe.config import TrainConfig

GLIBC = sys.platform == "linux" and platform.libc_ver()[0] == "glibc"

# allocate, touch and free 100 MB twice; report the page faults of the second time
_PROBE = """
import json, resource, sys
from fedhmoe.utils.allocator import keep_freed_memory
tuned = None
if sys.argv[1] == "call":
    tuned = keep_freed_memory()
else:
    import fedhmoe.runtime.client_app  # noqa: F401  (the ClientApp's import tunes the process)
size = 100 << 20
block = bytearray(size); block[::4096] = b"x" * len(block[::4096]); del block
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
block = bytearray(size); block[::4096] = b"x" * len(block[::4096]); del block
after = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
print(json.dumps({"tuned": tuned, "again": keep_freed_memory(), "faults": after - before}))
"""


def _probe(mode: str, env: dict[str, str]) -> dict:
    out = subprocess.run([sys.executable, "-c", _PROBE, mode], env={**os.environ, **env}, capture_output=True,
                         text=True, timeout=120, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_a_client_process_reuses_its_freed_pages_and_the_system_setting_does_not() -> None:
    kept = _probe("call", {"FEDHMOE_MALLOC": ""})
    system = _probe("call", {"FEDHMOE_MALLOC": "system"})
    imported = _probe("import", {"FEDHMOE_MALLOC": ""})
    assert system["tuned"] is False and system["again"] is False
    assert kept["tuned"] is GLIBC and kept["again"] is GLIBC  # a second call answers like the first
    assert imported["again"] is GLIBC  # importing the ClientApp already tuned the process
    if GLIBC:
        pages = (100 << 20) // 4096  # 25,600
        assert system["faults"] > pages // 2, system  # a fresh mapping: every page faults again
        assert kept["faults"] < pages // 20, kept  # the freed block is reused
        assert imported["faults"] < pages // 20, imported


@pytest.mark.parametrize("name", ["adamw", "adam"])
def test_adam_updates_are_fused_on_the_cpu_and_equal_the_default_update(name: str) -> None:
    cfg = TrainConfig(optimizer=name, weight_decay=0.01)
    gen = torch.Generator().manual_seed(0)
    start = [torch.randn(8, 12, generator=gen), torch.randn(12, 8, generator=gen)]
    grads = [[torch.randn(p.shape, generator=gen) for p in start] for _ in range(3)]
    fused = [torch.nn.Parameter(p.clone()) for p in start]
    plain = [torch.nn.Parameter(p.clone()) for p in start]
    opt = make_optimizer(fused, cfg, 1e-2)
    ref = (torch.optim.AdamW if name == "adamw" else torch.optim.Adam)(plain, lr=1e-2, eps=cfg.adam_eps,
                                                                      weight_decay=0.01, foreach=True)
    assert opt.defaults["fused"] is True and not ref.defaults["fused"]
    for step in grads:
        for p, q, g in zip(fused, plain, step, strict=True):
            p.grad, q.grad = g.clone(), g.clone()
        opt.step()
        ref.step()
    for p, q, p0 in zip(fused, plain, start, strict=True):
        assert not torch.equal(p, p0)
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)
    sgd = make_optimizer([torch.nn.Parameter(torch.zeros(2))], TrainConfig(optimizer="sgd"), 1e-2)
    assert not sgd.defaults.get("fused")
