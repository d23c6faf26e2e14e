"""Model: the plan's weights load safely (safetensors, or .bin through weights-only unpickling; no remote code),
the tied head stays tied, the parameter count matches the architecture, and greedy generation works."""
from __future__ import annotations

import pytest

pytestmark = pytest.mark.cpu

SAFE_FORMATS = ("safetensors", "bin-weights-only")


def test_model_found(model_source, evidence):
    """The plan's model resolves to a directory with config.json (local dir, HF cache or hub; never another model)."""
    evidence("model_source_kind", model_source.kind)
    evidence("model_path", str(model_source.path))
    evidence("model_files", list(model_source.files))
    assert (model_source.path / "config.json").is_file()


def test_weights_load(loaded_model, evidence):
    """The weights load completely: no missing, unexpected or shape-mismatched tensors."""
    evidence("load_seconds", round(loaded_model.load_seconds, 3), unit="s")
    evidence("weight_files", [f.name for f in loaded_model.weight_files])
    evidence("missing_keys", list(loaded_model.missing_keys), expected=[])
    evidence("mismatched_keys", list(loaded_model.mismatched_keys), expected=[])
    evidence("unexpected_keys", list(loaded_model.unexpected_keys))
    bad = [f"missing {list(loaded_model.missing_keys)[:5]}" if loaded_model.missing_keys else "",
           f"shape-mismatched {list(loaded_model.mismatched_keys)[:5]}" if loaded_model.mismatched_keys else ""]
    bad = [b for b in bad if b]
    assert not bad, (f"the checkpoint does not fit the architecture ({'; '.join(bad)}): those weights would be "
                     f"random; use the checkpoint that belongs to this config.json")


def test_weights_format_is_safe(loaded_model, evidence):
    """Weights come from safetensors, or from a .bin that unpickled with torch.load(weights_only=True)."""
    evidence("weight_format", loaded_model.weight_format, expected=" or ".join(SAFE_FORMATS))
    assert loaded_model.weight_format in SAFE_FORMATS


def test_no_remote_code(plan, loaded_model, evidence):
    """The model class is transformers' own; trust_remote_code stays off."""
    module = type(loaded_model.model).__module__
    evidence("model_class", f"{module}.{type(loaded_model.model).__name__}")
    evidence("trust_remote_code", plan.model.trust_remote_code, expected=False)
    assert module.startswith("transformers."), (f"model class comes from {module}, not transformers; "
                                                "kolora-probe never runs a repository's own code")


def test_tied_head_preserved(loaded_model, evidence):
    """When the config ties input and output embeddings, lm_head is the very tensor of the input embedding."""
    evidence("tie_word_embeddings", loaded_model.tie_expected)
    evidence("tied_parameter_groups", [list(g) for g in loaded_model.tied])
    evidence("head_tied", loaded_model.head_tied, expected=loaded_model.tie_expected)
    if loaded_model.tie_expected:
        assert loaded_model.head_tied, ("config.tie_word_embeddings is true but lm_head is a separate tensor after "
                                        "loading: the tie was lost (parameters double-counted, LoRA on lm_head "
                                        "would not share the embedding); re-save the model with save_pretrained()")


def test_parameter_count_matches_architecture(loaded_model, structure_model, evidence):
    """Loaded parameters (shared ones once) equal the count of the same config built on the meta device."""
    from kolora_probe.model.meta import count_parameters

    expected, _ = count_parameters(structure_model)
    evidence("total_params", loaded_model.total_params, expected=expected)
    evidence("trainable_params", loaded_model.trainable_params)
    assert loaded_model.total_params == expected, (
        f"loaded model has {loaded_model.total_params:,} parameters, its config describes {expected:,}; "
        f"the checkpoint and config.json do not match")


def test_weights_finite(loaded_model, evidence):
    """No NaN/inf in any weight (one min/max reduction per float tensor: NaN and ±inf propagate into it)."""
    import torch

    from kolora_probe.env.facts import torch_threads, usable_threads

    bad = []
    with torch_threads(usable_threads()), torch.inference_mode():
        for n, p in loaded_model.model.named_parameters():
            if p.numel() and p.is_floating_point():
                lo, hi = torch.aminmax(p)
                if not (bool(torch.isfinite(lo)) and bool(torch.isfinite(hi))):
                    bad.append(n)
    evidence("non_finite_tensors", bad, expected=[])
    assert not bad, f"{len(bad)} weight tensors contain NaN/inf (e.g. {bad[:3]}); the checkpoint is corrupt"


def test_greedy_generation(generation_result, evidence):
    """Greedy generation from a Korean prompt produces new, decodable tokens with finite logits."""
    g = generation_result
    evidence("prompt", g.prompt)
    evidence("new_tokens", g.new_tokens, expected="> 0")
    evidence("generated_text", g.text)
    evidence("logits_finite", g.logits_finite, expected=True)
    evidence("decodable", g.decodable, expected=True)
    evidence("generation_seconds", round(g.seconds, 3), unit="s")
    assert g.logits_finite, "the model produced NaN/inf logits during greedy generation; the weights are broken"
    assert g.new_tokens > 0, "greedy generation produced no new tokens"
    assert g.decodable, (f"generated ids {list(g.new_token_ids)[:12]} decode to broken text {g.text!r}; the "
                         f"tokenizer does not match the model")
