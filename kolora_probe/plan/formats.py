"""The user's own training config as the plan: format detection, one reader per format, and composition.

``--plan`` accepts, detected by content (not only by the file name):

- the kolora-probe TOML plan (tables ``[model]``, ``[lora]``, ``[training]``, ``[budget]``, ``[checks]``);
- a PEFT ``adapter_config.json`` (``peft_type``, ``r``, ``lora_alpha``, ``target_modules`` …);
- an axolotl YAML (``base_model``, ``adapter: lora|qlora``, ``lora_r``, ``micro_batch_size``, ``sequence_len`` …);
- a LLaMA-Factory YAML (``model_name_or_path``, ``finetuning_type``, ``lora_rank``, ``lora_target``, ``cutoff_len`` …);
- a TRL (``SFTConfig`` + ``ModelConfig``, as ``trl sft --config`` reads it) or plain transformers
  ``TrainingArguments`` YAML/JSON (``per_device_train_batch_size``, ``optim``, ``max_length`` …).

Several files combine (``--plan train.yaml --plan adapter_config.json``): a value set in one file fills the key,
two files that set one key to different values are an error, a format's documented default only fills a key no
file sets. Command-line overrides come last. Every value of the effective plan keeps its origin (file key, CLI
option, format default, kolora-probe default) in :attr:`Plan.origins`; a field that changes what the checks see
but has no plan equivalent becomes one line in :attr:`Plan.notes` (never silently dropped). A missing budget
comes from ``--budget-gib`` or, on a GPU machine, the first device's total memory (NVML).
"""
from __future__ import annotations

import dataclasses
import json
import math
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

from kolora_probe.plan.schema import REQUIRED, SCHEMA, Plan, PlanError, merge_overrides, plan_from_dict

KOLORA = "kolora-probe TOML"
PEFT = "PEFT adapter_config.json"
AXOLOTL = "axolotl YAML"
LLAMA_FACTORY = "LLaMA-Factory YAML"
TRL = "TRL SFTConfig/ModelConfig"
TRANSFORMERS = "transformers TrainingArguments"
FORMATS = (KOLORA, PEFT, AXOLOTL, LLAMA_FACTORY, TRL, TRANSFORMERS)

GIB = 2 ** 30


@dataclass
class Reading:
    """What one file says, in plan keys: ``values`` set by the file, ``defaults`` of its format for keys it omits."""
    path: str
    format: str
    values: dict[str, tuple[Any, str]] = field(default_factory=dict)    # "table.key" -> (value, origin)
    defaults: dict[str, tuple[Any, str]] = field(default_factory=dict)
    passthrough: dict[str, Any] = field(default_factory=dict)            # kolora TOML tables validated as is
    notes: list[str] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    names: dict[str, str] = field(default_factory=dict)                  # "table.key" -> this format's key name

    @property
    def name(self) -> str:
        return Path(self.path).name

    def set(self, dotted: str, value: Any, key: str, why: str = "") -> None:
        self.values[dotted] = (value, f"{self.name}: {key}" + (f" ({why})" if why else ""))

    def default(self, dotted: str, value: Any, why: str) -> None:
        self.defaults[dotted] = (value, f"{self.format} default: {why}")

    def note(self, key: str, text: str) -> None:
        self.notes.append(f"{self.name}: {key}: {text}")


# --- detection ------------------------------------------------------------------------------------

_AXOLOTL_KEYS = {"base_model", "adapter", "micro_batch_size", "sequence_len", "lora_target_linear",
                 "lora_target_modules", "load_in_4bit", "base_model_config", "sample_packing"}
_LLAMA_FACTORY_KEYS = {"finetuning_type", "lora_rank", "lora_target", "cutoff_len", "stage", "template",
                       "quantization_bit", "additional_target"}
_TRL_KEYS = {"max_length", "max_seq_length", "packing", "dataset_text_field", "use_peft", "lora_r",
             "lora_target_modules", "model_name_or_path", "completion_only_loss", "assistant_only_loss",
             "dataset_name", "load_in_4bit", "load_in_8bit", "use_bnb_nested_quant"}
_TRAINING_ARGS_KEYS = {"per_device_train_batch_size", "output_dir", "optim", "gradient_checkpointing",
                       "num_train_epochs", "learning_rate", "gradient_accumulation_steps", "bf16", "fp16"}
ACCEPTED = ("a kolora-probe TOML plan, a PEFT adapter_config.json, an axolotl YAML, a LLaMA-Factory YAML, "
            "or a TRL/transformers training-arguments YAML/JSON")


def classify(data: Mapping[str, Any]) -> str | None:
    """The format of a parsed config, from its keys; None when it is none of the accepted ones."""
    keys = set(data)
    if keys and keys <= set(SCHEMA) and any(isinstance(v, dict) for v in data.values()):
        return KOLORA
    if "peft_type" in keys or {"r", "lora_alpha", "target_modules"} <= keys:
        return PEFT
    if "base_model" in keys or keys & {"micro_batch_size", "sequence_len", "lora_target_linear", "adapter"}:
        return AXOLOTL
    if keys & {"finetuning_type", "lora_rank", "lora_target", "cutoff_len", "quantization_bit"}:
        return LLAMA_FACTORY
    if keys & _TRL_KEYS:
        return TRL
    if keys & _TRAINING_ARGS_KEYS:
        return TRANSFORMERS
    if keys & set(SCHEMA):
        return KOLORA
    return None


def parse_file(path: str | Path) -> tuple[str, dict[str, Any]]:
    """(format, parsed mapping) of a plan file. Raises PlanError with one line naming the file and the fix."""
    p = Path(path)
    try:
        exists = p.is_file()
        text = p.read_text(encoding="utf-8") if exists else ""
    except OSError as exc:  # permissions, a device file, a name too long
        shown = str(p) if len(str(p)) <= 120 else f"{str(p)[:60]}…{str(p)[-40:]} ({len(str(p)):,} characters)"
        raise PlanError([f"{shown}: cannot read the plan file ({exc.strerror or exc}); pass a readable plan file "
                         f"with --plan"]) from None
    except UnicodeDecodeError as exc:
        raise PlanError([f"{p}: not UTF-8 text ({exc.reason}); save the plan as UTF-8"]) from None
    if not exists:
        raise PlanError([f"{p}: plan file not found; pass an existing plan file with --plan ({ACCEPTED})"])
    suffix = p.suffix.lower()
    toml_error: Exception | None = None
    try:
        data: Any = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        toml_error, data = exc, None
    if suffix == ".toml" and toml_error is not None:
        raise PlanError([f"{p}: not valid TOML ({toml_error}); fix the syntax at that line"])
    if data is None or (suffix not in (".toml",) and classify(data) != KOLORA):
        try:
            if text.lstrip().startswith("{") or suffix == ".json":
                data = json.loads(text)
            else:
                import yaml

                data = yaml.safe_load(text)
        except (json.JSONDecodeError, ValueError) as exc:
            raise PlanError([f"{p}: not valid JSON ({exc}); fix the syntax at that line"]) from None
        except Exception as exc:  # noqa: BLE001  (yaml.YAMLError and its subclasses)
            if suffix in (".yml", ".yaml") or toml_error is None:
                raise PlanError([f"{p}: not valid YAML ({' '.join(str(exc).split())}); fix the syntax there"]) from None
            raise PlanError([f"{p}: neither valid TOML ({toml_error}) nor YAML/JSON; --plan takes {ACCEPTED}"]) from None
    if not isinstance(data, dict):
        raise PlanError([f"{p}: holds a {type(data).__name__}, not a mapping of settings; --plan takes {ACCEPTED}"])
    fmt = KOLORA if suffix == ".toml" else classify(data)
    if fmt is None:
        raise PlanError([f"{p}: not a recognised plan (keys: {', '.join(sorted(map(str, data))[:8])}); "
                         f"--plan takes {ACCEPTED}"])
    return fmt, data


# --- shared mappings ------------------------------------------------------------------------------

_ADAMW = {"adamw", "adam", "adamw_torch", "adamw_torch_fused", "adamw_hf", "adamw_apex_fused", "adamw_torch_xla",
          "adamw_torch_npu_fused", "adamw_anyprecision", "optimi_adamw", "paged_adamw_32bit", "paged_adamw"}
_ADAMW_8BIT = {"adamw_bnb_8bit", "adamw_8bit", "paged_adamw_8bit", "adamw_torch_8bit", "ao_adamw_8bit",
               "bnb_adamw_8bit"}


def map_optimizer(r: Reading, key: str, name: Any) -> None:
    """transformers ``OptimizerNames`` (also axolotl's and LLaMA-Factory's ``optim``) → [training].optimizer."""
    n = str(name).lower()
    why = "paged: its state lives in CUDA unified memory; counted like the unpaged one" if "paged" in n else ""
    if n in _ADAMW:
        r.set("training.optimizer", "adamw", f"{key}: {name}", why)
    elif n in _ADAMW_8BIT:
        r.set("training.optimizer", "adamw_8bit", f"{key}: {name}", why)
    elif n == "sgd":
        r.set("training.optimizer", "sgd", f"{key}: {name}")
    else:
        r.note(key, f"optimizer {name!r} is not modelled: the memory estimate assumes adamw (two fp32 states per "
                    f"trainable parameter); pass --optimizer adamw|adamw_8bit|sgd to choose the closest")


_DTYPE_NAMES = {"bfloat16": "bf16", "bf16": "bf16", "float16": "fp16", "fp16": "fp16", "half": "fp16",
                "float32": "fp32", "fp32": "fp32", "float": "fp32"}


def _targets(value: Any) -> list[str] | None:
    if isinstance(value, str):
        parts = [v.strip() for v in value.split(",") if v.strip()]
        return parts
    if isinstance(value, (list, tuple)):
        return [str(v) for v in value]
    return None


def _lora_extra_lists(r, d: dict) -> None:
    """``lora_modules_to_save`` and ``lora_target_parameters`` (axolotl and TRL spell them alike)."""
    for key, dotted in (("lora_modules_to_save", "lora.modules_to_save"),
                        ("lora_target_parameters", "lora.target_parameters")):
        if d.get(key):
            r.set(dotted, _targets(d[key]), key)


def _set_quant_4bit(r: Reading, quant_type_key: str, quant_type: Any) -> None:
    if quant_type is not None and str(quant_type).lower() != "nf4":
        r.note(quant_type_key, f"4-bit type {quant_type!r} is not modelled (the checks use NF4; the memory is the same)")


_ATTENTION_NOTE = ("attention kernel not modelled: the estimate traces transformers' default attention; "
                   "flash/memory-efficient kernels need less activation memory, so the prediction is an upper bound")


def _note_if(r: Reading, data: Mapping[str, Any], keys: Sequence[str], text: str) -> None:
    for k in keys:
        v = data.get(k)
        if v not in (None, False, "", [], {}, "eager"):
            r.note(k, f"{v!r}: {text}")


# --- readers --------------------------------------------------------------------------------------

def read_kolora(path: str, data: Mapping[str, Any]) -> Reading:
    r = Reading(path, KOLORA)
    for table, section in data.items():
        if table in SCHEMA and isinstance(section, dict):
            for key, value in section.items():
                r.values[f"{table}.{key}"] = (value, f"{r.name}: [{table}].{key}")
        else:
            r.passthrough[table] = section
    return r


def read_peft(path: str, d: Mapping[str, Any]) -> Reading:
    r = Reading(path, PEFT, names={"model.id": "base_model_name_or_path", "lora.r": "r",
                                   "lora.alpha": "lora_alpha", "lora.dropout": "lora_dropout",
                                   "lora.target_modules": "target_modules"})
    ptype = d.get("peft_type", "LORA")
    if str(ptype).upper() != "LORA":
        r.errors.append(f"{path}: peft_type = {ptype!r}; kolora-probe checks LoRA adapters (peft_type \"LORA\")")
        return r
    if d.get("base_model_name_or_path"):
        r.set("model.id", d["base_model_name_or_path"], "base_model_name_or_path")
    if d.get("revision"):
        r.set("model.revision", d["revision"], "revision")
    # PEFT LoraConfig defaults: r=8, lora_alpha=8, lora_dropout=0.0, bias="none"
    for dotted, key, default in (("lora.r", "r", 8), ("lora.alpha", "lora_alpha", 8),
                                 ("lora.dropout", "lora_dropout", 0.0), ("lora.bias", "bias", "none")):
        if d.get(key) is not None:
            r.set(dotted, d[key], key)
        else:
            r.default(dotted, default, f"{key} = {default!r}")
    tm = d.get("target_modules")
    if isinstance(tm, str) and tm.lower() != "all-linear":
        r.errors.append(f"{path}: target_modules = {tm!r} is a regular expression, which kolora-probe does not "
                        f"match; list the module names (e.g. [\"q_proj\", \"v_proj\"]) or pass --targets")
    elif isinstance(tm, str):
        r.set("lora.target_modules", [tm], "target_modules")
    elif tm is not None:
        r.set("lora.target_modules", list(tm), "target_modules")
    r.set("lora.modules_to_save", list(d.get("modules_to_save") or []), "modules_to_save")
    if d.get("target_parameters"):
        r.set("lora.target_parameters", list(d["target_parameters"]), "target_parameters")
    _note_if(r, d, ("use_dora",), "DoRA adds a magnitude vector per adapted layer: the counts and memory are LoRA's")
    _note_if(r, d, ("layers_to_transform", "layers_pattern"),
             "LoRA on some layers only is not modelled: the counts cover every matching layer")
    _note_if(r, d, ("rank_pattern", "alpha_pattern"), "per-layer ranks are not modelled: every layer uses r")
    _note_if(r, d, ("exclude_modules",), "excluded modules are not modelled: the counts include them")
    _note_if(r, d, ("trainable_token_indices",), "trainable token rows are not counted")
    _note_if(r, d, ("lora_bias",), "a bias on lora_B is not counted")
    return r


def _yaml(v: Any) -> str:
    return str(v).lower() if isinstance(v, bool) else str(v)


def _half_dtypes(r: Reading, d: Mapping[str, Any], bf16_key: str = "bf16", fp16_key: str = "fp16") -> str:
    bf16, fp16 = d.get(bf16_key), d.get(fp16_key)
    if bf16 in (True, "auto", "true", "True"):
        why = "auto: bf16 where the GPU supports it; `pytest -m gpu` checks that" if bf16 == "auto" else ""
        r.set("training.dtype", "bf16", f"{bf16_key}: {_yaml(bf16)}", why)
        return "bf16"
    if fp16 in (True, "true", "True"):
        r.set("training.dtype", "fp16", f"{fp16_key}: {_yaml(fp16)}")
        return "fp16"
    if bf16 is not None or fp16 is not None:
        r.set("training.dtype", "fp32", f"{bf16_key}/{fp16_key}: false")
    return "fp32"


def read_axolotl(path: str, d: Mapping[str, Any]) -> Reading:
    """axolotl config reference (docs/config-reference): defaults micro_batch_size 1, sequence_len 512,
    lora_dropout 0.0, gradient_checkpointing false, bnb 4-bit double quant on, optimizer adamw_torch(_fused)."""
    r = Reading(path, AXOLOTL, names={"model.id": "base_model", "lora.r": "lora_r", "lora.alpha": "lora_alpha",
                                      "lora.target_modules": "lora_target_modules or lora_target_linear"})
    adapter = d.get("adapter")
    if adapter not in ("lora", "qlora"):
        r.errors.append(f"{path}: adapter: {adapter!r} — " + ("an empty adapter means full fine-tuning; "
                        if not adapter else "") + "kolora-probe checks LoRA/QLoRA plans: set adapter: lora or qlora")
    if d.get("base_model"):
        r.set("model.id", d["base_model"], "base_model")
    if d.get("revision_of_model"):
        r.set("model.revision", d["revision_of_model"], "revision_of_model")
    if d.get("tokenizer_type"):
        r.set("model.tokenizer_class", d["tokenizer_type"], "tokenizer_type")
    if isinstance(d.get("special_tokens"), dict) and d["special_tokens"]:
        r.set("model.special_tokens", {str(k): v for k, v in d["special_tokens"].items()}, "special_tokens")
    if d.get("trust_remote_code") is not None:
        r.set("model.trust_remote_code", d["trust_remote_code"], "trust_remote_code")
    _note_if(r, d, ("tokenizer_config",), "the checks load the tokenizer of base_model, not this one")
    for dotted, key in (("lora.r", "lora_r"), ("lora.alpha", "lora_alpha")):
        if d.get(key) is not None:
            r.set(dotted, d[key], key)
    if d.get("lora_dropout") is not None:
        r.set("lora.dropout", d["lora_dropout"], "lora_dropout")
    else:
        r.default("lora.dropout", 0.0, "lora_dropout = 0.0")
    mods = _targets(d.get("lora_target_modules"))
    if d.get("lora_target_linear"):
        r.set("lora.target_modules", ["all-linear"], "lora_target_linear: true")
        if mods:
            r.note("lora_target_modules", f"{mods} together with lora_target_linear: counted as all-linear; a listed "
                                          f"module that is not a Linear layer is not counted")
    elif mods:
        r.set("lora.target_modules", mods, "lora_target_modules")
    _lora_extra_lists(r, d)
    # quantization
    if d.get("load_in_4bit") or adapter == "qlora":
        r.set("training.quantization", "4bit", "load_in_4bit: true" if d.get("load_in_4bit") else "adapter: qlora")
        bnb = d.get("bnb_config_kwargs") or {}
        if isinstance(bnb, dict) and bnb.get("bnb_4bit_use_double_quant") is not None:
            r.set("training.double_quant", bool(bnb["bnb_4bit_use_double_quant"]),
                  "bnb_config_kwargs.bnb_4bit_use_double_quant")
        else:
            r.default("training.double_quant", True, "bnb_4bit_use_double_quant = true")
        _set_quant_4bit(r, "bnb_config_kwargs.bnb_4bit_quant_type", isinstance(bnb, dict) and bnb.get("bnb_4bit_quant_type") or None)
    elif d.get("load_in_8bit"):
        r.set("training.quantization", "8bit", "load_in_8bit: true")
    else:
        r.default("training.quantization", "none", "no load_in_4bit / load_in_8bit")
    # batch, length, checkpointing
    for dotted, key, default in (("training.batch_size", "micro_batch_size", 1),
                                 ("training.seq_len", "sequence_len", 512)):
        if d.get(key) is not None:
            r.set(dotted, d[key], key)
        else:
            r.default(dotted, default, f"{key} = {default}")
    gc = d.get("gradient_checkpointing")
    if gc is not None:
        r.set("training.gradient_checkpointing", bool(gc), "gradient_checkpointing")
        if isinstance(gc, str):
            r.note("gradient_checkpointing", f"{gc!r}: offloaded checkpoints are not modelled (counted on the GPU)")
    else:
        r.default("training.gradient_checkpointing", False, "gradient_checkpointing = false")
    # dtypes: axolotl loads the model in bf16 when bf16 (or bfloat16), fp16 when fp16/float16/load_in_8bit
    compute = _half_dtypes(r, d)
    if compute == "fp32" and d.get("bfloat16"):
        r.set("training.dtype", "bf16", "bfloat16: true")
        compute = "bf16"
    if compute == "fp32" and d.get("float16"):
        r.set("training.dtype", "fp16", "float16: true")
        compute = "fp16"
    weights = compute if compute != "fp32" else ("fp16" if d.get("load_in_8bit") else "fp32")
    r.set("training.weights_dtype", weights, "bf16/fp16", "axolotl loads the model in its training dtype")
    if d.get("optimizer") is not None:
        map_optimizer(r, "optimizer", d["optimizer"])
    else:
        r.default("training.optimizer", "adamw", "optimizer = adamw_torch_fused")
    _note_if(r, d, ("flash_attention", "sdp_attention", "xformers_attention", "flex_attention", "s2_attention"),
             _ATTENTION_NOTE)
    _note_if(r, d, ("deepspeed", "fsdp", "fsdp_config"),
             "sharding/offload is not modelled: the estimate is one GPU holding the whole model")
    _note_if(r, d, ("peft_use_dora",), "DoRA adds a magnitude vector per adapted layer: the counts and memory are LoRA's")
    _note_if(r, d, ("peft_layers_to_transform",), "LoRA on some layers only is not modelled")
    _note_if(r, d, ("unfrozen_parameters",), "extra trainable parameters are not counted")
    _note_if(r, d, ("activation_offloading", "torch_compile", "liger_fused_linear_cross_entropy", "cut_cross_entropy"),
             "not modelled: it changes activation memory; the prediction assumes eager PyTorch")
    return r


def read_llama_factory(path: str, d: Mapping[str, Any]) -> Reading:
    """LLaMA-Factory hparams (finetuning_args.py, model_args.py, data_args.py): lora_rank 8, lora_alpha = 2·rank,
    lora_dropout 0.0, lora_target "all", double_quantization true, cutoff_len 2048, gradient checkpointing on
    unless disable_gradient_checkpointing; per_device_train_batch_size 8 (TrainingArguments)."""
    r = Reading(path, LLAMA_FACTORY, names={"model.id": "model_name_or_path"})
    ft = d.get("finetuning_type", "lora")
    if ft != "lora":
        r.errors.append(f"{path}: finetuning_type: {ft!r}; kolora-probe checks LoRA/QLoRA plans: set finetuning_type: lora")
    if d.get("model_name_or_path"):
        r.set("model.id", d["model_name_or_path"], "model_name_or_path")
    if d.get("model_revision"):
        r.set("model.revision", d["model_revision"], "model_revision")
    if d.get("trust_remote_code") is not None:
        r.set("model.trust_remote_code", d["trust_remote_code"], "trust_remote_code")
    rank = d.get("lora_rank")
    if rank is not None:
        r.set("lora.r", rank, "lora_rank")
    else:
        r.default("lora.r", 8, "lora_rank = 8")
    if d.get("lora_alpha") is not None:
        r.set("lora.alpha", d["lora_alpha"], "lora_alpha")
    elif isinstance(rank if rank is not None else 8, int):
        r.default("lora.alpha", 2 * (rank if rank is not None else 8), "lora_alpha = 2 × lora_rank")
    if d.get("lora_dropout") is not None:
        r.set("lora.dropout", d["lora_dropout"], "lora_dropout")
    else:
        r.default("lora.dropout", 0.0, "lora_dropout = 0.0")
    target = d.get("lora_target", "all")
    mods = _targets(target)
    if mods == ["all"]:
        (r.set if "lora_target" in d else r.default)("lora.target_modules", ["all-linear"],
                                                     *(("lora_target: all",) if "lora_target" in d else ("lora_target = all",)))
    elif mods:
        r.set("lora.target_modules", mods, "lora_target")
    if d.get("additional_target"):
        r.set("lora.modules_to_save", _targets(d["additional_target"]), "additional_target")
    qbit = d.get("quantization_bit")
    if qbit in (4, 8, "4", "8"):
        r.set("training.quantization", f"{int(qbit)}bit", "quantization_bit")
        if int(qbit) == 4:
            if d.get("double_quantization") is not None:
                r.set("training.double_quant", bool(d["double_quantization"]), "double_quantization")
            else:
                r.default("training.double_quant", True, "double_quantization = true")
            _set_quant_4bit(r, "quantization_type", d.get("quantization_type"))
        method = d.get("quantization_method", "bnb")
        if str(method).lower() not in ("bnb", "bitsandbytes"):
            r.note("quantization_method", f"{method!r} is not modelled: the checks and the estimate use bitsandbytes")
    elif qbit is not None:
        r.note("quantization_bit", f"{qbit!r}: only 4 and 8 bit (bitsandbytes) are modelled; planned without quantization")
    else:
        r.default("training.quantization", "none", "no quantization_bit")
    if d.get("per_device_train_batch_size") is not None:
        r.set("training.batch_size", d["per_device_train_batch_size"], "per_device_train_batch_size")
    else:
        r.default("training.batch_size", 8, "per_device_train_batch_size = 8")
    if d.get("cutoff_len") is not None:
        r.set("training.seq_len", d["cutoff_len"], "cutoff_len")
    else:
        r.default("training.seq_len", 2048, "cutoff_len = 2048")
    if d.get("disable_gradient_checkpointing") is not None:
        r.set("training.gradient_checkpointing", not d["disable_gradient_checkpointing"],
              "disable_gradient_checkpointing")
    else:
        r.default("training.gradient_checkpointing", True, "disable_gradient_checkpointing = false")
    if d.get("pure_bf16"):
        r.set("training.dtype", "bf16", "pure_bf16: true")
        compute = "bf16"
    else:
        compute = _half_dtypes(r, d)
    r.set("training.weights_dtype", compute, "bf16/fp16", "LLaMA-Factory loads the model in its compute dtype")
    if d.get("optim") is not None:
        map_optimizer(r, "optim", d["optim"])
    else:
        r.default("training.optimizer", "adamw", "optim = adamw_torch")
    stage = d.get("stage", "sft")
    if stage not in ("sft", "pt"):
        r.note("stage", f"{stage!r}: reward/preference stages run extra forward passes, not modelled (one SFT step)")
    if d.get("flash_attn") not in (None, "auto", "disabled", "sdpa"):
        r.note("flash_attn", f"{d['flash_attn']!r}: {_ATTENTION_NOTE}")
    _note_if(r, d, ("deepspeed", "fsdp", "fsdp_config"),
             "sharding/offload is not modelled: the estimate is one GPU holding the whole model")
    _note_if(r, d, ("use_dora",), "DoRA adds a magnitude vector per adapted layer: the counts and memory are LoRA's")
    _note_if(r, d, ("use_galore", "use_badam", "use_apollo", "use_adam_mini", "use_muon"),
             "optimizer not modelled: the estimate assumes the optimizer in [training].optimizer")
    _note_if(r, d, ("use_unsloth", "use_unsloth_gc", "enable_liger_kernel", "use_liger_kernel", "shift_attn"),
             "not modelled: it changes activation memory; the prediction assumes eager PyTorch")
    return r


def read_training_args(path: str, d: Mapping[str, Any], fmt: str) -> Reading:
    """TRL ``SFTConfig`` (gradient_checkpointing true, bf16 unless fp16, max_length 1024) with ``ModelConfig``
    (use_peft, lora_r 16, lora_alpha 32, lora_dropout 0.05, load_in_4bit/8bit, use_bnb_nested_quant false,
    dtype float32), or plain transformers ``TrainingArguments`` (batch 8, no checkpointing, fp32)."""
    trl = fmt == TRL
    r = Reading(path, fmt, names={"model.id": "model_name_or_path", "lora.target_modules": "lora_target_modules"})
    if d.get("model_name_or_path"):
        r.set("model.id", d["model_name_or_path"], "model_name_or_path")
    if d.get("model_revision"):
        r.set("model.revision", d["model_revision"], "model_revision")
    if d.get("trust_remote_code") is not None:
        r.set("model.trust_remote_code", d["trust_remote_code"], "trust_remote_code")
    lora_keys = [k for k in ("lora_r", "lora_alpha", "lora_dropout", "lora_target_modules") if k in d]
    if d.get("use_peft"):
        for dotted, key, default in (("lora.r", "lora_r", 16), ("lora.alpha", "lora_alpha", 32),
                                     ("lora.dropout", "lora_dropout", 0.05)):
            if d.get(key) is not None:
                r.set(dotted, d[key], key)
            else:
                r.default(dotted, default, f"{key} = {default}")
        mods = _targets(d.get("lora_target_modules"))
        if mods:
            r.set("lora.target_modules", mods, "lora_target_modules")
        _lora_extra_lists(r, d)
        _note_if(r, d, ("use_dora",), "DoRA adds a magnitude vector per adapted layer: the counts and memory are LoRA's")
    elif lora_keys:
        r.note(", ".join(lora_keys), "ignored: use_peft is not true, so TRL's CLI trains the full model; set "
                                     "use_peft: true, or give the adapter with --plan adapter_config.json")
    if d.get("load_in_4bit"):
        r.set("training.quantization", "4bit", "load_in_4bit: true")
        if d.get("use_bnb_nested_quant") is not None:
            r.set("training.double_quant", bool(d["use_bnb_nested_quant"]), "use_bnb_nested_quant")
        else:
            r.default("training.double_quant", False, "use_bnb_nested_quant = false")
        _set_quant_4bit(r, "bnb_4bit_quant_type", d.get("bnb_4bit_quant_type"))
    elif d.get("load_in_8bit"):
        r.set("training.quantization", "8bit", "load_in_8bit: true")
    if d.get("per_device_train_batch_size") is not None:
        r.set("training.batch_size", d["per_device_train_batch_size"], "per_device_train_batch_size")
    else:
        r.default("training.batch_size", 8, "per_device_train_batch_size = 8")
    if d.get("gradient_checkpointing") is not None:
        r.set("training.gradient_checkpointing", bool(d["gradient_checkpointing"]), "gradient_checkpointing")
    else:
        r.default("training.gradient_checkpointing", trl, f"gradient_checkpointing = {str(trl).lower()}")
    seq_key = "max_length" if "max_length" in d else "max_seq_length" if "max_seq_length" in d else None
    if seq_key and d[seq_key] is not None:
        r.set("training.seq_len", d[seq_key], seq_key)
    elif seq_key:
        r.note(seq_key, "null (no truncation): the sequence length is the data's; pass --seq-len")
    elif trl:
        r.default("training.seq_len", 1024, "max_length = 1024")
    else:
        r.note("max_length", "a TrainingArguments file has no sequence length: [training].seq_len keeps kolora-probe's "
                             "default; pass --seq-len")
    if trl and d.get("bf16") is None and not d.get("fp16"):
        r.default("training.dtype", "bf16", "bf16 = not fp16")
    else:
        _half_dtypes(r, d)
    dtype_key = "dtype" if "dtype" in d else "torch_dtype" if "torch_dtype" in d else None
    if dtype_key and str(d[dtype_key]).lower() in _DTYPE_NAMES:
        r.set("training.weights_dtype", _DTYPE_NAMES[str(d[dtype_key]).lower()], dtype_key)
    elif dtype_key:
        r.note(dtype_key, f"{d[dtype_key]!r}: the checkpoint's own dtype is not known from this file; pass "
                          f"--weights-dtype")
    elif trl:
        r.default("training.weights_dtype", "fp32", "dtype = float32")
    if d.get("optim") is not None:
        map_optimizer(r, "optim", d["optim"])
    else:
        r.default("training.optimizer", "adamw", "optim = adamw_torch")
    if d.get("attn_implementation") not in (None, "eager", "sdpa"):
        r.note("attn_implementation", f"{d['attn_implementation']!r}: {_ATTENTION_NOTE}")
    _note_if(r, d, ("use_flash_attention_2",), _ATTENTION_NOTE)
    _note_if(r, d, ("deepspeed", "fsdp", "fsdp_config"),
             "sharding/offload is not modelled: the estimate is one GPU holding the whole model")
    _note_if(r, d, ("padding_free", "activation_offloading", "use_liger_kernel", "torch_compile"),
             "not modelled: it changes activation memory; the prediction assumes eager PyTorch")
    _note_if(r, d, ("model_init_kwargs",), "not read: give its dtype/quantization as dtype / load_in_4bit keys")
    return r


def read_file(path: str | Path) -> Reading:
    fmt, data = parse_file(path)
    p = str(path)
    if fmt == KOLORA:
        return read_kolora(p, data)
    if fmt == PEFT:
        return read_peft(p, data)
    if fmt == AXOLOTL:
        return read_axolotl(p, data)
    if fmt == LLAMA_FACTORY:
        return read_llama_factory(p, data)
    return read_training_args(p, data, fmt)


# --- composition ----------------------------------------------------------------------------------

def device_budget() -> tuple[float | None, str]:
    """(GiB, origin) of the first GPU's total memory by NVML, or (None, why not)."""
    from kolora_probe.env.nvml import read_nvml

    facts = read_nvml()
    if not facts.available or not facts.devices:
        return None, facts.error or "no GPU"
    dev = facts.devices[0]
    return round(dev.memory_total_bytes / GIB, 3), f"device: GPU 0 {dev.name} total memory (NVML)"


def _default_origins() -> dict[str, str]:
    from kolora_probe.plan.schema import _SPEC_CLASSES

    out: dict[str, str] = {}
    for table, cls in _SPEC_CLASSES.items():
        for f in dataclasses.fields(cls):
            out[f"{table}.{f.name}"] = "kolora-probe default"
    return out


def _flag(dotted: str) -> str | None:
    from kolora_probe.plan.options import PLAN_OPTIONS

    return next((o.flag for o in PLAN_OPTIONS if o.key == dotted), None)


def compose(readings: Sequence[Reading], overrides: Mapping[str, Any] | None = None,
            option_names: Mapping[str, str] | None = None, budget_required: bool = True,
            budget_from_device: Callable[[], tuple[float | None, str]] | None = None) -> Plan:
    """One validated Plan from the readings (in order) and the overrides; origins and notes attached."""
    overrides = {k: v for k, v in (overrides or {}).items() if v is not None}
    option_names = option_names or {}
    source = " + ".join(r.path for r in readings)
    errors = [e for r in readings for e in r.errors]
    notes = [n for r in readings for n in r.notes]
    foreign = any(r.format != KOLORA for r in readings)
    chosen: dict[str, tuple[Any, str, Reading]] = {}
    for r in readings:
        for dotted, (value, origin) in r.values.items():
            if dotted in chosen and chosen[dotted][0] != value and dotted not in overrides:
                flag = _flag(dotted)
                errors.append(f"{chosen[dotted][1]} = {chosen[dotted][0]!r} but {origin} = {value!r}; make the files "
                              f"agree" + (f" or choose with {flag}" if flag else ""))
            chosen.setdefault(dotted, (value, origin, r))
    for r in readings:
        for dotted, (value, origin) in r.defaults.items():
            chosen.setdefault(dotted, (value, origin, r))
    # a format's value is checked where it came from, naming its own key
    for dotted, (value, origin, r) in chosen.items():
        table, _, key = dotted.partition(".")
        if r.format != KOLORA and not SCHEMA[table][key][0](value):
            errors.append(f"{origin} = {value!r} is invalid for kolora-probe's [{table}].{key}; expected "
                          f"{SCHEMA[table][key][1]}")
    origins = _default_origins()
    data: dict[str, Any] = {t: {} for t in SCHEMA}
    for r in readings:
        data.update(r.passthrough)
    for dotted, (value, origin, _) in chosen.items():
        table, _, key = dotted.partition(".")
        data[table][key] = value
        origins[dotted] = origin
    override_errors, override_notes, override_origins = merge_overrides(data, overrides, option_names, source)
    errors += override_errors
    notes += override_notes
    origins.update(override_origins)
    unset_budget = False
    if "gpu_memory_gib" not in data["budget"]:
        gib, why = (budget_from_device or device_budget)()
        if gib is not None:
            data["budget"]["gpu_memory_gib"] = gib
            origins["budget.gpu_memory_gib"] = why
        elif budget_required:
            errors.append(f"{source}: no GPU memory budget: set [budget].gpu_memory_gib or pass --budget-gib N "
                          f"(no GPU to take it from: {why})")
        else:  # validated with a stand-in, set to inf (no budget) once the plan is built
            data["budget"]["gpu_memory_gib"] = 1.0
            unset_budget = True
            origins["budget.gpu_memory_gib"] = f"not set: pass --budget-gib N (no GPU to take it from: {why})"
    if foreign and not any(r.errors for r in readings):   # a file the reader refused: that line says enough
        for table, keys in REQUIRED.items():
            for key in keys:
                if key not in data[table] and not any(e for e in errors if f"[{table}].{key}" in e):
                    theirs = "; ".join(f"{r.format}: {r.names[f'{table}.{key}']}" for r in readings
                                       if f"{table}.{key}" in r.names)
                    flag = _flag(f"{table}.{key}")
                    errors.append(f"{source}: no value for [{table}].{key}" + (f" ({theirs})" if theirs else "")
                                  + (f"; set it in the file or pass {flag}" if flag else ""))
    if errors:
        raise PlanError(errors)
    plan = plan_from_dict({t: s for t, s in data.items() if s or t in REQUIRED and REQUIRED[t]}, source)
    if unset_budget:
        plan = dataclasses.replace(plan, budget=dataclasses.replace(plan.budget, gpu_memory_gib=math.inf))
    return dataclasses.replace(plan, source=source + (" + command-line overrides" if overrides else ""),
                               origins=origins, notes=tuple(notes))


def load_plans(paths: Sequence[str | Path], overrides: Mapping[str, Any] | None = None,
               option_names: Mapping[str, str] | None = None, budget_required: bool = True) -> Plan:
    """Read every file (all unreadable ones reported together), then :func:`compose`."""
    readings: list[Reading] = []
    errors: list[str] = []
    for p in paths:
        try:
            readings.append(read_file(p))
        except PlanError as exc:
            errors += exc.lines
    if errors:
        raise PlanError(errors)
    return compose(readings, overrides, option_names, budget_required)


# --- plan show ------------------------------------------------------------------------------------

def _toml_value(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, float):
        return "inf" if math.isinf(v) else repr(v)
    if isinstance(v, int):
        return str(v)
    if isinstance(v, str):
        return json.dumps(v, ensure_ascii=False)
    if isinstance(v, (list, tuple)):
        return "[" + ", ".join(_toml_value(x) for x in v) + "]"
    if isinstance(v, Mapping):
        return "{ " + ", ".join(f"{k} = {_toml_value(x)}" for k, x in v.items()) + " }" if v else "{}"
    raise TypeError(f"no TOML form for {type(v).__name__}")


def plan_toml(plan: Plan) -> str:
    """The effective plan as a kolora-probe TOML plan, each value commented with its origin."""
    lines = [f"# effective plan from {plan.source}"]
    lines += [f"# NOTE {n}" for n in plan.notes]
    d = plan.to_dict()
    for table in SCHEMA:
        lines += ["", f"[{table}]"]
        for key, value in d[table].items():
            origin = plan.origins.get(f"{table}.{key}", "")
            if value is None:
                lines.append(f"# {key}: not set" + (f"  ({origin})" if origin else ""))
            else:
                lines.append(f"{key} = {_toml_value(value)}" + (f"  # {origin}" if origin else ""))
    return "\n".join(lines) + "\n"
