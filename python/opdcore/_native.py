"""Loads the compiled extension (which registers torch.ops.opdcore.*) and reports how it was built."""
import torch

try:
    from opdcore import _C
except ImportError as e:  # pragma: no cover - only hit on a broken install
    raise ImportError(
        "opdcore's compiled extension failed to load. It must be built against the installed torch "
        f"({torch.__version__}): run `pip install --no-build-isolation -e .` (scripts/setup.sh does this). "
        f"Original error: {e}"
    ) from e


def build_info() -> dict:
    """Version, torch it was built against and runs with, CUDA compiled yes/no, OpenMP threads."""
    info = dict(_C.build_info())
    info["torch_version"] = torch.__version__
    info["torch_threads"] = torch.get_num_threads()
    return info
