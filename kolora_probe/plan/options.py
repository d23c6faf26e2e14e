"""Command-line overrides of plan fields, shared by the pytest options (conftest.py) and the CLI.

Each :class:`PlanOption` maps one option (``--r``) to one plan key (``lora.r``). Both front ends add the
same options and call :func:`overrides_from` to turn parsed values into overrides of the plan file(s)
(:func:`plan_formats.load_plans`).
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

from kolora_probe.plan.schema import (ADAPTER_DTYPES, ATTN_IMPLEMENTATIONS, DEFAULT_PLAN_PATH, DTYPES, OPTIMIZERS,
                                      QUANTIZATIONS, STRATEGIES, UNSET, Plan)


def _csv(value: str) -> list[str]:
    return [v.strip() for v in value.split(",") if v.strip()] if value.strip() else []


def _int_or_none(value: str) -> Any:
    """An integer, or ``none`` to remove the plan's value."""
    return UNSET if value.strip().lower() == "none" else int(value)


@dataclass(frozen=True)
class PlanOption:
    flag: str
    key: str                      # dotted plan key
    convert: Callable[[str], Any] | None
    help: str
    choices: tuple[str, ...] | None = None
    boolean: bool = False         # adds --flag / --no-flag

    @property
    def dest(self) -> str:
        return "plan_" + self.flag.lstrip("-").replace("-", "_")


PLAN_OPTIONS: tuple[PlanOption, ...] = (
    PlanOption("--model", "model.id", str, "hub id or local directory of the model (overrides [model].id)"),
    PlanOption("--revision", "model.revision", str, "hub revision (overrides [model].revision)"),
    PlanOption("--tokenizer-class", "model.tokenizer_class", str, "tokenizer class (overrides [model].tokenizer_class)"),
    PlanOption("--targets", "lora.target_modules", _csv, "comma-separated LoRA target modules (overrides [lora].target_modules)"),
    PlanOption("--target-parameters", "lora.target_parameters", _csv,
               "comma-separated weight tensors to adapt with PEFT's target_parameters, e.g. experts.gate_up_proj "
               "(overrides [lora].target_parameters)"),
    PlanOption("--r", "lora.r", int, "LoRA rank (overrides [lora].r)"),
    PlanOption("--alpha", "lora.alpha", float, "LoRA alpha (overrides [lora].alpha)"),
    PlanOption("--lora-dropout", "lora.dropout", float, "LoRA dropout (overrides [lora].dropout)"),
    PlanOption("--expected-trainable", "lora.expected_trainable_params", _int_or_none,
               "expected trainable parameter count (overrides [lora].expected_trainable_params; none: compare "
               "with nothing). A --model other than the plan's drops the plan's count"),
    PlanOption("--dtype", "training.dtype", str, "compute dtype (overrides [training].dtype)", DTYPES),
    PlanOption("--weights-dtype", "training.weights_dtype", str, "frozen weight dtype (overrides [training].weights_dtype)", DTYPES),
    PlanOption("--quantization", "training.quantization", str, "overrides [training].quantization", QUANTIZATIONS),
    PlanOption("--batch-size", "training.batch_size", int, "overrides [training].batch_size"),
    PlanOption("--seq-len", "training.seq_len", int, "overrides [training].seq_len"),
    PlanOption("--optimizer", "training.optimizer", str, "overrides [training].optimizer", OPTIMIZERS),
    PlanOption("--gradient-checkpointing", "training.gradient_checkpointing", None,
               "overrides [training].gradient_checkpointing", boolean=True),
    PlanOption("--double-quant", "training.double_quant", None,
               "4-bit: quantize the quantization constants too (overrides [training].double_quant)", boolean=True),
    PlanOption("--use-cache", "training.use_cache", None,
               "transformers' KV cache during the training forward (overrides [training].use_cache)", boolean=True),
    # the stack as users run it (memory): what PEFT / TRL / transformers do around the step
    PlanOption("--prepare-kbit", "training.prepare_kbit", None,
               "PEFT prepare_model_for_kbit_training (non-quantized params in fp32; default: on for 4/8-bit) "
               "(overrides [training].prepare_kbit)", boolean=True),
    PlanOption("--checkpointing-reentrant", "training.checkpointing_reentrant", None,
               "torch.utils.checkpoint(use_reentrant=...) (default: reentrant with prepare_kbit) "
               "(overrides [training].checkpointing_reentrant)", boolean=True),
    PlanOption("--trl-casting", "training.trl_casting", None,
               "TRL SFTTrainer's bf16 casting of embeddings/head after prepare_kbit "
               "(overrides [training].trl_casting)", boolean=True),
    PlanOption("--adapter-dtype", "training.adapter_dtype", str,
               "LoRA weights' dtype (overrides [training].adapter_dtype)", ADAPTER_DTYPES),
    PlanOption("--attn-implementation", "training.attn_implementation", str,
               "attention kernel (overrides [training].attn_implementation)", ATTN_IMPLEMENTATIONS),
    PlanOption("--fused-cross-entropy", "training.fused_cross_entropy", None,
               "Liger-style fused linear cross-entropy: no b·s·V logits (overrides [training].fused_cross_entropy)",
               boolean=True),
    PlanOption("--budget-gib", "budget.gpu_memory_gib", float, "GPU memory budget in GiB (overrides [budget].gpu_memory_gib)"),
    PlanOption("--strategy", "distributed.strategy", str, "multi-GPU strategy (overrides [distributed].strategy)", STRATEGIES),
    PlanOption("--world-size", "distributed.world_size", int, "ranks in all (overrides [distributed].world_size)"),
    PlanOption("--distributed-config", "distributed.config", str,
               "accelerate config YAML or DeepSpeed JSON (overrides [distributed].config)"),
    PlanOption("--rendezvous-timeout", "distributed.rendezvous_timeout_s", float,
               "seconds the launch pre-flight waits for every rank (overrides [distributed].rendezvous_timeout_s)"),
)


def _safe(convert: Callable[[str], Any], flag: str) -> Callable[[str], Any]:
    """Keep the raw string when conversion fails, so plan validation reports it with the allowed values."""
    def conv(value: str) -> Any:
        try:
            return convert(value)
        except (TypeError, ValueError):
            return value
    conv.__name__ = flag
    return conv


def add_plan_options(add: Callable[..., Any], prefix_help: str = "") -> None:
    """Add every plan option through ``add`` (argparse's add_argument or pytest's parser.addoption)."""
    add("--plan", dest="plan_path", default=None, action="append",
        help=prefix_help + "training plan: a kolora-probe TOML, a PEFT adapter_config.json, an axolotl or LLaMA-Factory "
                           "YAML, or a TRL/transformers training-arguments YAML/JSON; repeat to combine files "
                           "(e.g. --plan train.yaml --plan adapter_config.json) (default: plans/kogpt2-lora.toml)")
    for opt in PLAN_OPTIONS:
        if opt.boolean:
            add(opt.flag, dest=opt.dest, action="store_true", default=None, help=opt.help)
            add("--no-" + opt.flag[2:], dest=opt.dest, action="store_false", default=None, help=opt.help)
        else:
            # choices are validated by the plan schema (one line naming the option and the allowed values)
            add(opt.flag, dest=opt.dest, default=None, type=_safe(opt.convert, opt.flag), help=opt.help)


def overrides_from(get: Callable[[str], Any]) -> tuple[dict[str, Any], dict[str, str]]:
    """(``{"table.key": value}``, ``{"table.key": "--flag"}``) for every option that was given."""
    values: dict[str, Any] = {}
    names: dict[str, str] = {}
    for opt in PLAN_OPTIONS:
        v = get(opt.dest)
        if v is not None:
            values[opt.key] = v
            names[opt.key] = ("--no-" + opt.flag[2:]) if opt.boolean and v is False else opt.flag
    return values, names


def plan_from_options(plan_path: str | Sequence[str] | None, get: Callable[[str], Any],
                      budget_required: bool = True) -> Plan:
    """Load the plan file(s) (or the default) with the option overrides. Raises PlanError.

    ``budget_required=False`` (commands that never use the budget) leaves a missing budget unset instead of failing.
    """
    from kolora_probe.plan.formats import load_plans

    paths = [plan_path] if isinstance(plan_path, (str, Path)) else list(plan_path or []) or [DEFAULT_PLAN_PATH]
    values, names = overrides_from(get)
    return load_plans(paths, values, names, budget_required=budget_required)


def plan_from_namespace(ns: Any, budget_required: bool = True) -> Plan:
    return plan_from_options(getattr(ns, "plan_path", None), lambda dest: getattr(ns, dest, None), budget_required)


def describe(values: Mapping[str, Any]) -> str:
    return ", ".join(f"{k}={v!r}" for k, v in values.items())
