"""Instructions of one adapted layer's training step, AMoLE against plain LoRA, counted by valgrind's callgrind.

Instruction counts do not move with the machine's load, so they show small differences that step times on a
shared CPU hide. Each variant runs in its own process under ``valgrind --tool=callgrind --instr-atstart=no``:
the process builds the layer of ``amole_step.layer_steps`` (one thread), warms it up, and only then does this
script switch the instrumentation on (``callgrind_control -i on``) for ``--steps`` steps. The totals are split
into MKL's matrix products, the Python interpreter and everything else. Under valgrind MKL takes its AVX2 kernels
whatever the CPU, so the split describes those kernels.

    PYTHONPATH=. .venv/bin/python benchmarks/amole_instructions.py [--steps 10] [--write docs/benchmarks.md]

Needs valgrind (Debian's package); a layer step runs about 2,000 times slower under it (some 20 s).
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from common import emit

HERE = Path(__file__).resolve().parent

CHILD = """
import sys, time, torch
sys.path.insert(0, {here!r})
import amole_step
torch.set_num_threads(1)
step = amole_step.layer_steps(512, 6, 8, 16.0, 0.05, 2)[{variant!r}]
for _ in range(3):
    step()
open({ready!r}, "w").close()
time.sleep(8)  # the parent switches the instrumentation on meanwhile
for _ in range({steps}):
    step()
open({done!r}, "w").close()
time.sleep(4)  # and off again
"""


def wait_for(path: Path, proc: subprocess.Popen, seconds: float) -> None:
    """Wait until ``path`` exists; fail if the child ends first or the time runs out."""
    end = time.monotonic() + seconds
    while not path.exists():
        if proc.poll() is not None or time.monotonic() > end:
            raise SystemExit(f"the child under valgrind did not reach {path.name} (exit {proc.poll()})")
        time.sleep(1)


def count(variant: str, steps: int, work: Path) -> dict[str, int]:
    """Instructions of ``steps`` steps of ``variant``, split into MKL products, Python and the rest."""
    ready, done, out = work / f"{variant}.ready", work / f"{variant}.done", work / f"{variant}.callgrind"
    code = CHILD.format(here=str(HERE), variant=variant, ready=str(ready), done=str(done), steps=steps)
    proc = subprocess.Popen(["valgrind", "--tool=callgrind", "--instr-atstart=no", f"--callgrind-out-file={out}",
                             sys.executable, "-c", code], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_for(ready, proc, 900)
        subprocess.run(["callgrind_control", "-i", "on", str(proc.pid)], check=True, capture_output=True)
        wait_for(done, proc, 120 * steps)
        subprocess.run(["callgrind_control", "-i", "off", str(proc.pid)], check=True, capture_output=True)
        proc.wait(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    listing = subprocess.run(["callgrind_annotate", "--threshold=100", str(out)], check=True, capture_output=True,
                             text=True).stdout
    parts = {"total": 0, "products": 0, "python": 0}
    for line in listing.splitlines():
        fields = line.split()
        if len(fields) < 2 or not fields[0].replace(",", "").isdigit():
            continue
        n = int(fields[0].replace(",", ""))
        if "PROGRAM TOTALS" in line:
            parts["total"] = n
        elif "mkl_blas" in line:
            parts["products"] += n
        elif "libpython" in line:
            parts["python"] += n
    parts["other"] = parts["total"] - parts["products"] - parts["python"]
    return parts


def main() -> None:
    """Count both variants and print (and optionally append) a markdown table."""
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--steps", type=int, default=10, help="instrumented steps per variant")
    ap.add_argument("--write", help="markdown file to append the table to")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        counts = {v: count(v, args.steps, Path(tmp)) for v in ("lora", "amole")}
    rows = [f"| {part} | {counts['lora'][part] / 1e6:,.0f} | {counts['amole'][part] / 1e6:,.0f} | "
            f"{counts['amole'][part] / max(counts['lora'][part], 1):.2f} |"
            for part in ("total", "products", "other", "python")]
    emit("\n".join([
        f"### amole_instructions (one 576x576 layer, 512 tokens, r=8, 6 experts top-2 + shared, dropout 0.05; "
        f"{args.steps} steps under callgrind, one thread; {os.uname().machine})",
        "",
        "| instructions | LoRA millions | AMoLE millions | AMoLE / LoRA |",
        "|---|---:|---:|---:|",
        *rows,
    ]), args.write)


if __name__ == "__main__":
    main()
