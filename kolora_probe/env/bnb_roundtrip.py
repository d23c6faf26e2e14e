"""A real bitsandbytes 4-bit (NF4) round trip: quantize → 4-bit matmul → dequantize, against fp32.

Two numbers matter: ``kernel_error`` (bitsandbytes' 4-bit matmul vs a plain matmul with the dequantized
weight — must be ~0, it checks the kernel) and ``quantization_error`` (vs the fp32 matmul — NF4 of
normally distributed weights loses about 9 % relative Frobenius norm; far more means broken kernels).
"""
from __future__ import annotations

import contextlib
import io
import time
from dataclasses import dataclass

NF4_MAX_RELATIVE_ERROR = 0.12      # NF4, blocksize 64, N(0,1) weights: ~0.092 measured (QLoRA paper, §3)
KERNEL_MAX_RELATIVE_ERROR = 1e-2   # 4-bit matmul vs matmul on the dequantized weight


@dataclass(frozen=True)
class QuantRoundTrip:
    device: str
    dtype: str
    quant_type: str
    double_quant: bool
    weight_shape: tuple[int, int]
    packed_bytes: int
    dequant_error: float          # ||deq(W) - W|| / ||W||
    quantization_error: float     # ||matmul_4bit(x, W) - x W^T|| / ||x W^T||
    kernel_error: float           # ||matmul_4bit(x, W) - x deq(W)^T|| / ||x deq(W)^T||
    seconds: float
    error: str | None = None

    @property
    def ok(self) -> bool:
        return (self.error is None and self.quantization_error <= NF4_MAX_RELATIVE_ERROR
                and self.kernel_error <= KERNEL_MAX_RELATIVE_ERROR)


def nf4_round_trip(device: str = "cpu", dtype: str = "fp32", double_quant: bool = True,
                   out_features: int = 512, in_features: int = 256, seed: int = 0) -> QuantRoundTrip:
    import torch

    from kolora_probe.model.meta import torch_dtype

    shape = (out_features, in_features)
    t0 = time.perf_counter()
    try:
        with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
            import bitsandbytes as bnb
            import bitsandbytes.functional as F
        g = torch.Generator().manual_seed(seed)
        w = torch.randn(shape, generator=g).to(device)
        x = torch.randn(8, in_features, generator=g).to(device)
        dt = torch_dtype(dtype)
        q, state = F.quantize_4bit(w.to(dt), blocksize=64, quant_type="nf4", compress_statistics=double_quant)
        deq = F.dequantize_4bit(q, state)
        y = bnb.matmul_4bit(x.to(dt), q.t(), quant_state=state)
        ref = x @ w.t()
        y_deq = x.to(dt) @ deq.t()
        if device.startswith("cuda"):
            torch.cuda.synchronize()

        def rel(a, b) -> float:
            return float((a.float() - b.float()).norm() / b.float().norm())

        return QuantRoundTrip(device, dtype, "nf4", double_quant, shape, int(q.numel() * q.element_size()),
                              rel(deq, w), rel(y, ref), rel(y, y_deq), time.perf_counter() - t0)
    except Exception as exc:  # noqa: BLE001 - reported as a fact, the check decides
        return QuantRoundTrip(device, dtype, "nf4", double_quant, shape, 0, float("nan"), float("nan"),
                              float("nan"), time.perf_counter() - t0,
                              error=f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}")
