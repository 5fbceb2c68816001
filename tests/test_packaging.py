"""What pip resolves for the runtime installs: exactly one ONNX Runtime distribution.

onnxruntime and onnxruntime-gpu ship the same package directory and overwrite each other, so
the GPU install must not pull the CPU one in (it did while onnxruntime was a base dependency).
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def resolved(extra: str, tmp_path: Path) -> list[str]:
    report = tmp_path / f"{extra}.json"
    run = subprocess.run(
        [sys.executable, "-m", "pip", "install", "--dry-run", "--ignore-installed", "--quiet", "--report", str(report),
         f"{ROOT}[{extra}]"],
        capture_output=True,
        text=True,
    )  # fmt: skip
    if run.returncode != 0:
        pytest.fail(f"pip could not resolve .[{extra}]: {run.stderr[-2000:]}")
    return sorted(item["metadata"]["name"].lower() for item in json.loads(report.read_text())["install"])


@pytest.mark.slow
@pytest.mark.parametrize("extra,expected", [("gpu", ["onnxruntime-gpu"]), ("cpu", ["onnxruntime"])])
def test_one_onnxruntime_distribution(extra, expected, tmp_path):
    names = resolved(extra, tmp_path)
    assert "locllm-sdk" in names
    assert [n for n in names if n.startswith("onnxruntime")] == expected, names
    assert "torch" not in names  # the runtime installs stay torch-free
