"""LoRA counts: analytic == PEFT on the meta device, hand-derived numbers, target errors and findings."""
import pytest

from structure_configs import (KO_D, KO_LAYERS, KO_VOCAB, LL_D, LL_FF, LL_HEADS, LL_KV, LL_LAYERS, NX_D, NX_FF,
                               NX_LAYERS, OPT_D, OPT_FF, OPT_LAYERS, kogpt2_config, llama_config, neox_config,
                               opt_config)

from kolora_probe.lora.count import TargetError, count_lora, resolve_targets
from kolora_probe.model.meta import build_meta_model
from kolora_probe.model.structure import analyze_model

R = 16
KO_TOTAL = 125_164_032


@pytest.fixture(scope="module")
def ko():
    model = build_meta_model(kogpt2_config())
    return model, analyze_model(model)


def _count(ko, targets, r=R, **kw):
    model, rep = ko
    return count_lora(model, targets, r, 2 * r, report=rep, **kw)


@pytest.mark.parametrize("targets, expected", [
    (["lm_head"], R * (KO_D + KO_VOCAB)),                                            # 831,488
    (["c_attn"], KO_LAYERS * R * (KO_D + 3 * KO_D)),                                 # 589,824
    (["c_attn", "c_proj", "c_fc"], KO_LAYERS * R * ((KO_D + 3 * KO_D) + (KO_D + KO_D)
                                                    + (KO_D + 4 * KO_D) + (4 * KO_D + KO_D))),  # 2,359,296
])
def test_kogpt2_counts_analytic_equals_peft(ko, targets, expected):
    assert expected in (831_488, 589_824, 2_359_296)
    c = _count(ko, targets)
    assert c.trainable_params == expected
    assert c.peft_trainable_params == expected, "PEFT's get_nb_trainable_parameters() disagrees"
    assert c.peft_all_params == KO_TOTAL + expected
    assert c.total_params == KO_TOTAL
    assert c.trainable_percent == pytest.approx(100 * expected / (KO_TOTAL + expected))
    assert c.trainable_percent_of_base == pytest.approx(100 * expected / KO_TOTAL)
    assert sum(m.lora_params for m in c.modules) == expected


def test_kogpt2_lm_head_is_066_percent_and_tied_findings(ko):
    c = _count(ko, ["lm_head"])
    assert round(c.trainable_percent, 2) == 0.66 and round(c.trainable_percent_of_base, 2) == 0.66
    assert [(m.name, m.kind, m.in_features, m.out_features, m.lora_params) for m in c.modules] == [
        ("lm_head", "Linear", KO_D, KO_VOCAB, 831_488)]
    codes = {f.code: f for f in c.findings}
    assert "tied_target" in codes and codes["tied_target"].severity == "warning"
    emb_bytes = KO_VOCAB * KO_D * 4                                                  # fp32 embedding
    assert "157.3 MB" in codes["tied_target"].message and "transformer.wte" in codes["tied_target"].message
    assert "merging" in codes["tied_target"].message
    assert "embedding_saved" in codes and "51200×768, ~157.3 MB" in codes["embedding_saved"].message
    assert c.adapter_bytes == 831_488 * 4 + emb_bytes
    assert "conv1d_fan_in_fan_out" not in codes
    assert any("ensure_weight_tying" in w or "tie" in w for w in c.peft_warnings)


def test_conv1d_targets_report_fan_in_fan_out_and_no_tie(ko):
    c = _count(ko, ["c_attn"])
    codes = {f.code for f in c.findings}
    assert "conv1d_fan_in_fan_out" in codes and "tied_target" not in codes
    assert c.adapter_bytes == 589_824 * 4


def test_misspelt_target_fails_with_close_names(ko):
    with pytest.raises(TargetError) as exc:
        _count(ko, ["c_atn"])
    msg = str(exc.value)
    assert "\n" not in msg
    assert msg == "target 'c_atn' matches no module; close names: c_attn; fix [lora].target_modules or --targets"


def test_partly_matching_list_names_only_the_bad_target(ko):
    with pytest.raises(TargetError) as exc:
        _count(ko, ["c_attn", "lm_haed"])
    msg = str(exc.value)
    assert "'lm_haed' matches no module; close names: lm_head" in msg and "'c_attn'" not in msg


def test_empty_and_non_adaptable_targets_fail(ko):
    with pytest.raises(TargetError, match="target list is empty"):
        _count(ko, [])
    with pytest.raises(TargetError, match=r"'attn' matches modules LoRA cannot wrap \(GPT2Attention\); "
                                          r"name a layer inside instead: c_attn, c_proj"):
        _count(ko, ["attn"])
    with pytest.raises(TargetError, match="layer names in this model"):   # nothing close at all
        _count(ko, ["zzzzzz"])


def test_target_matching_only_some_layers_of_its_kind_is_reported(ko):
    c = _count(ko, ["h.0.attn.c_attn", "attn.c_proj"])
    assert c.trainable_params == c.peft_trainable_params == R * (KO_D + 3 * KO_D) + KO_LAYERS * R * 2 * KO_D
    partial = [f.message for f in c.findings if f.code == "partial_kind"]
    assert any("'h.0.attn.c_attn' matches 1 of 12 layers named 'c_attn'" in m for m in partial)
    assert any("'attn.c_proj' matches 12 of 24 layers named 'c_proj'" in m for m in partial)


def _small_gpt2():
    from transformers import GPT2Config

    d, layers, vocab, pos = 32, 2, 50, 16
    cfg = GPT2Config(vocab_size=vocab, n_positions=pos, n_embd=d, n_layer=layers, n_head=2, bos_token_id=0,
                     eos_token_id=0)
    return build_meta_model(cfg), d, layers, vocab, pos


def test_bias_and_modules_to_save_counts_match_peft():
    model, d, layers, vocab, pos = _small_gpt2()
    r = 4
    lora = layers * r * (d + 3 * d)
    all_bias = layers * (3 * d + d + 4 * d + d + 2 * d) + d        # c_attn, c_proj, c_fc, mlp.c_proj, ln_1/2; ln_f
    c = count_lora(model, ["c_attn"], r, bias="all")
    assert (c.lora_params, c.bias_params) == (lora, all_bias)
    assert c.trainable_params == c.peft_trainable_params == lora + all_bias
    c = count_lora(model, ["c_attn"], r, bias="lora_only")
    assert c.trainable_params == c.peft_trainable_params == lora + layers * 3 * d
    c = count_lora(model, ["c_attn"], r, modules_to_save=["wpe"])
    assert c.trainable_params == c.peft_trainable_params == lora + pos * d
    with pytest.raises(TargetError, match="modules_to_save"):
        count_lora(model, ["c_attn"], r, modules_to_save=["nope"])


def test_llama_neox_opt_counts_match_hand_and_peft():
    r = 8
    m = build_meta_model(llama_config())
    d, ff, kv = LL_D, LL_FF, LL_KV * (LL_D // LL_HEADS)
    targets = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    per = r * ((d + d) + 2 * (d + kv) + (d + d) + 2 * (d + ff) + (ff + d))
    c = count_lora(m, targets, r)
    assert c.trainable_params == c.peft_trainable_params == LL_LAYERS * per

    m = build_meta_model(neox_config())
    d, ff = NX_D, NX_FF
    c = count_lora(m, ["query_key_value", "dense"], r)
    assert c.trainable_params == c.peft_trainable_params == NX_LAYERS * r * ((d + 3 * d) + (d + d))

    m = build_meta_model(opt_config())
    d, ff = OPT_D, OPT_FF
    c = count_lora(m, ["q_proj", "v_proj", "fc1", "fc2"], r)
    assert c.trainable_params == c.peft_trainable_params == OPT_LAYERS * r * (2 * (d + d) + (d + ff) + (ff + d))


def test_loaded_model_is_not_modified():
    from transformers import GPT2Config, GPT2LMHeadModel

    model = GPT2LMHeadModel(GPT2Config(vocab_size=50, n_positions=16, n_embd=32, n_layer=1, n_head=2,
                                       bos_token_id=0, eos_token_id=0))
    before = [n for n, _ in model.named_modules()]
    c = count_lora(model, ["c_attn", "lm_head"], 4)
    assert c.trainable_params == c.peft_trainable_params == 4 * (32 + 96) + 4 * (32 + 50)
    assert [n for n, _ in model.named_modules()] == before
    assert all(p.device.type == "cpu" for p in model.parameters())


def test_targets_also_in_modules_to_save_are_excluded_like_peft(ko):
    _, rep = ko
    (m,) = resolve_targets(rep, ["c_fc"], modules_to_save=["lm_head"])
    assert len(m.modules) == KO_LAYERS and all(n.endswith("mlp.c_fc") for n in m.modules)
    with pytest.raises(TargetError, match="'lm_head' only matches layers that modules_to_save"):
        resolve_targets(rep, ["lm_head"], modules_to_save=["lm_head"])


@pytest.mark.parametrize("targets", [["lm_head"], ["c_attn"], ["wte"], ["c_attn", "lm_head"]])
def test_adapter_bytes_equal_what_peft_saves(targets):
    """adapter_bytes == bytes of PEFT's get_peft_model_state_dict (incl. the full embedding it adds for lm_head)."""
    import warnings

    from peft import LoraConfig, get_peft_model, get_peft_model_state_dict
    from transformers import GPT2Config, GPT2LMHeadModel

    cfg = GPT2Config(vocab_size=50, n_positions=16, n_embd=32, n_layer=1, n_head=2, bos_token_id=0, eos_token_id=0)
    model = GPT2LMHeadModel(cfg)
    c = count_lora(model, targets, 4)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        peft_model = get_peft_model(GPT2LMHeadModel(cfg), LoraConfig(r=4, target_modules=targets))
        state = get_peft_model_state_dict(peft_model)
    assert c.adapter_bytes == sum(t.numel() * t.element_size() for t in state.values())
    saves_embedding = any(k.endswith("base_layer.weight") for k in state)
    assert saves_embedding == ("lm_head" in targets) == any(f.code == "embedding_saved" for f in c.findings)


def test_all_linear_shorthand_excludes_the_head_like_peft(ko):
    c = _count(ko, ["all-linear"])
    assert c.trainable_params == c.peft_trainable_params == 2_359_296          # = c_attn + c_proj + c_fc
    assert "lm_head" not in {m.name for m in c.modules} and len(c.modules) == 4 * KO_LAYERS


def test_moe_expert_tensors_through_target_parameters_hand_count_equals_peft():
    """LoRA on Mixtral's fused expert tensors (E, out, in) via PEFT's target_parameters: A is (r·E) × in and B is
    out × (r·E), so r·E·(in + out) per tensor; the router weight (E, d) is a plain 2-D tensor: r·(E + d)."""
    from transformers import MixtralConfig

    d, ff, experts, layers, r = 64, 96, 4, 2, 8
    cfg = MixtralConfig(vocab_size=100, hidden_size=d, intermediate_size=ff, num_hidden_layers=layers,
                        num_attention_heads=4, num_key_value_heads=2, num_local_experts=experts,
                        max_position_embeddings=64, tie_word_embeddings=False, pad_token_id=0)
    model = build_meta_model(cfg)
    q = r * (d + d)
    gate_up = r * experts * (d + 2 * ff)
    down = r * experts * (ff + d)
    c = count_lora(model, ["q_proj"], r, target_parameters=["experts.gate_up_proj", "experts.down_proj"])
    assert c.trainable_params == layers * (q + gate_up + down) == c.peft_trainable_params
    assert {p.name.split(".", 3)[3]: p.lora_params for p in c.parameters if ".0." in p.name} == {
        "mlp.experts.gate_up_proj": gate_up, "mlp.experts.down_proj": down}
    assert [f.code for f in c.findings if f.code == "fused_params"] == ["fused_params"]   # the router stays
    with_router = count_lora(model, ["q_proj"], r,
                             target_parameters=["experts.gate_up_proj", "experts.down_proj", "mlp.gate.weight"])
    assert with_router.trainable_params == layers * (q + gate_up + down + r * (experts + d))
    assert with_router.agrees_with_peft and not [f for f in with_router.findings if f.code == "fused_params"]
    with pytest.raises(TargetError) as info:
        count_lora(model, ["q_proj"], r, target_parameters=["experts.gate_proj"])
    assert "target parameter 'experts.gate_proj' matches no weight tensor" in str(info.value)
    assert "close names: experts.gate_up_proj" in str(info.value) and "--target-parameters" in str(info.value)
