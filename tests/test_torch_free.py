"""The pure modules load without torch or Flower, so the server's math runs (and is tested) without them."""

import subprocess
import sys

import pytest

PURE_MODULES = [
    "fedhmoe.algorithms.assignment",
    "fedhmoe.algorithms.bmatching",
    "fedhmoe.algorithms.checks",
    "fedhmoe.algorithms.lora_merge",
    "fedhmoe.algorithms.moe_memory",
    "fedhmoe.algorithms.recommend",
    "fedhmoe.algorithms.replies",
    "fedhmoe.algorithms.submoe_search",
    "fedhmoe.arrays",
    "fedhmoe.keys",
    "fedhmoe.protocol",
    "fedhmoe.specs",
    "fedhmoe.store",
    "fedhmoe.data.hub",
    "fedhmoe.data.jsonl",
    "fedhmoe.data.partition",
    "fedhmoe.data.scoring",
    "fedhmoe.data.types",
    "fedhmoe.evaluation.card",
]


@pytest.mark.parametrize("module", PURE_MODULES)
def test_module_imports_neither_torch_nor_flower(module):
    # A fresh interpreter: in this one, other tests have already imported torch.
    code = (f"import sys, {module}; "
            "print(sorted(m for m in ('torch', 'flwr', 'transformers') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]", f"{module} loads {out.stdout.strip()}"
