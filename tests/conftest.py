import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
# Let the suite run from a plain clone too (the README installs the package editable).
for sub in ("sdk", "training", "export", "tests", "benchmarks"):
    p = str(ROOT / sub)
    if p not in sys.path:
        sys.path.insert(0, p)

import pytest  # noqa: E402


def pytest_addoption(parser):
    parser.addoption("--runslow", action="store_true", help="also run tests marked slow (CI does)")


def pytest_collection_modifyitems(config, items):
    if config.getoption("--runslow"):
        return
    skip = pytest.mark.skip(reason="slow: run with --runslow")
    for item in items:
        if "slow" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def trained(tmp_path_factory):
    """Format-trained tiny checkpoints and their ONNX engines, 2D and 3D (built once)."""
    from helpers import format_trained_checkpoint
    from locllm_export.build import build_onnx_engine

    root = tmp_path_factory.mktemp("models")
    out = {}
    for dims in (2, 3):
        ckpt = format_trained_checkpoint(root / f"ckpt{dims}d", dims=dims, seed=dims)
        engine = root / f"engine{dims}d"
        build_onnx_engine(ckpt, engine)
        out[dims] = (ckpt, engine)
    return out


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory):
    from locllm_training.init import init_checkpoint

    return init_checkpoint("tiny", tmp_path_factory.mktemp("tiny") / "ckpt", seed=0)
