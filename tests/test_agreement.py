"""lm_agreement and generation on the tiny zoo (good, shuffled, byte-level tokenizer), and the suite on them."""
from __future__ import annotations

import math

import pytest
import torch

from kolora_probe.model.generation import greedy_generate
from kolora_probe.tokenizer.korean_text import load_korean_sample
from kolora_probe.model.agreement import AgreementError, lm_agreement
from kolora_probe.model.loading import load_model
from kolora_probe.tokenizer.loading import load_tokenizer
from model_factory import KOGPT2_SPECIAL_TOKENS
from suite_runner import run_suite

SUITE = ("checks/test_model.py", "checks/test_tokenizer.py")


@pytest.fixture(scope="module")
def lines():
    return load_korean_sample().lines


@pytest.fixture(scope="module")
def pair(model_zoo):
    def load(variant: str):
        m = load_model(str(getattr(model_zoo, variant)))
        return m, load_tokenizer(m.source, "PreTrainedTokenizerFast", KOGPT2_SPECIAL_TOKENS).tokenizer
    return load


def test_tiny_model_agrees_with_its_tokenizer(pair, lines, model_zoo):
    m, tok = pair("tiny")
    a = lm_agreement(m.model, tok, lines, max_loss_fraction=0.6, z=None, token_budget=None)
    assert a.vocab_size == model_zoo.vocab_size and a.ln_vocab == pytest.approx(math.log(model_zoo.vocab_size))
    assert a.passed and a.mean_loss < 0.6 * a.ln_vocab
    assert a.perplexity == pytest.approx(math.exp(a.mean_loss))
    every = sum(len(tok(x)["input_ids"]) - 1 for x in lines)
    assert a.lines == a.lines_used == len(lines) and a.predicted_tokens == a.sample_tokens == every
    assert a.stopped == "sample"
    # equals the factory's own full-batch training loss (same tokens, same masking)
    assert a.mean_loss == pytest.approx(model_zoo.train_loss, rel=1e-4)
    # batching does not change the result
    assert lm_agreement(m.model, tok, lines, batch_size=7, z=None, token_budget=None).mean_loss == pytest.approx(
        a.mean_loss, rel=1e-5)
    # the threshold is the plan's fraction: a strict one fails the same model
    assert not lm_agreement(m.model, tok, lines[:20], max_loss_fraction=0.01).passed


def _ratio_se(line_losses: list[float], line_tokens: list[int]) -> float:
    """Textbook cluster (ratio-estimator) standard error, written independently of the library."""
    import statistics

    n_bar = statistics.fmean(line_tokens)
    mean = sum(line_losses) / sum(line_tokens)
    k = len(line_tokens)
    s2 = sum((L - mean * n) ** 2 for L, n in zip(line_losses, line_tokens)) / (k - 1)
    return math.sqrt(s2 / k) / n_bar


def test_early_stop_on_a_clear_pass_uses_a_prefix_of_the_sample(pair, lines):
    m, tok = pair("tiny")
    full = lm_agreement(m.model, tok, lines, z=None, token_budget=None)
    a = lm_agreement(m.model, tok, lines)                     # defaults: z = 4, budget by model size
    assert a.passed == full.passed is True
    assert a.stopped == "decided" and 16 <= a.lines_used < len(lines) and a.predicted_tokens < full.predicted_tokens
    lo, hi = a.interval
    assert hi < a.threshold and lo <= full.mean_loss <= hi     # the whole sample's mean is inside the evidence
    # the running mean is exactly the mean over the lines it used, and the SE the textbook one
    usable = [x for x in lines if len(tok(x, add_special_tokens=False)["input_ids"]) >= 2]
    prefix = usable[:a.lines_used]
    exact = lm_agreement(m.model, tok, prefix, z=None, token_budget=None)
    assert a.mean_loss == pytest.approx(exact.mean_loss, rel=1e-5) and a.predicted_tokens == exact.predicted_tokens
    per_line = [lm_agreement(m.model, tok, [x], z=None, token_budget=None) for x in prefix]
    se = _ratio_se([p.mean_loss * p.predicted_tokens for p in per_line], [p.predicted_tokens for p in per_line])
    assert a.std_error == pytest.approx(se, rel=1e-4)


def test_undecidable_threshold_uses_the_whole_sample(pair, lines):
    m, tok = pair("tiny")
    full = lm_agreement(m.model, tok, lines, z=None, token_budget=None)
    # a threshold a hair above the true mean: no prefix can put it 4 SE away, so every line is read
    fraction = full.mean_loss * 1.0005 / full.ln_vocab
    a = lm_agreement(m.model, tok, lines, max_loss_fraction=fraction, token_budget=None)
    assert a.stopped == "sample" and a.lines_used == len(lines)
    assert a.passed == full.passed is True and a.mean_loss == pytest.approx(full.mean_loss, rel=1e-5)


def test_token_budget_caps_the_work(pair, lines):
    from kolora_probe.model.agreement import MIN_TOKEN_BUDGET, default_token_budget

    m, tok = pair("tiny")
    a = lm_agreement(m.model, tok, lines, z=None, token_budget=60)
    one_line = len(tok(lines[0])["input_ids"]) - 1
    assert a.stopped == "budget" and a.predicted_tokens <= max(60, one_line) and a.lines_used < len(lines)
    assert a.token_budget == 60
    # bigger models get fewer tokens, never fewer than the floor
    assert default_token_budget(125_000_000) > default_token_budget(1_300_000_000) >= MIN_TOKEN_BUDGET
    assert default_token_budget(70_000_000_000) == MIN_TOKEN_BUDGET
    auto = lm_agreement(m.model, tok, lines)
    assert auto.token_budget == default_token_budget(sum(p.numel() for p in m.model.parameters()))


def test_per_line_loss_matches_transformers(pair, lines):
    m, tok = pair("tiny")
    ids = torch.tensor([tok(lines[0])["input_ids"]])
    with torch.no_grad():
        ref = float(m.model(input_ids=ids, labels=ids).loss)
    assert lm_agreement(m.model, tok, lines[:1]).mean_loss == pytest.approx(ref, rel=1e-5)


@pytest.mark.parametrize("variant", ["shuffled", "byte_level"])
def test_broken_pairs_disagree(pair, lines, variant):
    m, tok = pair(variant)
    full = lm_agreement(m.model, tok, lines, z=None, token_budget=None)
    assert not full.passed and full.mean_loss > 0.9 * full.ln_vocab
    a = lm_agreement(m.model, tok, lines)                     # same verdict, decided early
    assert not a.passed and a.stopped == "decided" and a.lines_used < len(lines)
    assert a.interval[0] >= a.threshold and a.mean_loss > 0.9 * a.ln_vocab


def test_foreign_tokenizer_ids_beyond_the_vocab(pair, lines):
    from transformers import GPT2Config, GPT2LMHeadModel

    _, tok = pair("tiny")
    small = GPT2LMHeadModel(GPT2Config(vocab_size=100, n_embd=16, n_layer=1, n_head=1, n_positions=64))
    with pytest.raises(AgreementError, match="produces id .* vocabulary has 100 entries") as ei:
        lm_agreement(small, tok, lines[:5])
    assert "\n" not in str(ei.value)


def test_greedy_generation_on_tiny(pair):
    m, tok = pair("tiny")
    g = greedy_generate(m.model, tok, "오늘 날씨가", max_new_tokens=8)
    assert g.prompt_tokens > 0 and 0 < g.new_tokens <= 8
    assert g.logits_finite and g.decodable and g.text
    assert g.text == tok.decode(list(g.new_token_ids), skip_special_tokens=True)
    # greedy is deterministic, and the key/value cache changes nothing
    assert greedy_generate(m.model, tok, "오늘 날씨가", max_new_tokens=8).new_token_ids == g.new_token_ids
    assert greedy_generate(m.model, tok, "오늘 날씨가", max_new_tokens=8, use_cache=False).new_token_ids == \
        g.new_token_ids
    # and it is what transformers' own greedy search produces
    ids = torch.tensor([tok("오늘 날씨가", add_special_tokens=False)["input_ids"]])
    ref = m.model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=g.new_tokens, do_sample=False,
                           eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    assert tuple(ref[0, ids.shape[1]:].tolist()) == g.new_token_ids


def test_generation_detects_nan_logits(pair):
    import copy

    m, tok = pair("tiny")
    broken = copy.deepcopy(m.model)
    with torch.no_grad():
        broken.transformer.h[0].mlp.c_fc.weight.fill_(float("nan"))
    g = greedy_generate(broken, tok, "오늘 날씨가")
    assert not g.logits_finite and g.new_tokens == 0


def test_generation_with_a_prompt_the_tokenizer_drops(pair, model_zoo):
    m, _ = pair("tiny")
    auto = load_tokenizer(m.source, "AutoTokenizer", KOGPT2_SPECIAL_TOKENS).tokenizer
    with pytest.raises(ValueError, match="encodes to no tokens"):
        greedy_generate(m.model, auto, "오늘 날씨가")


@pytest.mark.parametrize("variant", ["shuffled", "byte_level"])
def test_suite_agreement_fails_on_broken_pairs(tmp_path, model_zoo, variant):
    run = run_suite(*SUITE, f"--model={getattr(model_zoo, variant)}", reports=tmp_path / "r")
    assert run.returncode == 1
    entry = run.outcome("test_tokenizer_model_agreement")
    assert entry["outcome"] == "failed" and "\n" not in entry["message"]
    assert entry["message"].startswith("mean LM loss") and "is not below 0.6 × ln(1600)" in entry["message"]
    ev = {e["name"]: e["actual"] for e in entry["evidence"]}
    assert ev["loss"] > ev["ln_vocab"] * 0.9 and ev["perplexity"] > 100
    # decided early: the interval in evidence lies above the threshold
    assert ev["stopped"] == "decided" and ev["loss_interval"][0] >= 0.6 * ev["ln_vocab"]
    for check in ("test_weights_load", "test_korean_round_trip_lossless", "test_no_unk_on_korean_sample",
                  "test_tied_head_preserved", "test_parameter_count_matches_architecture"):
        assert run.outcome(check)["outcome"] == "passed", check
    junit = run.junit
    props = {p.get("name") for p in junit.iter("property")}
    assert {"loss", "perplexity", "ln_vocab", "tokens_per_char", "roundtrip_mismatches", "unk_count"} <= props
