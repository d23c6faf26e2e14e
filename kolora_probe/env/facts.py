"""Facts about the machine: Python, PyTorch build, CUDA, GPUs (NVML and torch), bitsandbytes backend.

:func:`collect_environment` returns an :class:`EnvironmentFacts` dataclass; nothing here asserts anything.
Each probe (torch, bitsandbytes, NVML, library imports) runs once per process and is reused by every caller
(the checks, the CUDA gate of ``gpu`` checks, the JSON report); ``refresh=True`` probes again.
"""
from __future__ import annotations

import contextlib
import dataclasses
import functools
import platform
import sys
import time
from dataclasses import dataclass, field
from importlib import metadata
from typing import Any

from kolora_probe.env.nvml import NvmlFacts, read_nvml


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


def usable_threads() -> int:
    """Threads worth giving torch's CPU kernels now: the CPUs this process may run on (affinity), less those
    other processes keep busy (1-minute load average beyond this process's own one), at least 1.

    On an idle machine that is every CPU; on an oversubscribed one, OpenMP threads that wait for a CPU turn each
    barrier into a stall (a loaded 2-core machine ran a small model's forward passes 10–30× slower with 2
    threads than with 1).
    """
    import os

    try:
        cpus = len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        cpus = os.cpu_count() or 1
    try:
        busy = max(0.0, os.getloadavg()[0] - 1.0)
    except OSError:
        busy = 0.0
    return max(1, min(cpus, round(cpus - busy)))


@contextlib.contextmanager
def torch_threads(n: int):
    """Run the block with ``torch.set_num_threads(n)``; the previous setting is restored after."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield n
    finally:
        torch.set_num_threads(before)


KEY_PACKAGES = ("torch", "transformers", "peft", "accelerate", "bitsandbytes", "safetensors", "tokenizers",
                "huggingface_hub", "nvidia-ml-py", "pytest", "pytest-html", "pytest-benchmark")


def installed_version(dist: str) -> str | None:
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return None


def _cached(probe):
    """``probe(refresh=False)``: the first result is kept for the process; ``refresh=True`` probes again."""
    once = functools.cache(probe)

    @functools.wraps(probe)
    def wrapper(refresh: bool = False):
        if refresh:
            once.cache_clear()
        return once()

    wrapper.cache_clear = once.cache_clear  # type: ignore[attr-defined]
    return wrapper


@_cached
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
        nv = nvml_facts()
        why = nv.error or "NVML sees no device"
        return (f"torch {t.version} (CUDA {t.cuda_build}) finds no usable GPU: torch.cuda.is_available() is False "
                f"({why}); check the NVIDIA driver, CUDA_VISIBLE_DEVICES and that the machine has a GPU")
    return None


@_cached
def nvml_facts() -> NvmlFacts:
    return read_nvml()


@_cached
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


@dataclass(frozen=True)
class LibraryImport:
    name: str
    version: str | None
    seconds: float               # this import's own cost (0 when another import had already loaded it)
    error: str | None = None     # one line: why it failed


@functools.cache
def _import(name: str) -> LibraryImport:
    import importlib

    t0 = time.perf_counter()
    try:
        importlib.import_module(name)
    except Exception as exc:  # noqa: BLE001 - a broken install is a fact to report
        msg = str(exc).splitlines()[0] if str(exc) else ""
        return LibraryImport(name, installed_version(name), time.perf_counter() - t0, f"{type(exc).__name__}: {msg}")
    return LibraryImport(name, installed_version(name), time.perf_counter() - t0)


def import_libraries(names: tuple[str, ...]) -> tuple[LibraryImport, ...]:
    """Import each library once per process (in order) and say how long it took or why it failed."""
    return tuple(_import(n) for n in names)


def collect_environment(include_gpu: bool = True, refresh: bool = False) -> EnvironmentFacts:
    """The machine's facts; the torch/bitsandbytes/NVML probes are the process's cached ones unless ``refresh``."""
    return EnvironmentFacts(
        python_version=platform.python_version(),
        python_executable=sys.executable,
        platform=platform.platform(),
        machine=platform.machine(),
        packages={p: installed_version(p) for p in KEY_PACKAGES},
        torch=torch_facts(refresh=refresh),
        bitsandbytes=bitsandbytes_facts(refresh=refresh),
        nvml=nvml_facts(refresh=refresh) if include_gpu else None,
    )
