"""The PEFT ``LoraConfig`` for a LoRA set-up (causal LM): one builder for every place that wraps a model with LoRA
(the PEFT count in :mod:`kolora_probe.lora.count`, the memory trace and measurement, the throughput benchmark).

``["all-linear"]`` (any case) is passed to PEFT as the string ``"all-linear"``: PEFT expands its shorthand only
from a string, and a list holding it would be looked up as a module name and match nothing.
"""
from __future__ import annotations

from typing import Any, Sequence

ALL_LINEAR = "all-linear"  # PEFT's INCLUDE_LINEAR_LAYERS_SHORTHAND


def is_all_linear(targets: Sequence[str]) -> bool:
    """True when the target list is PEFT's shorthand for every Linear/Conv1D layer except the output head."""
    return len(targets) == 1 and targets[0].lower() == ALL_LINEAR


def peft_lora_config(target_modules: Sequence[str], r: int, alpha: float, dropout: float, bias: str = "none",
                     modules_to_save: Sequence[str] = (), fan_in_fan_out: bool = False,
                     target_parameters: Sequence[str] = ()) -> Any:
    """``peft.LoraConfig`` (task ``CAUSAL_LM``) for these settings.

    ``fan_in_fan_out=True`` when the targets are transformers ``Conv1D`` layers (weight stored in×out, e.g. GPT-2);
    left False, PEFT switches it on for each Conv1D layer itself, with a warning. ``target_parameters`` names
    weight tensors of modules LoRA cannot wrap (mixture-of-experts ``experts.gate_up_proj``): PEFT's ParamWrapper.
    """
    from peft import LoraConfig

    return LoraConfig(r=r, lora_alpha=alpha, lora_dropout=dropout, bias=bias,
                      target_modules=ALL_LINEAR if is_all_linear(target_modules) else list(target_modules),
                      modules_to_save=list(modules_to_save) or None, task_type="CAUSAL_LM",
                      fan_in_fan_out=fan_in_fan_out, target_parameters=list(target_parameters) or None)
