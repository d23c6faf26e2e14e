"""Facts about the machine: Python, PyTorch build, CUDA, GPUs (NVML and torch), bitsandbytes backend.

:func:`collect_environment` returns an :class:`EnvironmentFacts` dataclass; nothing here asserts anything.
"""
from __future__ import annotations

import dataclasses
import platform
import sys
from dataclasses import dataclass, field
from importlib import metadata
from typing import Any

from .nvml import NvmlFacts, read_nvml


@dataclass(frozen=True)
class TorchGpu:
    index: int
    name: str
    total_memory_bytes: int
    free_memory_bytes: int | None
    compute_capability: tuple[int, int]
    bf16_supported: bool
    uuid: str | None = None


@dataclass(frozen=True)
class TorchFacts:
    version: str | None
    cuda_build: str | None          # torch.version.cuda: None on a CPU build
    cuda_available: bool
    device_count: int
    gpus: tuple[TorchGpu, ...] = ()
    error: str | None = None         # why torch could not be imported / queried


@dataclass(frozen=True)
class BitsAndBytesFacts:
    version: str | None
    importable: bool
    backends: tuple[str, ...] = ()   # e.g. ("cpu",) or ("cuda", "cpu")
    error: str | None = None


@dataclass(frozen=True)
class EnvironmentFacts:
    python_version: str
    python_executable: str
    platform: str
    machine: str
    packages: dict[str, str | None] = field(default_factory=dict)
    torch: TorchFacts | None = None
    bitsandbytes: BitsAndBytesFacts | None = None
    nvml: NvmlFacts | None = None

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


KEY_PACKAGES = ("torch", "transformers", "peft", "accelerate", "bitsandbytes", "safetensors", "tokenizers",
                "huggingface_hub", "nvidia-ml-py", "pytest", "pytest-html", "pytest-benchmark")


def installed_version(dist: str) -> str | None:
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return None


def torch_facts() -> TorchFacts:
    try:
        import torch
    except Exception as exc:  # noqa: BLE001 - an unimportable torch is a fact to report
        return TorchFacts(None, None, False, 0, error=f"{type(exc).__name__}: {exc}")
    gpus = []
    available = bool(torch.cuda.is_available())
    count = torch.cuda.device_count() if available else 0
    for i in range(count):
        props = torch.cuda.get_device_properties(i)
        try:
            free, _total = torch.cuda.mem_get_info(i)
        except RuntimeError:
            free = None
        with torch.cuda.device(i):
            bf16 = bool(torch.cuda.is_bf16_supported())
        uuid = str(getattr(props, "uuid", "")) or None
        gpus.append(TorchGpu(i, props.name, int(props.total_memory), free, (props.major, props.minor), bf16,
                             uuid))
    return TorchFacts(torch.__version__, torch.version.cuda, available, count, tuple(gpus))


def cuda_unavailable_reason(facts: TorchFacts | None = None) -> str | None:
    """None if a CUDA device is usable; else why not (torch missing, CPU build, no driver/device)."""
    t = facts or torch_facts()
    if t.error:
        return f"torch cannot be imported ({t.error}); install a CUDA build of torch"
    if t.cuda_build is None:
        return (f"torch {t.version} is a CPU-only build (torch.version.cuda is None); install a CUDA build of torch "
                "on the training machine")
    if not t.cuda_available:
        nv = read_nvml()
        why = nv.error or "NVML sees no device"
        return (f"torch {t.version} (CUDA {t.cuda_build}) finds no usable GPU: torch.cuda.is_available() is False "
                f"({why}); check the NVIDIA driver, CUDA_VISIBLE_DEVICES and that the machine has a GPU")
    return None


def bitsandbytes_facts() -> BitsAndBytesFacts:
    version = installed_version("bitsandbytes")
    if version is None:
        return BitsAndBytesFacts(None, False, error="bitsandbytes is not installed (pip install bitsandbytes)")
    try:
        import io
        import contextlib

        with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
            import bitsandbytes as bnb
            import torch
    except Exception as exc:  # noqa: BLE001
        return BitsAndBytesFacts(version, False, error=f"import bitsandbytes failed: {type(exc).__name__}: {exc}")
    backends = ["cpu"]
    if torch.cuda.is_available() and getattr(torch.version, "cuda", None):
        backends.insert(0, "cuda")
    # bitsandbytes >= 0.46 registers torch.library kernels per device type; list those it has for 4-bit.
    try:
        op = torch.ops.bitsandbytes.quantize_4bit.default
        registered = [k for k in ("cuda", "cpu", "xpu", "mps", "hpu")
                      if torch._C._dispatch_has_kernel_for_dispatch_key(op.name(), k.upper()
                                                                        if k != "cuda" else "CUDA")]
        if registered:
            backends = registered
    except Exception:  # noqa: BLE001 - older bitsandbytes: keep the simple answer
        pass
    return BitsAndBytesFacts(getattr(bnb, "__version__", version), True, tuple(backends))


def collect_environment(include_gpu: bool = True) -> EnvironmentFacts:
    return EnvironmentFacts(
        python_version=platform.python_version(),
        python_executable=sys.executable,
        platform=platform.platform(),
        machine=platform.machine(),
        packages={p: installed_version(p) for p in KEY_PACKAGES},
        torch=torch_facts(),
        bitsandbytes=bitsandbytes_facts(),
        nvml=read_nvml() if include_gpu else None,
    )
