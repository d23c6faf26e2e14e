"""Build a causal LM on the meta device from its config: structure and parameter shapes, no weights, no memory.

Uses ``torch.device("meta")`` (every tensor created during construction, e.g. a ``Conv1D``'s ``torch.empty``,
is a meta tensor: nothing sized by the config is ever allocated, as in transformers' own ``from_pretrained``) and
accelerate's ``init_empty_weights``; transformers' ``no_init_weights`` skips the random initialisation a meta
tensor has no use for (it made a 10,000-layer config take minutes). Some construction paths lose weight tying on the meta device
(e.g. GPT-2's ``lm_head`` ↔ ``transformer.wte``), which would over-count parameters by the head's size;
:func:`build_meta_model` re-applies the config's tying so shared parameters exist once.
"""
from __future__ import annotations

import torch

from kolora_probe.model.structure import param_numel   # counts bitsandbytes' packed 4-bit values unpacked

_DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def torch_dtype(name: str) -> torch.dtype:
    """Map a plan dtype name (fp32/fp16/bf16) to a torch dtype."""
    return _DTYPES[name]


def autocast_for(device, dtype: str):
    """``torch.autocast`` on ``device``'s type for the plan's compute dtype (a no-op context for fp32)."""
    import contextlib

    if dtype == "fp32":
        return contextlib.nullcontext()
    return torch.autocast(device_type=torch.device(device).type, dtype=torch_dtype(dtype))


def build_meta_model(config, dtype: str = "fp32"):
    """Instantiate ``AutoModelForCausalLM`` for ``config`` on the meta device with tied weights restored."""
    from accelerate import init_empty_weights
    from transformers import AutoModelForCausalLM
    from transformers.initialization import no_init_weights

    require_causal_lm(config)
    try:
        with torch.device("meta"), init_empty_weights(include_buffers=True), no_init_weights():
            model = AutoModelForCausalLM.from_config(config, trust_remote_code=False, dtype=torch_dtype(dtype))
    except (ValueError, TypeError, ZeroDivisionError, RuntimeError, AttributeError, IndexError) as exc:
        from kolora_probe.model.source import ModelConfigError, short

        where = getattr(config, "name_or_path", "") or "the model's"
        first = (str(exc).strip().splitlines() or [""])[0]
        raise ModelConfigError(
            f"{where}/config.json: transformers cannot build {getattr(config, 'model_type', '?')!r} from it "
            f"({type(exc).__name__}: {short(first, 200, quote=False)}); an impossible size or head count; fix "
            f"config.json (re-download it or write it with save_pretrained())") from None
    if getattr(config, "tie_word_embeddings", False) or getattr(getattr(config, "get_text_config", lambda: config)(),
                                                                 "tie_word_embeddings", False):
        model.tie_weights()
    return model


def require_causal_lm(config) -> None:
    """Raise ModelConfigError (one line) when ``AutoModelForCausalLM`` has no class for ``config`` (e.g. T5)."""
    from transformers import AutoModelForCausalLM

    from kolora_probe.model.source import ModelConfigError

    if type(config) in AutoModelForCausalLM._model_mapping:
        return
    names = ", ".join(getattr(config, "architectures", None) or []) or type(config).__name__
    raise ModelConfigError(
        f"model_type {getattr(config, 'model_type', '?')!r} ({names}) is not a causal language model: "
        f"transformers' AutoModelForCausalLM has no class for it, and LoRA/QLoRA causal-LM fine-tuning is what "
        f"kolora-probe validates; fix --model or [model].id to name a decoder (causal) LM")


def count_parameters(model) -> tuple[int, int]:
    """(total, trainable) parameter counts; a parameter shared by several modules counts once."""
    total = trainable = 0
    for p in model.parameters():  # nn.Module.parameters() already de-duplicates shared tensors
        n = param_numel(p)
        total += n
        if p.requires_grad:
            trainable += n
    return total, trainable
