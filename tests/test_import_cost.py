"""``import torchsurgeon`` stays cheap: what it costs beyond ``import torch, transformers``
is the library itself, not DTensor or torch._dynamo (imported on first use), so a one-line
CLI error appears in about the time torch takes to import."""

from __future__ import annotations

import subprocess
import sys


def test_import_pulls_in_neither_dynamo_nor_dtensor_nor_the_web_stack() -> None:
    heavy = ["torch._dynamo", "torch.distributed.tensor", "torchsurgeon.distributed"]
    heavy += ["fastapi", "uvicorn", "httpx", "transformers.generation"]
    code = (
        "import sys, torchsurgeon as ts\n"
        f"print([m for m in {heavy!r} if m in sys.modules])\n"
        "ts.distributed.launch\n"  # ts.distributed still works, imported on use
        "print('torchsurgeon.distributed' in sys.modules)\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.split("\n")[:2] == ["[]", "True"]
