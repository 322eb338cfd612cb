"""Device checks shared by the op wrappers."""
import torch

from opdcore._native import build_info

_CUDA_COMPILED = bool(build_info()["cuda_compiled"])


def check_device(t: torch.Tensor, name: str) -> None:
    """A clear error for a CUDA tensor when opdcore was built without CUDA kernels."""
    if t.device.type == "cuda" and not _CUDA_COMPILED:
        raise RuntimeError(
            f"{name} is on {t.device}, but this opdcore build has no CUDA kernels (build_info()['cuda_compiled'] "
            "is False). Rebuild with a CUDA torch and nvcc present: pip install --no-build-isolation -e ."
        )
