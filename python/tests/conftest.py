import importlib.util
import os
import pathlib

REPO = pathlib.Path(__file__).resolve().parents[2]
GOLDEN = REPO / "tests" / "golden"

# These modules drive the torch.optim classes, TRL, torch.distributed and
# transformers' loading of the folders host writes. PyPI's
# torch is about 6 GB with its CUDA libraries, more than a small CI machine has
# free, so `scripts/test.sh` runs them only with `--with-torch`; it sets
# MERGE_CORE_REQUIRE_TORCH=1 there so that a missing torch fails instead of
# leaving them out.
NEEDS_TORCH = ["test_optim.py", "test_trl.py", "test_distributed.py", "test_model_folder.py"]
HAVE_TORCH = importlib.util.find_spec("torch") is not None

if not HAVE_TORCH and os.environ.get("MERGE_CORE_REQUIRE_TORCH") == "1":
    raise RuntimeError(
        "MERGE_CORE_REQUIRE_TORCH=1 but torch is not installed in this environment: "
        "pip install -r python/requirements-torch.txt"
    )

collect_ignore = [] if HAVE_TORCH else NEEDS_TORCH


def pytest_report_header(config):
    if HAVE_TORCH:
        return "merge_core: torch found; the optimizer-class, TRL and distributed tests run"
    return (
        f"merge_core: torch is not installed, so {', '.join(NEEDS_TORCH)} are not collected "
        "(scripts/test.sh --with-torch runs them)"
    )
