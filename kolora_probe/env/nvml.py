"""GPU facts from NVML (``nvidia-ml-py``, ``import pynvml``): driver, devices, memory, utilisation.

:func:`read_nvml` never raises: a missing library, driver or device becomes ``NvmlFacts.error``.
:class:`NvmlSource` samples every GPU for :mod:`kolora_probe.monitor.recorder` (tests inject a stand-in pynvml module,
or replace the source with a fake one).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable


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


def nvml_init(module: Any = None) -> tuple[Any, str | None]:
    """``(pynvml, None)`` once ``nvmlInit`` succeeded, else ``(None, why)``; ``module`` replaces ``import pynvml``."""
    pynvml = module
    if pynvml is None:
        try:
            import pynvml
        except ImportError as exc:
            return None, nvml_error_reason(exc)
    try:
        pynvml.nvmlInit()
    except Exception as exc:  # noqa: BLE001 - NVMLError_LibraryNotFound, DriverNotLoaded, ...
        return None, nvml_error_reason(exc)
    return pynvml, None


def nvml_shutdown(pynvml: Any) -> None:
    try:
        pynvml.nvmlShutdown()
    except Exception:  # noqa: BLE001
        pass


def read_nvml() -> NvmlFacts:
    pynvml, why = nvml_init()
    if pynvml is None:
        return NvmlFacts(False, error=why)
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
        nvml_shutdown(pynvml)


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


class NvmlSource:
    """Every GPU through NVML, for the monitor (a ``monitor.GpuSource``). Fields a device does not support are None."""

    def __init__(self, nvml_module: Any = None) -> None:
        """``nvml_module``: an object with pynvml's API to use instead of ``import pynvml`` (tests)."""
        self._module = nvml_module
        self._nvml: Any = None
        self._handles: list[tuple[int, Any, str]] = []

    def open(self) -> str | None:
        """None when GPUs can be sampled, else why GPU figures are unavailable."""
        pynvml, why = nvml_init(self._module)
        if pynvml is None:
            return why
        self._nvml = pynvml
        try:
            for i in range(pynvml.nvmlDeviceGetCount()):
                h = pynvml.nvmlDeviceGetHandleByIndex(i)
                self._handles.append((i, h, _s(pynvml.nvmlDeviceGetName(h))))
        except Exception as exc:  # noqa: BLE001
            self.close()
            return nvml_error_reason(exc)
        if not self._handles:
            self.close()
            return "NVML found no GPU device (driver loaded, but no GPU is visible to it)"
        return None

    def _try(self, fn: Callable[[], Any]) -> Any:
        try:
            return fn()
        except Exception:  # noqa: BLE001 - "not supported" on this device: the field stays None
            return None

    def sample(self) -> list[GpuSample]:
        nv = self._nvml
        out = []
        for index, h, name in self._handles:
            mem = nv.nvmlDeviceGetMemoryInfo(h)  # a failure here is a real problem: let the monitor report it
            util = self._try(lambda: nv.nvmlDeviceGetUtilizationRates(h))
            temp = self._try(lambda: nv.nvmlDeviceGetTemperature(h, nv.NVML_TEMPERATURE_GPU))
            power_mw = self._try(lambda: nv.nvmlDeviceGetPowerUsage(h))  # milliwatts
            procs = self._try(lambda: nv.nvmlDeviceGetComputeRunningProcesses(h)) or []
            out.append(GpuSample(
                index=index, name=name, memory_used_bytes=int(mem.used), memory_total_bytes=int(mem.total),
                utilization_percent=float(util.gpu) if util is not None else None,
                temperature_c=float(temp) if temp is not None else None,
                power_w=round(power_mw / 1000.0, 3) if power_mw is not None else None,
                processes=[{"pid": int(p.pid), "used_memory_bytes": (int(p.usedGpuMemory)
                                                                     if p.usedGpuMemory is not None else None)}
                           for p in procs]))
        return out

    def close(self) -> None:
        if self._nvml is not None:
            nvml_shutdown(self._nvml)
        self._nvml = None
        self._handles = []
