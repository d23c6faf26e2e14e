"""Can this model (and this device) run the plan at all? The contradictions between a valid plan and the model's
config.json or the GPU, found before anything is computed from the plan.

Contradictions inside the plan alone (``use_cache`` with gradient checkpointing …) are plan errors
(:mod:`kolora_probe.plan.schema`); these need the model or the device: a sequence longer than the model's position
limit, a quantization the checkpoint's own ``quantization_config`` contradicts, bf16 on a GPU without it.
Each problem is one line: what, the numbers, the fix.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

POSITION_LIMIT_KEYS = ("n_positions", "max_position_embeddings", "n_ctx")


@dataclass(frozen=True)
class PositionLimit:
    tokens: int
    key: str            # the config.json key it comes from


def position_limit(config: Any) -> PositionLimit | None:
    """The longest sequence the model's position embeddings cover (n_positions / max_position_embeddings)."""
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    for key in POSITION_LIMIT_KEYS:
        v = getattr(text, key, None)
        if isinstance(v, int) and not isinstance(v, bool) and v > 0:
            return PositionLimit(v, key)
    return None


def _checkpoint_quantization(config: Any) -> str | None:
    """'4bit' / '8bit' / the quant_method when config.json ships a quantization_config; None when it has none."""
    q = getattr(config, "quantization_config", None)
    if q is None:
        return None
    d = q if isinstance(q, dict) else (q.to_dict() if hasattr(q, "to_dict") else vars(q))
    if d.get("load_in_4bit"):
        return "4bit"
    if d.get("load_in_8bit"):
        return "8bit"
    return str(d.get("quant_method") or "quantized")


def plan_model_problems(config: Any, plan: Any, model_name: str, gpu: Any = None) -> list[str]:
    """One line per contradiction between ``plan`` and the model's ``config`` (and ``gpu``, a
    :class:`~kolora_probe.env.facts.TorchGpu`, when the run has one); empty when the model can run it."""
    problems: list[str] = []
    t = plan.training
    limit = position_limit(config)
    if limit is not None and t.seq_len > limit.tokens:
        problems.append(
            f"training.seq_len = {t.seq_len:,} exceeds the position limit of {model_name} ({limit.key} = "
            f"{limit.tokens:,} in config.json); fix: set [training].seq_len (--seq-len) to at most {limit.tokens:,}")
    stored = _checkpoint_quantization(config)
    if stored is not None and t.quantization != "none" and stored != t.quantization:
        problems.append(
            f"training.quantization = {t.quantization!r} but {model_name} is stored {stored} (quantization_config in "
            f"config.json): it cannot be quantized both ways; fix: set [training].quantization = "
            f"{stored if stored in ('4bit', '8bit') else 'none'!r} (--quantization) or use an unquantized checkpoint")
    wants_bf16 = [k for k in ("dtype", "weights_dtype") if getattr(t, k) == "bf16"]
    if gpu is not None and wants_bf16 and not gpu.bf16_supported:
        cc = ".".join(str(x) for x in gpu.compute_capability)
        problems.append(
            f"training.{wants_bf16[0]} = 'bf16' but GPU {gpu.index} ({gpu.name}, compute capability {cc}) has no "
            f"bf16; fix: set [training].dtype/weights_dtype = 'fp16' (--dtype fp16 --weights-dtype fp16) or 'fp32'")
    return problems


def first_gpu() -> Any:
    """The first usable CUDA GPU's facts, or None (CPU-only machine: the device checks run with ``-m gpu``)."""
    from kolora_probe.env.facts import torch_facts

    facts = torch_facts()
    return facts.gpus[0] if facts.gpus else None
