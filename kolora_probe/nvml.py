"""GPU facts from NVML (``nvidia-ml-py``, ``import pynvml``): driver, devices, memory, utilisation.

:func:`read_nvml` never raises: a missing library, driver or device becomes ``NvmlFacts.error``.
Sampling for the monitor goes through ``kolora_probe.monitor.NvmlSource``, which tests replace with a fake source.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class NvmlDevice:
    index: int
    name: str
    uuid: str
    memory_total_bytes: int
    memory_used_bytes: int
    memory_free_bytes: int
    compute_capability: tuple[int, int] | None = None


@dataclass(frozen=True)
class NvmlFacts:
    available: bool
    driver_version: str | None = None
    cuda_driver_version: str | None = None
    devices: tuple[NvmlDevice, ...] = ()
    error: str | None = None


def _s(v: Any) -> str:
    return v.decode() if isinstance(v, bytes) else str(v)


def nvml_error_reason(exc: BaseException) -> str:
    """Turn an NVML exception into a short, actionable reason."""
    name = type(exc).__name__
    text = str(exc)
    if isinstance(exc, ImportError):
        return "nvidia-ml-py is not installed (pip install nvidia-ml-py)"
    if "LibraryNotFound" in name or "Library Not Found" in text or "NVML Shared Library Not Found" in text:
        return "NVML driver library (libnvidia-ml.so) not found: no NVIDIA driver is installed on this machine"
    if "DriverNotLoaded" in name or "Driver Not Loaded" in text:
        return "NVIDIA driver is not loaded (is there a GPU? check nvidia-smi)"
    return f"NVML error: {name}: {text}"


def read_nvml() -> NvmlFacts:
    try:
        import pynvml
    except ImportError as exc:
        return NvmlFacts(False, error=nvml_error_reason(exc))
    try:
        pynvml.nvmlInit()
    except Exception as exc:  # noqa: BLE001
        return NvmlFacts(False, error=nvml_error_reason(exc))
    try:
        driver = _s(pynvml.nvmlSystemGetDriverVersion())
        try:
            cv = pynvml.nvmlSystemGetCudaDriverVersion()
            cuda = f"{cv // 1000}.{(cv % 1000) // 10}"
        except Exception:  # noqa: BLE001
            cuda = None
        devices = []
        for i in range(pynvml.nvmlDeviceGetCount()):
            h = pynvml.nvmlDeviceGetHandleByIndex(i)
            mem = pynvml.nvmlDeviceGetMemoryInfo(h)
            try:
                cc = tuple(pynvml.nvmlDeviceGetCudaComputeCapability(h))
            except Exception:  # noqa: BLE001
                cc = None
            devices.append(NvmlDevice(i, _s(pynvml.nvmlDeviceGetName(h)), _s(pynvml.nvmlDeviceGetUUID(h)),
                                      int(mem.total), int(mem.used), int(mem.free), cc))
        if not devices:
            return NvmlFacts(False, driver, cuda, (), error="NVML found no GPU device")
        return NvmlFacts(True, driver, cuda, tuple(devices))
    except Exception as exc:  # noqa: BLE001
        return NvmlFacts(False, error=nvml_error_reason(exc))
    finally:
        try:
            pynvml.nvmlShutdown()
        except Exception:  # noqa: BLE001
            pass


@dataclass
class GpuSample:
    index: int
    name: str
    memory_used_bytes: int
    memory_total_bytes: int
    utilization_percent: float | None = None
    temperature_c: float | None = None
    power_w: float | None = None
    processes: list[dict[str, int]] = field(default_factory=list)
