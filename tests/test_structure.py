"""Structure analyser on the full-size KoGPT-2 config and small LLaMA / GPT-NeoX / OPT configs.

Expected numbers are derived here from the config dimensions, not from the code under test.
"""
import pytest

from structure_configs import (KO_D, KO_HEADS, KO_LAYERS, KO_POS, KO_VOCAB, LL_D, LL_FF, LL_KV, LL_HEADS,
                               LL_LAYERS, LL_VOCAB, NX_D, NX_FF, NX_LAYERS, NX_VOCAB, OPT_D, OPT_FF, OPT_LAYERS,
                               OPT_POS, OPT_VOCAB, kogpt2_config, llama_config, neox_config, opt_config)

from kolora_probe.model.meta import build_meta_model
from kolora_probe.model.structure import analyze_model, family_of, matches_target, minimal_targets


@pytest.fixture(scope="module")
def kogpt2():
    return analyze_model(build_meta_model(kogpt2_config()))


def _kogpt2_total() -> int:
    d = KO_D
    per_block = (2 * d                      # ln_1
                 + d * 3 * d + 3 * d        # attn.c_attn
                 + d * d + d                # attn.c_proj
                 + 2 * d                    # ln_2
                 + d * 4 * d + 4 * d        # mlp.c_fc
                 + 4 * d * d + d)           # mlp.c_proj
    return KO_VOCAB * d + KO_POS * d + KO_LAYERS * per_block + 2 * d  # wte, wpe, blocks, ln_f (lm_head tied)


def test_kogpt2_totals_count_the_tied_head_once(kogpt2):
    assert _kogpt2_total() == 125_164_032
    assert kogpt2.total_params == 125_164_032
    assert kogpt2.total_params_if_untied == 125_164_032 + KO_VOCAB * KO_D == 164_485_632
    assert [sorted(g.names) for g in kogpt2.tied_groups] == [["lm_head.weight", "transformer.wte.weight"]]
    assert kogpt2.tied_groups[0].numel == KO_VOCAB * KO_D


def test_kogpt2_conv1d_layers_and_roles(kogpt2):
    assert kogpt2.family == "gpt2" and kogpt2.architecture == "GPT2LMHeadModel"
    roles = {r: len(ls) for r, ls in kogpt2.by_role().items()}
    assert roles == {"attention": 2 * KO_LAYERS, "mlp": 2 * KO_LAYERS, "output_head": 1, "embedding": 2, "other": 0}
    d = KO_D
    expect = {"attn.c_attn": ("Conv1D", d, 3 * d, "attention"), "attn.c_proj": ("Conv1D", d, d, "attention"),
              "mlp.c_fc": ("Conv1D", d, 4 * d, "mlp"), "mlp.c_proj": ("Conv1D", 4 * d, d, "mlp")}
    for i in range(KO_LAYERS):
        for suffix, (kind, fin, fout, role) in expect.items():
            l = kogpt2.layer(f"transformer.h.{i}.{suffix}")
            assert (l.kind, l.in_features, l.out_features, l.role, l.has_bias) == (kind, fin, fout, role, True)
    head = kogpt2.layer("lm_head")
    assert (head.kind, head.in_features, head.out_features, head.role) == ("Linear", d, KO_VOCAB, "output_head")
    assert head.tied_with == ("transformer.wte.weight",)
    wte = kogpt2.layer("transformer.wte")
    assert (wte.kind, wte.in_features, wte.out_features, wte.role) == ("Embedding", KO_VOCAB, d, "embedding")
    # a Linear-only detector would find only lm_head: the Conv1D layers must be there
    assert sum(1 for l in kogpt2.layers if l.kind == "Conv1D") == 4 * KO_LAYERS


def test_kogpt2_suggested_targets(kogpt2):
    s = {t.name: (set(t.targets), t.modules) for t in kogpt2.suggested}
    assert s["attention-only"] == ({"c_attn", "attn.c_proj"}, 2 * KO_LAYERS)
    assert s["attention+mlp"] == ({"c_attn", "c_proj", "c_fc"}, 4 * KO_LAYERS)
    assert s["all-linear-without-head"] == ({"c_attn", "c_proj", "c_fc"}, 4 * KO_LAYERS)
    assert KO_HEADS == 12  # config sanity: full-size


def test_llama_style_roles_features_and_total():
    rep = analyze_model(build_meta_model(llama_config()))
    d, ff, kv = LL_D, LL_FF, LL_KV * (LL_D // LL_HEADS)
    assert rep.family == "llama"
    expect = {"self_attn.q_proj": (d, d, "attention"), "self_attn.k_proj": (d, kv, "attention"),
              "self_attn.v_proj": (d, kv, "attention"), "self_attn.o_proj": (d, d, "attention"),
              "mlp.gate_proj": (d, ff, "mlp"), "mlp.up_proj": (d, ff, "mlp"), "mlp.down_proj": (ff, d, "mlp")}
    for i in range(LL_LAYERS):
        for suffix, (fin, fout, role) in expect.items():
            l = rep.layer(f"model.layers.{i}.{suffix}")
            assert (l.kind, l.in_features, l.out_features, l.role, l.has_bias) == ("Linear", fin, fout, role, False)
    assert rep.layer("lm_head").role == "output_head" and not rep.tied_groups
    per_layer = d * d * 2 + d * kv * 2 + 3 * d * ff + 2 * d   # q,o + k,v + gate,up,down + 2 RMSNorm
    assert rep.total_params == LL_VOCAB * d + LL_LAYERS * per_layer + d + d * LL_VOCAB
    s = {t.name: set(t.targets) for t in rep.suggested}
    assert s["attention-only"] == {"q_proj", "k_proj", "v_proj", "o_proj"}
    assert s["attention+mlp"] == {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}


def test_mixture_of_experts_fused_tensors_are_reported_not_suggested():
    """transformers 5 stores Mixtral's experts as 3-D tensors of one MixtralExperts module (no nn.Linear per
    expert) and the router as a bare weight: target_modules cannot reach them, so they are listed as fused
    parameters, no 'attention+mlp' set pretends to cover the MLP, and a LoRA count warns about them."""
    from transformers import MixtralConfig

    from kolora_probe.lora.count import count_lora

    d, ff, experts, layers, vocab = 64, 96, 4, 2, 100
    cfg = MixtralConfig(vocab_size=vocab, hidden_size=d, intermediate_size=ff, num_hidden_layers=layers,
                        num_attention_heads=4, num_key_value_heads=2, num_local_experts=experts,
                        max_position_embeddings=64, tie_word_embeddings=False, pad_token_id=0)
    model = build_meta_model(cfg)
    rep = analyze_model(model)
    shapes = {f.name.split(".", 3)[3]: f.shape for f in rep.fused if f.name.startswith("model.layers.0.")}
    assert shapes == {"mlp.gate.weight": (experts, d), "mlp.experts.gate_up_proj": (experts, 2 * ff, d),
                      "mlp.experts.down_proj": (experts, d, ff)}
    assert rep.fused_params == layers * (experts * d + experts * 2 * ff * d + experts * d * ff)
    assert not rep.by_role()["mlp"]
    names = [t.name for t in rep.suggested]
    assert names == ["attention-only", "all-linear-without-head"], names
    c = count_lora(model, ["q_proj", "v_proj"], 8, report=rep)
    f = [x for x in c.findings if x.code == "fused_params"]
    assert len(f) == 1 and f[0].severity == "warning" and "target_parameters" in f[0].message
    assert f"{rep.fused_params:,} parameters" in f[0].message
    # a dense model has none
    assert analyze_model(build_meta_model(llama_config())).fused == ()


def test_gpt_neox_roles_and_total():
    rep = analyze_model(build_meta_model(neox_config()))
    d, ff = NX_D, NX_FF
    assert rep.family == "gpt_neox"
    expect = {"attention.query_key_value": (d, 3 * d, "attention"), "attention.dense": (d, d, "attention"),
              "mlp.dense_h_to_4h": (d, ff, "mlp"), "mlp.dense_4h_to_h": (ff, d, "mlp")}
    for i in range(NX_LAYERS):
        for suffix, (fin, fout, role) in expect.items():
            l = rep.layer(f"gpt_neox.layers.{i}.{suffix}")
            assert (l.kind, l.in_features, l.out_features, l.role) == ("Linear", fin, fout, role)
    heads = [l for l in rep.layers if l.role == "output_head"]
    assert [h.name for h in heads] == ["lm_head"]   # transformers 5 renamed GPT-NeoX's embed_out to lm_head
    head = heads[0]
    assert (head.role, head.in_features, head.out_features) == ("output_head", d, NX_VOCAB)
    per_layer = (2 * 2 * d + d * 3 * d + 3 * d + d * d + d + d * ff + ff + ff * d + d)
    assert rep.total_params == NX_VOCAB * d + NX_LAYERS * per_layer + 2 * d + d * NX_VOCAB
    s = {t.name: set(t.targets) for t in rep.suggested}
    assert s["attention-only"] == {"query_key_value", "dense"}
    assert s["attention+mlp"] == {"query_key_value", "dense", "dense_h_to_4h", "dense_4h_to_h"}


def test_opt_roles_tie_and_total():
    rep = analyze_model(build_meta_model(opt_config()))
    d, ff = OPT_D, OPT_FF
    assert rep.family == "opt"
    for i in range(OPT_LAYERS):
        for p in ("q_proj", "k_proj", "v_proj", "out_proj"):
            l = rep.layer(f"model.decoder.layers.{i}.self_attn.{p}")
            assert (l.in_features, l.out_features, l.role) == (d, d, "attention")
        assert rep.layer(f"model.decoder.layers.{i}.fc1").role == "mlp"
        assert (rep.layer(f"model.decoder.layers.{i}.fc2").in_features, rep.layer(f"model.decoder.layers.{i}.fc2").out_features) == (ff, d)
    assert rep.layer("lm_head").tied_with == ("model.decoder.embed_tokens.weight",)
    per_layer = 4 * (d * d + d) + 2 * 2 * d + d * ff + ff + ff * d + d
    pos = (OPT_POS + 2) * d
    assert rep.total_params == OPT_VOCAB * d + pos + OPT_LAYERS * per_layer + 2 * d
    s = {t.name: set(t.targets) for t in rep.suggested}
    assert s["attention-only"] == {"q_proj", "k_proj", "v_proj", "out_proj"}
    assert s["attention+mlp"] == {"q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2"}


def test_other_architecture_gets_roles_from_layer_names():
    """GPT-J has no rule of its own: roles come from the containers (attn / mlp) and the name-based family."""
    from transformers import GPTJConfig

    d, layers = 64, 2
    rep = analyze_model(build_meta_model(GPTJConfig(vocab_size=100, n_positions=32, n_embd=d, n_layer=layers,
                                                    n_head=4, rotary_dim=8, bos_token_id=0, eos_token_id=0)))
    roles = {r: len(ls) for r, ls in rep.by_role().items()}
    assert roles == {"attention": 4 * layers, "mlp": 2 * layers, "output_head": 1, "embedding": 1, "other": 0}
    fc_in = rep.layer("transformer.h.1.mlp.fc_in")
    assert (fc_in.role, fc_in.in_features, fc_in.out_features) == ("mlp", d, 4 * d)
    assert rep.layer("transformer.h.0.attn.out_proj").role == "attention"
    s = {t.name: set(t.targets) for t in rep.suggested}
    assert s["attention+mlp"] == {"q_proj", "k_proj", "v_proj", "out_proj", "fc_in", "fc_out"}


def test_loaded_model_and_bitsandbytes_layers_are_adaptable():
    """A real (non-meta) model works too, and bnb Linear4bit / Linear8bitLt are recognised with their features."""
    import bitsandbytes as bnb
    import torch.nn as nn
    from transformers import GPT2Config, GPT2LMHeadModel

    model = GPT2LMHeadModel(GPT2Config(vocab_size=50, n_positions=16, n_embd=32, n_layer=1, n_head=2,
                                       bos_token_id=0, eos_token_id=0))
    model.transformer.h[0].mlp.c_fc = bnb.nn.Linear4bit(32, 128)          # shape as a quantized model has
    model.transformer.h[0].mlp.c_proj = bnb.nn.Linear8bitLt(128, 32, has_fp16_weights=False)
    rep = analyze_model(model)
    fc, proj = rep.layer("transformer.h.0.mlp.c_fc"), rep.layer("transformer.h.0.mlp.c_proj")
    assert (fc.kind, fc.in_features, fc.out_features, fc.role) == ("Linear4bit", 32, 128, "mlp")
    assert (proj.kind, proj.in_features, proj.out_features, proj.role) == ("Linear8bitLt", 128, 32, "mlp")
    assert rep.layer("transformer.h.0.attn.c_attn").kind == "Conv1D"
    assert isinstance(model.lm_head, nn.Linear) and rep.layer("lm_head").tied_with


def test_matching_and_minimal_targets_follow_peft_suffix_rule():
    assert matches_target("transformer.h.0.attn.c_proj", "c_proj")
    assert matches_target("transformer.h.0.attn.c_proj", "attn.c_proj")
    assert not matches_target("transformer.h.0.attn.c_proj", "proj")         # suffix on dot boundaries only
    assert not matches_target("transformer.h.0.mlp.c_proj", "attn.c_proj")
    names = ["a.0.attn.c_proj", "a.0.mlp.c_proj", "a.0.attn.c_attn"]
    assert set(minimal_targets(["a.0.attn.c_proj", "a.0.attn.c_attn"], names)) == {"attn.c_proj", "c_attn"}
    assert family_of("unknown", ["m.layers.0.q_proj", "m.layers.0.k_proj", "m.layers.0.gate_proj"]) == "llama"
    assert family_of("unknown", ["m.x"]) == "generic"


# --- the real checks, as users run them (subprocess, config-only KoGPT-2 directory) --------------------
STRUCTURE_CHECKS = ("checks/test_structure.py", "checks/test_lora.py")


@pytest.fixture(scope="module")
def ko_dir(tmp_path_factory):
    from structure_configs import save_config

    return save_config(kogpt2_config(), tmp_path_factory.mktemp("kogpt2-config-only"))


def test_checks_pass_on_config_only_kogpt2(ko_dir, tmp_path):
    from suite_runner import run_suite

    run = run_suite(*STRUCTURE_CHECKS, "--model", str(ko_dir), "--expected-trainable=831488",
                    reports=tmp_path / "reports")
    assert run.returncode == 0, run.output[-3000:]
    outcomes = run.outcomes()
    assert len(outcomes) == 7 and set(outcomes.values()) == {"passed"}, outcomes
    ev = {e["name"]: e for e in run.outcome("test_trainable_params_as_planned")["evidence"]}
    assert ev["trainable_params"]["actual"] == ev["trainable_params"]["expected"] == 831_488
    pct = {e["name"]: e for e in run.outcome("test_trainable_percent")["evidence"]}["trainable_percent"]
    assert round(pct["actual"], 2) == 0.66
    html = run.html
    assert "831,488 (expected 831,488), 0.6599 % of all parameters" in html   # the summary row
    assert "module table" in html and "transformer.h.11.mlp.c_proj" in html
    assert "LoRA findings" in html and "tied_target" in html


def test_another_model_drops_the_plans_pinned_count(ko_dir, tmp_path):
    """--model other than the plan's: the default plan's 831,488 (counted for skt/kogpt2-base-v2) is not compared;
    the header and the check say so, the count is still shown, and the percent check compares with PEFT only."""
    from suite_runner import run_suite

    run = run_suite("checks/test_lora.py", f"--model={ko_dir}", reports=tmp_path / "r")
    assert run.returncode == 0, run.output[-3000:]
    assert f"note: lora.expected_trainable_params = 831,488 from " in run.output and f"--model {ko_dir}" in run.output
    c = run.outcome("test_trainable_params_as_planned")
    assert c["outcome"] == "skipped" and "was counted for skt/kogpt2-base-v2" in c["message"]
    assert "the count is 831,488" in c["message"]
    assert run.outcome("test_trainable_percent")["outcome"] == "passed"


def test_checks_fail_on_misspelt_target(ko_dir, tmp_path):
    from suite_runner import run_suite

    run = run_suite(*STRUCTURE_CHECKS, "--model", str(ko_dir), "--targets", "c_atn", reports=tmp_path / "r")
    assert run.returncode == 1
    c = run.outcome("test_every_target_matches")
    assert c["outcome"] == "failed"
    assert c["message"] == ("target 'c_atn' matches no module; close names: c_attn; "
                            "fix [lora].target_modules or --targets")
    assert run.outcome("test_adaptable_layers_found")["outcome"] == "passed"


def test_checks_fail_on_wrong_expected_count(ko_dir, tmp_path):
    from suite_runner import run_suite

    run = run_suite(*STRUCTURE_CHECKS, "--model", str(ko_dir), "--expected-trainable", "1", reports=tmp_path / "r")
    assert run.returncode == 1
    c = run.outcome("test_trainable_params_as_planned")
    assert c["outcome"] == "failed"
    assert c["message"].startswith("trainable parameters 831,488 != expected 1 for targets "
                                   "['lm_head'] r=16; fix [lora].expected_trainable_params")
    assert run.outcome("test_analytic_count_equals_peft")["outcome"] == "passed"
