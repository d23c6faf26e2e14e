"""The training plan: the single input that describes the planned LoRA/QLoRA run.

A plan is a TOML file with four tables (``[model]``, ``[lora]``, ``[training]``, ``[budget]``) and an
optional ``[checks]`` table. :func:`load_plan` validates it against :data:`SCHEMA` and returns a frozen
:class:`Plan`; every problem becomes one line naming the file, the key and the allowed values, and all
lines are raised together as :class:`PlanError`. :func:`apply_overrides` applies command-line overrides
with the same validation (the "file" is then the option name).
"""
from __future__ import annotations

import dataclasses
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping

DTYPES = ("fp32", "fp16", "bf16")
QUANTIZATIONS = ("none", "8bit", "4bit")
OPTIMIZERS = ("adamw", "adamw_8bit", "sgd")
BIASES = ("none", "all", "lora_only")
STRATEGIES = ("none", "ddp", "fsdp", "zero2", "zero3")

DEFAULT_PLAN_PATH = Path(__file__).resolve().parent.parent / "plans" / "kogpt2-lora.toml"


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
    return isinstance(v, (int, float)) and not isinstance(v, bool)


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
        "r": ((lambda v: _is_int(v) and v >= 1), "an integer >= 1"),
        "alpha": ((lambda v: _is_num(v) and v > 0), "a number > 0"),
        "dropout": ((lambda v: _is_num(v) and 0 <= v < 1), "a number in [0, 1)"),
        "target_modules": _str_list(nonempty=True),
        "bias": _choice(BIASES),
        "modules_to_save": _str_list(nonempty=False),
        "target_parameters": _str_list(nonempty=False),
        "expected_trainable_params": ((lambda v: _is_int(v) and v >= 0), "an integer >= 0"),
    },
    "training": {
        "dtype": _choice(DTYPES),
        "weights_dtype": _choice(DTYPES),
        "quantization": _choice(QUANTIZATIONS),
        "double_quant": ((lambda v: isinstance(v, bool)), "true or false"),
        "batch_size": ((lambda v: _is_int(v) and v >= 1), "an integer >= 1"),
        "seq_len": ((lambda v: _is_int(v) and v >= 1), "an integer >= 1"),
        "gradient_checkpointing": ((lambda v: isinstance(v, bool)), "true or false"),
        "optimizer": _choice(OPTIMIZERS),
        "use_cache": ((lambda v: isinstance(v, bool)), "true or false"),
    },
    "budget": {
        "gpu_memory_gib": ((lambda v: _is_num(v) and v > 0), "a number of GiB > 0"),
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
    """Problems between keys that are each valid on their own."""
    lora = data.get("lora", {})
    if lora.get("target_parameters") and lora.get("dropout", 0) != 0:
        return [f"{where}: lora.target_parameters needs lora.dropout = 0 (PEFT's ParamWrapper, which adapts weight "
                f"tensors, has no dropout; lora.dropout = {lora.get('dropout')!r}); set [lora].dropout = 0 "
                f"(or --lora-dropout 0) or remove target_parameters"]
    dist = data.get("distributed", {})
    ws, nodes = dist.get("world_size", 1), dist.get("nodes", 1)
    if _is_int(ws) and _is_int(nodes) and nodes >= 1 and ws % nodes:
        return [f"{where}: distributed.world_size = {ws} is not a multiple of distributed.nodes = {nodes}; "
                f"set world_size to nodes × GPUs per node"]
    return []


def _build(data: Mapping[str, Any], source: str) -> Plan:
    parts: dict[str, Any] = {}
    for table, cls in _SPEC_CLASSES.items():
        kwargs = dict(data.get(table, {}))
        for k, v in kwargs.items():
            if isinstance(v, list):
                kwargs[k] = tuple(v)
        if table == "lora" and "alpha" in kwargs:
            kwargs["alpha"] = float(kwargs["alpha"])
        parts[table] = cls(**kwargs)
    return Plan(source=source, **parts)


def plan_from_dict(data: Mapping[str, Any], source: str = "<dict>") -> Plan:
    """Validate a plan given as nested dicts (as parsed from TOML) and build it."""
    errors = _validate(data, source)
    if errors:
        raise PlanError(errors)
    return _build(data, source)


def load_plan(path: str | Path) -> Plan:
    """Read and validate a TOML plan file. Raises PlanError with one line per problem."""
    p = Path(path)
    if not p.is_file():
        raise PlanError([f"{p}: plan file not found; pass an existing TOML file with --plan "
                         f"(the default is {DEFAULT_PLAN_PATH})"])
    try:
        data = tomllib.loads(p.read_text(encoding="utf-8"))
    except tomllib.TOMLDecodeError as exc:
        raise PlanError([f"{p}: not valid TOML ({exc}); fix the syntax at that line"]) from None
    except UnicodeDecodeError as exc:
        raise PlanError([f"{p}: not UTF-8 text ({exc.reason}); save the plan as UTF-8 TOML"]) from None
    return plan_from_dict(data, str(p))


def plan_to_dict_for_override(plan: Plan) -> dict[str, dict[str, Any]]:
    d = plan.to_dict()
    d.pop("source")
    out: dict[str, dict[str, Any]] = {}
    for table, section in d.items():
        out[table] = {k: (list(v) if isinstance(v, tuple) else v) for k, v in section.items() if v is not None}
    return out


def apply_overrides(plan: Plan, overrides: Mapping[str, Any], option_names: Mapping[str, str] | None = None) -> Plan:
    """Return a new plan with ``{"table.key": value}`` overrides applied and validated.

    ``option_names`` maps a dotted key to the command-line option that set it, so errors name the option.
    """
    option_names = option_names or {}
    data = plan_to_dict_for_override(plan)
    errors: list[str] = []
    for dotted, value in overrides.items():
        if value is None:
            continue
        table, _, key = dotted.partition(".")
        if table not in SCHEMA or key not in SCHEMA[table]:
            errors.append(f"{option_names.get(dotted, dotted)}: not a plan field")
            continue
        validator, allowed = SCHEMA[table][key]
        if not validator(value):
            errors.append(f"{option_names.get(dotted, dotted)} {value!r} is invalid; expected {allowed}")
            continue
        data[table][key] = value
    source = plan.source + (" + command-line overrides" if overrides else "")
    errors = errors or _cross_field(data, source)
    if errors:
        raise PlanError(errors)
    return _build(data, source)


def default_plan() -> Plan:
    return load_plan(DEFAULT_PLAN_PATH)
