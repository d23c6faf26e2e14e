"""The training plan: the single input that describes the planned LoRA/QLoRA run.

A plan is a TOML file with four tables (``[model]``, ``[lora]``, ``[training]``, ``[budget]``) and an
optional ``[checks]`` table. :func:`load_plan` validates it against :data:`SCHEMA` and returns a frozen
:class:`Plan`; every problem becomes one line naming the file, the key and the allowed values, and all
lines are raised together as :class:`PlanError`. :func:`apply_overrides` applies command-line overrides
with the same validation (the "file" is then the option name). The user's own training config (axolotl,
LLaMA-Factory, TRL, PEFT adapter_config.json) is read into the same tables by :mod:`kolora_probe.plan.formats`.
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping

DTYPES = ("fp32", "fp16", "bf16")
QUANTIZATIONS = ("none", "8bit", "4bit")
OPTIMIZERS = ("adamw", "adamw_8bit", "paged_adamw", "paged_adamw_8bit", "sgd")
ADAPTER_DTYPES = ("fp32", "bf16", "fp16")
ATTN_IMPLEMENTATIONS = ("sdpa", "eager", "flash_attention_2")
BIASES = ("none", "all", "lora_only")
STRATEGIES = ("none", "ddp", "fsdp", "zero2", "zero3")

DEFAULT_PLAN_PATH = Path(__file__).resolve().parent.parent / "data" / "plans" / "kogpt2-lora.toml"  # plans/ in the repo

# Upper bounds of the numbers a plan may hold: far above any real run, low enough that nothing downstream
# overflows or tries to allocate for them (every bound is checked in tests/test_plan.py).
MAX_R = 1 << 16
MAX_ALPHA = 1e6
MAX_BATCH_SIZE = 1 << 16
MAX_SEQ_LEN = 1 << 22
MAX_GPU_MEMORY_GIB = 1 << 20       # 1 PiB
MAX_TRAINABLE_PARAMS = 10 ** 13


class _Unset:
    """The value of an override that removes an optional key (``--expected-trainable=none``)."""

    def __repr__(self) -> str:
        return "none"


UNSET: Any = _Unset()


class PlanError(ValueError):
    """One or more plan problems; ``lines`` holds one actionable line per problem."""

    def __init__(self, lines: list[str]):
        self.lines = list(lines)
        super().__init__("\n".join(self.lines))


@dataclass(frozen=True)
class ModelSpec:
    id: str
    revision: str = "main"
    tokenizer_class: str = "AutoTokenizer"
    special_tokens: Mapping[str, str] = field(default_factory=dict)
    trust_remote_code: bool = False


@dataclass(frozen=True)
class LoraSpec:
    r: int
    alpha: float
    dropout: float
    target_modules: tuple[str, ...]
    bias: str = "none"
    modules_to_save: tuple[str, ...] = ()
    expected_trainable_params: int | None = None
    target_parameters: tuple[str, ...] = ()   # PEFT target_parameters: weight tensors of modules LoRA cannot wrap


@dataclass(frozen=True)
class TrainingSpec:
    dtype: str = "fp32"              # compute dtype: fp32, or the autocast dtype (fp16/bf16)
    weights_dtype: str = "fp32"      # dtype the frozen (non-quantized) weights are stored in
    quantization: str = "none"       # none | 8bit | 4bit (NF4)
    double_quant: bool = True        # 4-bit only: quantize the quantization constants too
    batch_size: int = 1
    seq_len: int = 512
    gradient_checkpointing: bool = False
    optimizer: str = "adamw"
    use_cache: bool = False          # transformers' KV cache during the training forward
    # The stack as the HF/PEFT/TRL recipes run it (None = that stack's default, resolved in StepShape.from_plan):
    prepare_kbit: bool | None = None             # PEFT prepare_model_for_kbit_training; default: on when quantized
    checkpointing_reentrant: bool | None = None  # default: reentrant with prepare_kbit (torch's default), else not
    trl_casting: bool = False                    # TRL SFTTrainer (bf16, 4-bit): embeddings/head back to bf16
    adapter_dtype: str = "fp32"                  # PEFT casts adapters to fp32 (autocast_adapter_dtype=True)
    attn_implementation: str = "sdpa"            # transformers' default; eager keeps b·h·s² scores
    fused_cross_entropy: bool = False            # Liger fused linear-cross-entropy: no b·s·V logits


@dataclass(frozen=True)
class BudgetSpec:
    gpu_memory_gib: float
    tolerance_percent: float = 5.0   # allowed |measured - predicted| / measured


@dataclass(frozen=True)
class ChecksSpec:
    max_loss_fraction: float = 0.6   # mean LM loss on the Korean sample must be < this * ln(vocab)
    korean_sample: str | None = None  # text file; None = the sample shipped with kolora_probe


@dataclass(frozen=True)
class DistributedSpec:
    strategy: str = "none"           # none (one GPU) | ddp | fsdp (FSDP2 fully_shard) | zero2 | zero3 (DeepSpeed)
    world_size: int = 1              # ranks in all (GPUs); the per-rank batch is [training].batch_size
    nodes: int = 1
    reshard_after_forward: bool = True   # FSDP: free the gathered weights after each block's forward
    cpu_offload: bool = False        # FSDP: sharded parameters, gradients and optimizer states on the CPU
    offload_optimizer: bool = False  # ZeRO: optimizer states (and fp32 master weights) on the CPU
    offload_params: bool = False     # ZeRO-3: parameters on the CPU
    config: str | None = None        # an accelerate config YAML or a DeepSpeed JSON (its values fill unset keys)
    rendezvous_timeout_s: float = 60.0   # launch pre-flight: a rendezvous that does not complete fails after this


@dataclass(frozen=True)
class Plan:
    model: ModelSpec
    lora: LoraSpec
    training: TrainingSpec
    budget: BudgetSpec
    checks: ChecksSpec = field(default_factory=ChecksSpec)
    source: str = "<defaults>"
    origins: Mapping[str, str] = field(default_factory=dict)  # "table.key" -> file key, CLI option or default
    notes: tuple[str, ...] = ()      # what the user should know: settings of their config with no plan equivalent,
                                     # and what the overrides changed beyond the keys they set
    distributed: DistributedSpec = field(default_factory=DistributedSpec)

    @property
    def budget_bytes(self) -> int:
        return int(self.budget.gpu_memory_gib * 2**30)

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["model"]["special_tokens"] = dict(self.model.special_tokens)
        return d


# --- schema ---------------------------------------------------------------------------------------
# Each key: (type check, description of allowed values, converter). The description is what users see.

Validator = Callable[[Any], bool]


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_num(v: Any) -> bool:
    """A finite number (inf and nan are never a usable plan value)."""
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _int_in(lo: int, hi: int) -> tuple[Validator, str]:
    return (lambda v: _is_int(v) and lo <= v <= hi), f"an integer >= {lo} (at most {hi:,})"


def _choice(options: tuple[str, ...]) -> tuple[Validator, str]:
    return (lambda v: v in options), "one of " + ", ".join(repr(o) for o in options)


def _str_list(nonempty: bool) -> tuple[Validator, str]:
    def ok(v: Any) -> bool:
        return isinstance(v, list) and all(isinstance(x, str) and x.strip() for x in v) and (bool(v) or not nonempty)
    return ok, ("a non-empty list of module names, e.g. [\"c_attn\", \"c_proj\"]" if nonempty
                else "a list of module names (may be empty)")


SCHEMA: dict[str, dict[str, tuple[Validator, str]]] = {
    "model": {
        "id": ((lambda v: isinstance(v, str) and bool(v.strip())), "a hub id (org/name) or a local directory"),
        "revision": ((lambda v: isinstance(v, str) and bool(v.strip())), "a branch, tag or commit, e.g. \"main\""),
        "tokenizer_class": ((lambda v: isinstance(v, str) and v.isidentifier()),
                            "a transformers tokenizer class name, e.g. \"PreTrainedTokenizerFast\" or \"AutoTokenizer\""),
        "special_tokens": ((lambda v: isinstance(v, dict) and all(isinstance(k, str) and isinstance(x, str)
                                                                  for k, x in v.items())),
                           "a table of token names to strings, e.g. {bos_token = \"</s>\"}"),
        "trust_remote_code": ((lambda v: v is False),
                              "false (kolora-probe never runs a model repository's own code)"),
    },
    "lora": {
        "r": _int_in(1, MAX_R),
        "alpha": ((lambda v: _is_num(v) and 0 < v <= MAX_ALPHA), f"a number > 0, finite, at most {MAX_ALPHA:,.0f}"),
        "dropout": ((lambda v: _is_num(v) and 0 <= v < 1), "a number in [0, 1)"),
        "target_modules": _str_list(nonempty=True),
        "bias": _choice(BIASES),
        "modules_to_save": _str_list(nonempty=False),
        "target_parameters": _str_list(nonempty=False),
        "expected_trainable_params": _int_in(0, MAX_TRAINABLE_PARAMS),
    },
    "training": {
        "dtype": _choice(DTYPES),
        "weights_dtype": _choice(DTYPES),
        "quantization": _choice(QUANTIZATIONS),
        "double_quant": ((lambda v: isinstance(v, bool)), "true or false"),
        "batch_size": _int_in(1, MAX_BATCH_SIZE),
        "seq_len": _int_in(1, MAX_SEQ_LEN),
        "gradient_checkpointing": ((lambda v: isinstance(v, bool)), "true or false"),
        "optimizer": _choice(OPTIMIZERS),
        "use_cache": ((lambda v: isinstance(v, bool)), "true or false"),
        "prepare_kbit": ((lambda v: isinstance(v, bool)), "true or false"),
        "checkpointing_reentrant": ((lambda v: isinstance(v, bool)), "true or false"),
        "trl_casting": ((lambda v: isinstance(v, bool)), "true or false"),
        "adapter_dtype": _choice(ADAPTER_DTYPES),
        "attn_implementation": _choice(ATTN_IMPLEMENTATIONS),
        "fused_cross_entropy": ((lambda v: isinstance(v, bool)), "true or false"),
    },
    "budget": {
        "gpu_memory_gib": ((lambda v: _is_num(v) and 0 < v <= MAX_GPU_MEMORY_GIB),
                           f"a number of GiB > 0, finite, at most {MAX_GPU_MEMORY_GIB:,}"),
        "tolerance_percent": ((lambda v: _is_num(v) and 0 < v <= 100), "a number in (0, 100]"),
    },
    "checks": {
        "max_loss_fraction": ((lambda v: _is_num(v) and 0 < v <= 1), "a number in (0, 1]"),
        "korean_sample": ((lambda v: isinstance(v, str) and bool(v.strip())), "a path to a UTF-8 text file"),
    },
    "distributed": {
        "strategy": _choice(STRATEGIES),
        "world_size": ((lambda v: _is_int(v) and v >= 1), "an integer >= 1 (ranks in all)"),
        "nodes": ((lambda v: _is_int(v) and v >= 1), "an integer >= 1"),
        "reshard_after_forward": ((lambda v: isinstance(v, bool)), "true or false"),
        "cpu_offload": ((lambda v: isinstance(v, bool)), "true or false"),
        "offload_optimizer": ((lambda v: isinstance(v, bool)), "true or false"),
        "offload_params": ((lambda v: isinstance(v, bool)), "true or false"),
        "config": ((lambda v: isinstance(v, str) and bool(v.strip())),
                   "a path to an accelerate config YAML or a DeepSpeed JSON"),
        "rendezvous_timeout_s": ((lambda v: _is_num(v) and v > 0), "a number of seconds > 0"),
    },
}

REQUIRED: dict[str, tuple[str, ...]] = {
    "model": ("id",),
    "lora": ("r", "alpha", "dropout", "target_modules"),
    "training": (),
    "budget": ("gpu_memory_gib",),
    "checks": (),
    "distributed": (),
}

_SPEC_CLASSES = {"model": ModelSpec, "lora": LoraSpec, "training": TrainingSpec, "budget": BudgetSpec,
                 "checks": ChecksSpec, "distributed": DistributedSpec}


def _validate(data: Mapping[str, Any], where: str) -> list[str]:
    errors: list[str] = []
    for table in data:
        if table not in SCHEMA:
            errors.append(f"{where}: unknown table [{table}]; allowed tables: "
                          + ", ".join(f"[{t}]" for t in SCHEMA))
    for table, keys in SCHEMA.items():
        section = data.get(table, {})
        if not isinstance(section, dict):
            errors.append(f"{where}: '{table}' must be a table ([{table}]), got {type(section).__name__}")
            continue
        for key in section:
            if key not in keys:
                errors.append(f"{where}: unknown key {table}.{key}; allowed keys in [{table}]: " + ", ".join(keys))
        for key in REQUIRED[table]:
            if key not in section:
                errors.append(f"{where}: missing required key {table}.{key}; expected {keys[key][1]}")
        for key, value in section.items():
            if key in keys and not keys[key][0](value):
                errors.append(f"{where}: {table}.{key} = {value!r} is invalid; expected {keys[key][1]}")
    return errors or _cross_field(data, where)


def _cross_field(data: Mapping[str, Any], where: str) -> list[str]:
    """Problems between keys that are each valid on their own (a plan no model can run)."""
    errors: list[str] = []
    lora = data.get("lora", {})
    training = data.get("training", {})
    if lora.get("target_parameters") and lora.get("dropout", 0) != 0:
        errors.append(f"{where}: lora.target_parameters needs lora.dropout = 0 (PEFT's ParamWrapper, which adapts "
                      f"weight tensors, has no dropout; lora.dropout = {lora.get('dropout')!r}); set "
                      f"[lora].dropout = 0 (or --lora-dropout 0) or remove target_parameters")
    if training.get("use_cache") and training.get("gradient_checkpointing"):
        errors.append(f"{where}: training.use_cache = true contradicts training.gradient_checkpointing = true (the "
                      f"KV cache is not kept when activations are recomputed; transformers turns it off); set "
                      f"[training].use_cache = false or turn gradient checkpointing off (--no-gradient-checkpointing)")
    dist = data.get("distributed", {})
    ws, nodes = dist.get("world_size", 1), dist.get("nodes", 1)
    if _is_int(ws) and _is_int(nodes) and nodes >= 1 and ws % nodes:
        errors.append(f"{where}: distributed.world_size = {ws} is not a multiple of distributed.nodes = {nodes}; "
                      f"set world_size to nodes × GPUs per node")
    return errors


def _build(data: Mapping[str, Any], source: str, notes: tuple[str, ...] | list[str] = ()) -> Plan:
    parts: dict[str, Any] = {}
    for table, cls in _SPEC_CLASSES.items():
        kwargs = dict(data.get(table, {}))
        for k, v in kwargs.items():
            if isinstance(v, list):
                kwargs[k] = tuple(v)
        if table == "lora" and "alpha" in kwargs:
            kwargs["alpha"] = float(kwargs["alpha"])
        parts[table] = cls(**kwargs)
    return Plan(source=source, notes=tuple(notes), **parts)


def plan_from_dict(data: Mapping[str, Any], source: str = "<dict>") -> Plan:
    """Validate a plan given as nested dicts (as parsed from TOML) and build it."""
    errors = _validate(data, source)
    if errors:
        raise PlanError(errors)
    return _build(data, source)


def load_plan(path: str | Path) -> Plan:
    """Read and validate a plan file: a kolora-probe TOML or a training config that
    :mod:`kolora_probe.plan.formats` recognises by content. Raises PlanError with one line per problem."""
    from kolora_probe.plan.formats import load_plans

    return load_plans([path])


def plan_to_dict_for_override(plan: Plan) -> dict[str, dict[str, Any]]:
    d = plan.to_dict()
    for k in ("source", "origins", "notes"):
        d.pop(k)
    out: dict[str, dict[str, Any]] = {}
    for table, section in d.items():
        out[table] = {k: (list(v) if isinstance(v, tuple) else v) for k, v in section.items() if v is not None}
    return out


def apply_overrides(plan: Plan, overrides: Mapping[str, Any], option_names: Mapping[str, str] | None = None) -> Plan:
    """Return a new plan with ``{"table.key": value}`` overrides applied and validated.

    ``option_names`` maps a dotted key to the command-line option that set it, so errors name the option.
    A value of :data:`UNSET` removes the key (optional keys only). A model other than the plan's drops the plan's
    pinned ``lora.expected_trainable_params`` (it was counted for the plan's model) unless the overrides set it,
    and says so in ``Plan.notes``.
    """
    option_names = option_names or {}
    data = plan_to_dict_for_override(plan)
    errors, notes, origins = merge_overrides(data, overrides, option_names, plan.source)
    source = plan.source + (" + command-line overrides" if overrides else "")
    errors = errors or _cross_field(data, source)
    if errors:
        raise PlanError(errors)
    return dataclasses.replace(_build(data, source, [*plan.notes, *notes]), origins={**plan.origins, **origins})


def merge_overrides(data: dict[str, Any], overrides: Mapping[str, Any], option_names: Mapping[str, str],
                    source: str) -> tuple[list[str], list[str], dict[str, str]]:
    """Apply ``{"table.key": value}`` overrides to a plan's nested ``data`` in place (``None`` = not given,
    :data:`UNSET` = remove an optional key); a model other than ``data``'s drops its pinned
    ``lora.expected_trainable_params`` unless the overrides set it. Returns (errors, notes, origins)."""
    errors: list[str] = []
    notes: list[str] = []
    origins: dict[str, str] = {}
    new_model, old_model = overrides.get("model.id"), data.get("model", {}).get("id")
    pinned = data.get("lora", {}).get("expected_trainable_params")
    if (isinstance(new_model, str) and new_model != old_model and pinned is not None
            and overrides.get("lora.expected_trainable_params") is None):
        data["lora"].pop("expected_trainable_params")   # counted for the file's model, not the one given
        notes.append(f"lora.expected_trainable_params = {pinned:,} from {source} was counted for {old_model}, "
                     f"not {option_names.get('model.id', 'model.id')} {new_model}: not compared "
                     f"(pin one with --expected-trainable N)")
    for dotted, value in overrides.items():
        if value is None:
            continue
        table, _, key = dotted.partition(".")
        name = option_names.get(dotted, dotted)
        if table not in SCHEMA or key not in SCHEMA[table]:
            errors.append(f"{name}: not a plan field")
            continue
        if value is UNSET:
            if key in REQUIRED[table]:
                errors.append(f"{name} none is invalid; {dotted} is required")
            else:
                data.setdefault(table, {}).pop(key, None)
                origins[dotted] = f"command line: {name} none"
            continue
        validator, allowed = SCHEMA[table][key]
        if not validator(value):
            errors.append(f"{name} {value!r} is invalid; expected {allowed}")
            continue
        data.setdefault(table, {})[key] = value
        origins[dotted] = f"command line: {name}"
    return errors, notes, origins


def default_plan() -> Plan:
    return load_plan(DEFAULT_PLAN_PATH)
