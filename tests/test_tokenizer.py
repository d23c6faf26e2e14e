"""tokenizer_loading / tokenizer_checks / korean_text on the tiny zoo, and the tokenizer checks in a subprocess."""
from __future__ import annotations

import shutil

import pytest

from kolora_probe.tokenizer.korean_text import (PACKAGED_SAMPLE, KoreanSampleError, hangul_count, hangul_ratio, is_hangul,
                                      load_korean_sample)
from kolora_probe.model.source import load_config, resolve_model_source
from kolora_probe.tokenizer.checks import (config_id_checks, hangul_fix_hint, mangles_hangul, round_trip,
                                           special_tokens)
from kolora_probe.tokenizer.loading import TokenizerLoadError, load_tokenizer
from model_factory import KOGPT2_SPECIAL_TOKENS, train_kogpt2_like_tokenizer
from suite_runner import gate_run, run_suite

SUITE = ("checks/test_model.py", "checks/test_tokenizer.py")


@pytest.fixture(scope="module")
def sample():
    return load_korean_sample()


@pytest.fixture(scope="module")
def tiny_source(model_zoo):
    return resolve_model_source(str(model_zoo.tiny))


@pytest.fixture(scope="module")
def fast(tiny_source):
    return load_tokenizer(tiny_source, "PreTrainedTokenizerFast", KOGPT2_SPECIAL_TOKENS)


# --- korean_text ---------------------------------------------------------------------------------------
def test_packaged_sample_is_varied_korean(sample):
    assert sample.path == PACKAGED_SAMPLE and len(sample.lines) >= 200
    assert 0.7 < sample.hangul_ratio < 0.95  # mostly Hangul, with numbers/English/punctuation mixed in
    joined = "\n".join(sample.lines)
    assert sum(line.startswith("질문:") and "답변:" in line for line in sample.lines) >= 20
    assert any(ch.isdigit() for ch in joined) and "GPU" in joined and "😊" in joined
    assert len(set(sample.lines)) == len(sample.lines)


def test_hangul_helpers():
    assert is_hangul("한") and is_hangul("ㄱ") and not is_hangul("A") and not is_hangul("😊")
    assert hangul_count("GPU 메모리 8GB") == 3
    assert hangul_ratio("가 A") == 0.5 and hangul_ratio("   ") == 0.0


@pytest.mark.parametrize("content, match", [
    (None, "file not found"),
    (b"\xff\xfe\x00bad", "not UTF-8"),
    (b"\n  \n", "no non-empty lines"),
    (b"only English text here\nand more of it\n", "Hangul"),
])
def test_bad_sample_files_are_one_line(tmp_path, content, match):
    p = tmp_path / "sample.txt"
    if content is not None:
        p.write_bytes(content)
    with pytest.raises(KoreanSampleError, match=match) as ei:
        load_korean_sample(p)
    assert "\n" not in str(ei.value) and "[checks].korean_sample" in str(ei.value)


# --- loading ---------------------------------------------------------------------------------------------
def test_fast_tokenizer_with_plan_special_tokens(fast):
    tok = fast.tokenizer
    assert fast.files == ("tokenizer.json",)
    facts = {s.attr: (s.token, s.id) for s in special_tokens(tok)}
    assert facts == {"bos_token": ("</s>", 1), "eos_token": ("</s>", 1), "unk_token": ("<unk>", 5),
                     "pad_token": ("<pad>", 3), "mask_token": ("<mask>", 6)}
    assert tok.convert_ids_to_tokens(0) == "<s>"


def test_no_tokenizer_files_is_one_line(model_zoo):
    with pytest.raises(TokenizerLoadError) as ei:
        load_tokenizer(resolve_model_source(str(model_zoo.no_tokenizer)), "PreTrainedTokenizerFast")
    assert "\n" not in str(ei.value) and "no tokenizer files" in str(ei.value)


def test_fast_class_without_tokenizer_json(tmp_path, model_zoo):
    d = tmp_path / "vocabonly"
    shutil.copytree(model_zoo.no_tokenizer, d)
    (d / "vocab.json").write_text("{}", encoding="utf-8")
    with pytest.raises(TokenizerLoadError, match="needs tokenizer.json"):
        load_tokenizer(resolve_model_source(str(d)), "PreTrainedTokenizerFast")


def test_unknown_tokenizer_class(tiny_source):
    with pytest.raises(TokenizerLoadError, match="'KoTokenizerXYZ' is not a transformers class"):
        load_tokenizer(tiny_source, "KoTokenizerXYZ")


# --- facts on the Korean sample ----------------------------------------------------------------------------
def test_round_trip_is_lossless_without_unk(fast, sample):
    rt = round_trip(fast.tokenizer, sample.lines)
    assert rt.lines == len(sample.lines) and rt.mismatches == 0 and rt.examples == ()
    assert rt.unk_count == 0 and rt.hangul_kept == 1.0 and not mangles_hangul(rt)
    assert 0.3 < rt.tokens_per_char < 1.0
    assert rt.characters == sample.characters


def test_auto_tokenizer_mangles_hangul_and_the_hint_says_the_fix(tiny_source, sample):
    auto = load_tokenizer(tiny_source, "AutoTokenizer", KOGPT2_SPECIAL_TOKENS)
    assert auto.class_name == "GPT2Tokenizer"  # transformers 5 ignores tokenizer.json's Metaspace set-up
    rt = round_trip(auto.tokenizer, sample.lines)
    assert mangles_hangul(rt) and rt.hangul_kept < 0.05 and rt.mismatches == rt.lines
    hint = hangul_fix_hint("AutoTokenizer", auto.class_name, rt)
    assert "\n" not in hint and 'tokenizer_class = "PreTrainedTokenizerFast"' in hint and "GPT2Tokenizer" in hint


def test_unk_is_counted(sample):
    from transformers import PreTrainedTokenizerFast

    small = train_kogpt2_like_tokenizer(["가나다 라마바"], vocab_size=30)
    tok = PreTrainedTokenizerFast(tokenizer_object=small, **KOGPT2_SPECIAL_TOKENS)
    rt = round_trip(tok, sample.lines[:20])
    assert rt.unk_count > 50 and rt.unk_lines == 20 and rt.mismatches == 20
    assert rt.examples and "<unk>" in rt.examples[0][1]


def test_config_ids(fast, tiny_source):
    checks = {c.name: c for c in config_id_checks(fast.tokenizer, load_config(tiny_source))}
    assert checks["eos_token_id"].matches and checks["pad_token_id"].matches
    bos = checks["bos_token_id"]  # KoGPT-2's convention: config bos 0 "<s>", tokenizer bos "</s>" (1)
    assert not bos.matches and not bos.strict and bos.config_token == "<s>"


def test_config_ids_catch_a_wrong_pad(tiny_source):
    bad = load_tokenizer(tiny_source, "PreTrainedTokenizerFast", {**KOGPT2_SPECIAL_TOKENS, "pad_token": "<unk>"})
    checks = {c.name: c for c in config_id_checks(bad.tokenizer, load_config(tiny_source))}
    assert not checks["pad_token_id"].matches and checks["pad_token_id"].strict
    assert "config.pad_token_id = 3 ('<pad>')" in checks["pad_token_id"].message


# --- the real suite --------------------------------------------------------------------------------------------
def test_suite_autotokenizer_fails_with_the_fix(tmp_path, model_zoo):
    run = gate_run(model_zoo.tiny, "--tokenizer-class=AutoTokenizer")     # shared with test_faults (case 2)
    assert run.returncode == 1
    for check in ("test_korean_hangul_preserved", "test_korean_round_trip_lossless"):
        msg = run.outcome(check)["message"]
        assert run.outcome(check)["outcome"] == "failed"
        assert 'set [model].tokenizer_class = "PreTrainedTokenizerFast"' in msg and "\n" not in msg
    assert run.outcome("test_tokenizer_model_agreement")["outcome"] == "failed"
    assert run.outcome("test_weights_load")["outcome"] == "passed"
    ev = {e["name"]: e["actual"] for e in run.outcome("test_korean_round_trip_lossless")["evidence"]}
    assert ev["roundtrip_mismatches"] == ev["roundtrip_lines"] > 200


def test_suite_without_tokenizer_fails_tokenizer_checks_only(tmp_path, model_zoo):
    run = gate_run(model_zoo.no_tokenizer)                                # shared with test_faults (case 2)
    assert run.returncode == 1
    for c in run.environment["checks"]:
        name = c["nodeid"].split("::")[1]
        if (c["nodeid"].startswith("checks/test_tokenizer.py") and name != "test_korean_sample_loaded") \
                or name == "test_greedy_generation":
            assert c["outcome"] == "failed", c
            if name == "test_tokenizer_class_is_plans":  # the owner has the full reason, the others point at it
                assert c["message"].startswith("tokenizer could not be loaded: no tokenizer"), c
            else:
                assert c["message"] == ("blocked: tokenizer could not be loaded — see "
                                        "test_tokenizer_class_is_plans"), c
        else:
            assert c["outcome"] == "passed", c


def test_auto_tokenizer_works_when_the_repo_has_tokenizer_config(tmp_path, model_zoo, fast, sample):
    """Any HF model whose repo saves a full tokenizer (tokenizer_config.json) loads fine through AutoTokenizer."""
    d = tmp_path / "full"
    shutil.copytree(model_zoo.tiny, d)
    fast.tokenizer.save_pretrained(d)
    assert (d / "tokenizer_config.json").is_file()
    auto = load_tokenizer(resolve_model_source(str(d)), "AutoTokenizer")
    rt = round_trip(auto.tokenizer, sample.lines)
    assert rt.mismatches == 0 and rt.unk_count == 0 and not mangles_hangul(rt)
    assert auto.tokenizer.eos_token == "</s>" and auto.tokenizer.pad_token_id == 3


def test_suite_with_a_missing_korean_sample_fails_with_the_option(tmp_path, model_zoo):
    default = (PACKAGED_SAMPLE.parents[2] / "plans" / "kogpt2-lora.toml").read_text(encoding="utf-8")
    missing = tmp_path / "nope.txt"
    plan_file = tmp_path / "plan.toml"
    plan_file.write_text(default + f'\n[checks]\nkorean_sample = "{missing}"\n', encoding="utf-8")
    run = run_suite("checks/test_tokenizer.py", f"--plan={plan_file}", f"--model={model_zoo.tiny}",
                    reports=tmp_path / "r")
    assert run.returncode == 1
    for check in ("test_korean_sample_loaded", "test_korean_round_trip_lossless", "test_tokenizer_model_agreement"):
        entry = run.outcome(check)
        assert entry["outcome"] == "failed", entry
        assert entry["message"].startswith(f"Korean sample unusable: [checks].korean_sample = '{missing}': file not found")
    assert run.outcome("test_special_tokens_in_vocab")["outcome"] == "passed"
