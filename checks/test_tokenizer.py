"""Tokenizer: the plan's class with the plan's special tokens, lossless on the Korean sample, no <unk>, ids
consistent with the model config, and agreeing with the model (LM loss far below ln(vocab))."""
from __future__ import annotations

import pytest

from kolora_probe.tokenizer.checks import (FIX, config_id_checks, describe_examples, hangul_fix_hint, mangles_hangul,
                                           special_tokens, vocab_size)

pytestmark = pytest.mark.cpu

MAX_TOKENS_PER_CHAR = 1.5  # a tokenizer without Hangul merges needs ~2-3 byte tokens per syllable


def test_korean_sample_loaded(korean_sample, evidence):
    """The Korean sample (plan [checks].korean_sample or the packaged one) is read and is mostly Hangul."""
    evidence("korean_sample", str(korean_sample.path))
    evidence("sample_lines", len(korean_sample.lines))
    evidence("sample_characters", korean_sample.characters)
    evidence("sample_hangul_ratio", round(korean_sample.hangul_ratio, 4), expected=">= 0.3")
    assert korean_sample.lines and korean_sample.hangul_ratio >= 0.3


def test_tokenizer_class_is_plans(plan, loaded_tokenizer, evidence):
    """The tokenizer is an instance of the plan's [model].tokenizer_class."""
    import transformers

    evidence("tokenizer_class", loaded_tokenizer.class_name, expected=plan.model.tokenizer_class)
    evidence("tokenizer_files", list(loaded_tokenizer.files))
    evidence("vocab_size", vocab_size(loaded_tokenizer.tokenizer))
    if plan.model.tokenizer_class != "AutoTokenizer":
        cls = getattr(transformers, plan.model.tokenizer_class)
        assert isinstance(loaded_tokenizer.tokenizer, cls), (
            f"tokenizer is {loaded_tokenizer.class_name}, not the plan's {plan.model.tokenizer_class}")


def test_korean_hangul_preserved(plan, loaded_tokenizer, tokenizer_round_trip, evidence):
    """Hangul survives encode→decode (a class that resolves to a byte-level GPT-2 tokenizer drops it)."""
    rt = tokenizer_round_trip
    evidence("hangul_kept", round(rt.hangul_kept, 4), expected=1.0)
    evidence("hangul_characters", rt.hangul_in)
    assert not mangles_hangul(rt), hangul_fix_hint(plan.model.tokenizer_class, loaded_tokenizer.class_name, rt)


def test_korean_round_trip_lossless(tokenizer_round_trip, evidence):
    """Every line of the Korean sample decodes back to exactly itself."""
    rt = tokenizer_round_trip
    evidence("roundtrip_lines", rt.lines)
    evidence("roundtrip_mismatches", rt.mismatches, expected=0)
    if rt.examples:
        evidence("roundtrip_examples", [list(e) for e in rt.examples])
    assert rt.mismatches == 0, (f"{rt.mismatches} of {rt.lines} Korean lines do not survive encode→decode "
                                f"({describe_examples(rt)}); fix: {FIX}")


def test_no_unk_on_korean_sample(tokenizer_round_trip, evidence):
    """The Korean sample produces no <unk> tokens."""
    rt = tokenizer_round_trip
    evidence("unk_count", rt.unk_count, expected=0)
    evidence("unk_lines", rt.unk_lines, expected=0)
    assert rt.unk_count == 0, (f"{rt.unk_count} <unk> tokens in {rt.unk_lines} of {rt.lines} Korean lines; the "
                               f"tokenizer's vocabulary does not cover this text")


def test_tokens_per_character(tokenizer_round_trip, evidence):
    """Tokens per character on the Korean sample is reported and plausible for a Korean-aware tokenizer."""
    rt = tokenizer_round_trip
    evidence("tokens", rt.tokens)
    evidence("characters", rt.characters)
    evidence("tokens_per_char", round(rt.tokens_per_char, 4), expected=f"<= {MAX_TOKENS_PER_CHAR}")
    assert 0 < rt.tokens_per_char <= MAX_TOKENS_PER_CHAR, (
        f"{rt.tokens_per_char:.2f} tokens per character on Korean text (expected <= {MAX_TOKENS_PER_CHAR}): the "
        f"tokenizer has no Hangul merges; fix: {FIX}")


def test_special_tokens_in_vocab(plan, tokenizer, evidence):
    """Every special token the tokenizer uses (and every one the plan sets) is a single vocabulary entry."""
    facts = special_tokens(tokenizer)
    for s in facts:
        evidence(s.attr, {"token": s.token, "id": s.id})
    missing = [f"{s.attr}={s.token!r}" for s in facts
               if s.token is not None and not s.in_vocab]
    missing += [f"{k}={v!r} (plan)" for k, v in plan.model.special_tokens.items() if v not in tokenizer.get_vocab()]
    evidence("special_tokens_missing", missing, expected=[])
    assert not missing, (f"special tokens not in the vocabulary: {', '.join(missing)}; set [model].special_tokens "
                         f"to tokens of the model's tokenizer.json")


def test_special_token_ids_match_config(model_source, tokenizer, evidence):
    """The tokenizer's eos/pad ids equal config.json's eos_token_id/pad_token_id (bos reported)."""
    from kolora_probe.model.source import RemoteCodeRefused, load_config

    try:
        config = load_config(model_source)
    except (RemoteCodeRefused, OSError, ValueError) as exc:
        pytest.fail(f"config.json unusable: {str(exc).splitlines()[0]}", pytrace=False)
    checks = config_id_checks(tokenizer, config)
    for c in checks:
        evidence(c.name, c.tokenizer_id, expected=c.config_id,
                 note=None if c.matches or c.strict else "differs by the model's convention; not an error")
    bad = [c.message for c in checks if c.strict and not c.matches]
    assert not bad, "; ".join(bad) + ("; fix: set [model].special_tokens so eos_token/pad_token are the tokens at "
                                      "config.json's ids")


def test_tokenizer_model_agreement(lm_agreement_result, evidence):
    """Mean LM loss on the Korean sample is below max_loss_fraction × ln(vocab) (random weights or a foreign
    tokenizer stay near ln(vocab))."""
    a = lm_agreement_result
    evidence("loss", round(a.mean_loss, 4), expected=f"< {a.threshold:.4f}", unit="nats/token")
    evidence("perplexity", round(a.perplexity, 3))
    evidence("ln_vocab", round(a.ln_vocab, 4))
    evidence("loss_fraction_of_ln_vocab", round(a.loss_fraction, 4), expected=f"< {a.max_loss_fraction}")
    evidence("predicted_tokens", a.predicted_tokens, note=f"of {a.sample_tokens} in the sample; {a.lines_used} "
             f"of {a.lines} lines")
    lo, hi = a.interval
    evidence("loss_interval", [round(lo, 4), round(hi, 4)] if lo == lo else None,
             expected=f"entirely < or >= {a.threshold:.4f}", unit="nats/token",
             note=f"mean ± {a.z if a.z is not None else 4:g} standard errors (lines as units)")
    evidence("stopped", a.stopped, note={"decided": "the interval is clear of the threshold",
                                         "budget": f"token budget {a.token_budget} reached",
                                         "sample": "every line of the sample used"}[a.stopped])
    evidence("agreement_seconds", round(a.seconds, 3), unit="s", note=f"{a.threads} threads")
    assert a.passed, (f"mean LM loss {a.mean_loss:.3f} on the Korean sample is not below "
                      f"{a.max_loss_fraction} × ln({a.vocab_size}) = {a.threshold:.3f} "
                      f"(perplexity {a.perplexity:.1f}; {a.predicted_tokens} of {a.sample_tokens} tokens): "
                      f"the weights are untrained/corrupt or the tokenizer is not the model's; load the model's own "
                      f"tokenizer ([model].tokenizer_class, special_tokens) and its real weights")
