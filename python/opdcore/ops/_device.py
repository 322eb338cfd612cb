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


def check_devices(**named) -> None:
    """check_device for every tensor argument, and one device for all of them: a meta tensor among real ones
    would otherwise come back as a result made of the fake kernel's uninitialised memory (all-meta arguments are
    fine: shapes only, for tracing)."""
    first = None
    for name, t in named.items():
        if not isinstance(t, torch.Tensor):
            continue
        check_device(t, name)
        if first is None:
            first = (name, t.device)
        elif t.device != first[1]:
            raise ValueError(f"{name} is on {t.device} but {first[0]} is on {first[1]}: every tensor argument must "
                             f"be on one device")
