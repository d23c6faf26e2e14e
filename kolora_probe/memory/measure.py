"""Measured peak memory of one real training step of the plan (random weights: memory does not depend on them).

* CUDA: after a warm-up step (optimizer state, cuBLAS handle, autocast caches), ``torch.cuda.synchronize``,
  ``reset_peak_memory_stats``, one step, then ``max_memory_allocated`` (what the prediction means) and
  ``max_memory_reserved`` (allocator slack on top). NVML's used memory minus PyTorch's reserved memory is the CUDA
  context and other processes, reported separately as ``context_overhead_bytes``.
* CPU: the profiler's memory events (``torch.profiler.profile(profile_memory=True)``): the running sum of
  allocation deltas during the step, plus the bytes already resident (parameters, buffers, optimizer state,
  the input batch). This is the figure the CPU-semantics trace (``trace_step(..., cuda=False)``) reproduces.

An out-of-memory error during the step (``torch.cuda.OutOfMemoryError`` or a ``RuntimeError`` saying
"out of memory") does not propagate: the measurement is returned with ``error`` set and the numbers seen so far,
after the model and optimizer are dropped, ``gc.collect()`` and ``torch.cuda.empty_cache()``.
"""
from __future__ import annotations

import gc
import json
import os
import tempfile
import time
from dataclasses import dataclass
from typing import Any, Callable

from kolora_probe.memory.trace import StepShape, build_step_model, make_optimizer


@dataclass(frozen=True)
class Measurement:
    device: str
    method: str                              # cuda_allocator | cpu_profiler
    peak_allocated_bytes: int | None         # max_memory_allocated (CUDA) / profiler peak (CPU)
    peak_reserved_bytes: int | None = None   # CUDA only
    baseline_bytes: int | None = None        # resident before the step
    nvml_used_bytes: int | None = None       # device memory used as NVML sees it (all processes, context)
    context_overhead_bytes: int | None = None  # NVML used − torch reserved
    error: str | None = None                 # e.g. "CUDA out of memory ..."; numbers are then partial
    oom: bool = False
    wall_s: float = 0.0

    @property
    def ok(self) -> bool:
        return self.error is None and self.peak_allocated_bytes is not None

    def to_dict(self) -> dict[str, Any]:
        return {k: getattr(self, k) for k in ("device", "method", "peak_allocated_bytes", "peak_reserved_bytes",
                                             "baseline_bytes", "nvml_used_bytes", "context_overhead_bytes",
                                             "error", "oom", "wall_s")}


def is_oom(exc: BaseException) -> bool:
    import torch

    if isinstance(exc, torch.cuda.OutOfMemoryError):
        return True
    return isinstance(exc, RuntimeError) and "out of memory" in str(exc).lower()


def release_memory(device: str) -> None:
    import torch

    gc.collect()
    if device.startswith("cuda") and torch.cuda.is_available():
        torch.cuda.synchronize()
        torch.cuda.empty_cache()


def _storage_bytes(tensors: Any) -> int:
    seen: set[int] = set()
    total = 0
    for t in tensors:
        st = t.untyped_storage()
        if st.data_ptr() not in seen:
            seen.add(st.data_ptr())
            total += st.nbytes()
    return total


def resident_bytes(model: Any, optimizer: Any, *extra: Any) -> int:
    """Bytes of the distinct storages of parameters, buffers, gradients, optimizer state, bitsandbytes 4-bit
    quant-state tensors (absmax, code, offset and the nested state: attributes, not parameters) and ``extra``."""
    import torch

    ts = [p for p in model.parameters()] + [b for b in model.buffers()]
    for p in model.parameters():
        state = getattr(p, "quant_state", None)
        while state is not None:
            ts += [t for t in (getattr(state, k, None) for k in ("absmax", "code", "offset")) if torch.is_tensor(t)]
            state = getattr(state, "state2", None)
    ts += [p.grad for p in model.parameters() if p.grad is not None]
    ts += [v for st in optimizer.state.values() for v in st.values() if torch.is_tensor(v) and v.numel() > 0]
    ts += [e for e in extra if torch.is_tensor(e)]
    return _storage_bytes(ts)


def cpu_profiler_peak(fn: Callable[[], Any]) -> int:
    """Peak of the running sum of allocation deltas the profiler records while ``fn`` runs (bytes above the start)."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True, record_shapes=False) as prof:
        fn()
    fd, path = tempfile.mkstemp(suffix=".json")
    os.close(fd)
    try:
        prof.export_chrome_trace(path)
        with open(path, encoding="utf-8") as f:
            events = json.load(f)["traceEvents"]
    finally:
        os.unlink(path)
    mem = sorted((e["ts"], e["args"].get("Bytes", 0)) for e in events
                 if e.get("name") == "[memory]" and "Bytes" in e.get("args", {}))
    cur = peak = 0
    for _, delta in mem:
        cur += delta
        peak = max(peak, cur)
    return peak


def _nvml_used(index: int) -> int | None:
    try:
        from kolora_probe.env.nvml import read_nvml

        facts = read_nvml()
        dev = next((d for d in facts.devices if d.index == index), None)
        return dev.memory_used_bytes if dev is not None else None
    except Exception:  # noqa: BLE001 - context overhead is optional information
        return None


def measure_callable(step: Callable[[], Any], device: str, baseline: Callable[[], int] | None = None,
                     cleanup: Callable[[], None] | None = None) -> Measurement:
    """Measure one call of ``step`` on ``device`` ("cpu" or "cuda[:i]"); OOM is caught and recorded."""
    import torch

    t0 = time.perf_counter()
    cuda = device.startswith("cuda")
    method = "cuda_allocator" if cuda else "cpu_profiler"
    base = None
    try:
        if cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            base = torch.cuda.memory_allocated()
            step()
            torch.cuda.synchronize()
            idx = torch.device(device).index or 0
            reserved_now = torch.cuda.memory_reserved()
            nvml = _nvml_used(idx)
            return Measurement(device, method, torch.cuda.max_memory_allocated(), torch.cuda.max_memory_reserved(),
                               base, nvml, (nvml - reserved_now) if nvml is not None else None,
                               wall_s=time.perf_counter() - t0)
        base = baseline() if baseline is not None else 0
        peak = cpu_profiler_peak(step)
        return Measurement(device, method, base + peak, None, base, wall_s=time.perf_counter() - t0)
    except Exception as exc:  # noqa: BLE001 - only OOM is turned into a result
        if not is_oom(exc):
            raise
        peak = torch.cuda.max_memory_allocated() if cuda and torch.cuda.is_available() else None
        reserved = torch.cuda.max_memory_reserved() if cuda and torch.cuda.is_available() else None
        msg = str(exc).strip().splitlines()[0][:300] if str(exc).strip() else type(exc).__name__
        return Measurement(device, method, peak, reserved, base, error=f"{type(exc).__name__}: {msg}", oom=True,
                           wall_s=time.perf_counter() - t0)
    finally:
        if cleanup is not None:
            cleanup()
        release_memory(device)


def _build_4bit_cuda(config: Any, shape: StepShape, device: str) -> Any:
    """QLoRA model on CUDA: meta model → bnb Linear4bit layers with random weights quantized on ``.to(device)``."""
    import bitsandbytes as bnb
    import torch

    from kolora_probe.memory.trace import _quantize_4bit_meta, add_lora, prepare_kbit, step_config, trl_cast
    from kolora_probe.model.meta import build_meta_model, torch_dtype

    model = _quantize_4bit_meta(build_meta_model(step_config(config, shape), shape.weights_dtype), shape)
    wdt = torch_dtype(shape.weights_dtype)
    for mod in model.modules():
        if isinstance(mod, bnb.nn.Linear4bit):
            w = torch.randn(mod.out_features, mod.in_features, dtype=wdt) * 0.02
            mod.weight = bnb.nn.Params4bit(w, requires_grad=False, compress_statistics=shape.double_quant,
                                           quant_type="nf4")
            if mod.bias is not None:
                mod.bias = torch.nn.Parameter(torch.zeros(mod.out_features, dtype=wdt), requires_grad=False)
    for mod in model.modules():
        for name, p in list(mod._parameters.items()):
            if p is not None and p.device.type == "meta":
                mod._parameters[name] = torch.nn.Parameter(torch.randn(p.shape, dtype=p.dtype) * 0.02,
                                                           requires_grad=p.requires_grad)
        for name, b in list(mod._buffers.items()):
            if b is not None and b.device.type == "meta":
                mod._buffers[name] = torch.zeros(b.shape, dtype=b.dtype)
    if hasattr(model, "tie_weights"):
        model.tie_weights()
    model = model.to(device)
    if shape.prepare_kbit:      # the plan's stack, as the trace builds it
        model = prepare_kbit(model)
    if shape.trl_casting:
        trl_cast(model, shape)
    return add_lora(model, shape)


def training_step(forward: Any, opt: Any, ids: Any, autocast: Any) -> Callable[[], None]:
    """One real training step as a callable: ``forward`` (the model, or its DDP wrapper) on ``ids`` as inputs and
    labels under ``autocast``, backward, ``opt.step()``, ``zero_grad(set_to_none=True)``."""
    def step() -> None:
        with autocast:
            loss = forward(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        del loss

    return step


def measure_step(config: Any, shape: StepShape, device: str = "cpu") -> Measurement:
    """Build the plan's model with LoRA on ``device``, run a warm-up step, then measure one step."""
    import torch

    from kolora_probe.model.meta import autocast_for

    cuda = device.startswith("cuda")
    holder: dict[str, Any] = {}
    try:
        if shape.quantization == "4bit":
            if not cuda:
                return Measurement(device, "cpu_profiler", None,
                                   error="4-bit (bitsandbytes NF4) steps are measured on CUDA only")
            holder["model"] = _build_4bit_cuda(config, shape, device)
        else:
            holder["model"] = build_step_model(config, shape, device)
        model = holder["model"]
        holder["opt"] = opt = make_optimizer(model, shape, cuda=cuda, traced=False)
        vocab = int(getattr(model.config, "vocab_size", 100))
        holder["ids"] = ids = torch.randint(0, vocab, (shape.batch_size, shape.seq_len), device=device)
        step = training_step(model, opt, ids, autocast_for(device, shape.dtype))
        step()  # warm-up
        gc.collect()
        return measure_callable(step, device, baseline=lambda: resident_bytes(model, opt, ids),
                                cleanup=holder.clear)
    except Exception as exc:  # noqa: BLE001 - OOM while building or warming up is a result too
        if not is_oom(exc):
            raise
        msg = str(exc).strip().splitlines()[0][:300]
        holder.clear()
        release_memory(device)
        peak = torch.cuda.max_memory_allocated() if cuda and torch.cuda.is_available() else None
        return Measurement(device, "cuda_allocator" if cuda else "cpu_profiler", peak,
                           error=f"{type(exc).__name__} before the measured step: {msg}", oom=True)
