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
SIZE = 100 << 20

# touch a 100 MB block, free it, touch one again: resident memory after each step, and the second block's faults
_PROBE = """
import json, resource, sys
import fedhmoe.utils.allocator as allocator
if sys.argv[1] == "call":
    tuned = allocator.keep_freed_memory()
else:  # what the ClientApp does: nothing at import, the allocator set at its first handler call
    import fedhmoe.runtime.client_app as client_app
    at_import = allocator._done
    client_app.handle_train = lambda msg, context: None
    client_app.train(None, None)
    tuned = (at_import, allocator._done)
def rss():
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmRSS:"))
size = int(sys.argv[2])
before = rss()
block = bytearray(size); block[::4096] = b"x" * len(block[::4096]); del block
after_free = rss()
faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
block = bytearray(size); block[::4096] = b"x" * len(block[::4096]); del block
faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt - faults
print(json.dumps({"tuned": tuned, "held": after_free - before, "faults": faults}))
"""


def _probe(mode: str, malloc: str) -> dict:
    # the allocator's own environment settings would decide the outcome: the probe runs without them
    env = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_") and k != "GLIBC_TUNABLES"}
    out = subprocess.run([sys.executable, "-c", _PROBE, mode, str(SIZE)], env={**env, "FEDHMOE_MALLOC": malloc},
                         capture_output=True, text=True, timeout=120, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_a_client_process_keeps_its_freed_pages_and_the_system_setting_does_not() -> None:
    kept = _probe("call", "")
    system = _probe("call", "system")
    handled = _probe("handler", "keep")
    assert kept["tuned"] is GLIBC and system["tuned"] is False
    assert handled["tuned"] == [None, GLIBC]  # importing the ClientApp changed nothing; its first call did
    if GLIBC:
        # freed, the block stays in the process and the next one reuses its pages without faulting them in
        for probe in (kept, handled):
            assert probe["held"] > 0.8 * SIZE and probe["faults"] < (SIZE // 4096) // 20, probe
        # as glibc comes, the freed block goes back to the system (its next one faults in anew)
        assert system["held"] < 0.2 * SIZE, system


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
                                                                      weight_decay=0.01)  # torch's default
    assert opt.defaults["fused"] is True and not ref.defaults["fused"]
    for step in grads:
        for p, q, g in zip(fused, plain, step, strict=True):
            p.grad, q.grad = g.clone(), g.clone()
        opt.step()
        ref.step()
    for p, q, p0 in zip(fused, plain, start, strict=True):
        assert not torch.equal(p, p0)
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)
