"""Fixtures for the model, tokenizer, agreement and generation checks (a plugin listed in conftest.pytest_plugins).

Each expensive object is built once per session. When building fails (model not found, no weights, truncated
or unsafe weights, no tokenizer …) every dependent check fails with the same one-line reason.

* ``model_source`` – :class:`kolora_probe.model.source.ModelSource` for the plan's model.
* ``loaded_model`` – :class:`kolora_probe.model.loading.LoadedModel` (weights loaded once; CPU, or the first CUDA
  device when the run selects ``gpu``/``benchmark`` checks and one is usable).
* ``loaded_tokenizer`` / ``tokenizer`` – the plan's tokenizer class with the plan's special tokens
  (:class:`~kolora_probe.tokenizer.loading.LoadedTokenizer` / the transformers tokenizer itself).
* ``korean_sample`` / ``korean_texts`` – the Korean sample (plan ``[checks].korean_sample`` or the packaged one).
* ``tokenizer_round_trip``, ``lm_agreement_result``, ``generation_result`` – the measurements, computed once.
"""
from __future__ import annotations

import pytest

from kolora_probe_checks.failures import fail_check


@pytest.fixture(scope="session")
def model_source(plan):
    from kolora_probe.model.source import ModelNotFound, resolve_model_source

    try:
        return resolve_model_source(plan.model.id, plan.model.revision)
    except ModelNotFound as exc:
        fail_check("model not found", exc)


def _device(config: pytest.Config) -> str:
    markexpr = config.getoption("markexpr") or ""
    if "gpu" not in markexpr and "benchmark" not in markexpr:
        return "cpu"
    from kolora_probe.env.facts import cuda_unavailable_reason

    return "cpu" if cuda_unavailable_reason() else "cuda"


@pytest.fixture(scope="session")
def loaded_model(plan, model_source, pytestconfig):
    from kolora_probe.model.loading import ModelLoadError, load_model_from

    try:
        loaded = load_model_from(model_source, dtype=plan.training.weights_dtype)
    except ModelLoadError as exc:
        fail_check("model weights could not be loaded", exc)
    device = _device(pytestconfig)
    if device != "cpu":
        loaded.model.to(device)
    return loaded


@pytest.fixture(scope="session")
def loaded_tokenizer(plan, model_source):
    from kolora_probe.tokenizer.loading import TokenizerLoadError, load_tokenizer

    try:
        return load_tokenizer(model_source, plan.model.tokenizer_class, plan.model.special_tokens)
    except TokenizerLoadError as exc:
        fail_check("tokenizer could not be loaded", exc)


@pytest.fixture(scope="session")
def tokenizer(loaded_tokenizer):
    return loaded_tokenizer.tokenizer


@pytest.fixture(scope="session")
def korean_sample(plan):
    from kolora_probe.tokenizer.korean_text import KoreanSampleError, load_korean_sample

    try:
        return load_korean_sample(plan.checks.korean_sample)
    except KoreanSampleError as exc:
        fail_check("Korean sample unusable", exc)


@pytest.fixture(scope="session")
def korean_texts(korean_sample) -> list[str]:
    return list(korean_sample.lines)


@pytest.fixture(scope="session")
def tokenizer_round_trip(tokenizer, korean_texts):
    from kolora_probe.tokenizer.checks import round_trip

    return round_trip(tokenizer, korean_texts)


@pytest.fixture(scope="session")
def lm_agreement_result(plan, loaded_model, tokenizer, korean_texts):
    from kolora_probe.model.agreement import AgreementError, lm_agreement

    try:
        return lm_agreement(loaded_model.model, tokenizer, korean_texts, plan.checks.max_loss_fraction)
    except AgreementError as exc:
        fail_check("tokenizer and model disagree", exc)


@pytest.fixture(scope="session")
def generation_result(loaded_model, tokenizer):
    from kolora_probe.model.generation import greedy_generate

    try:
        return greedy_generate(loaded_model.model, tokenizer)
    except ValueError as exc:
        from kolora_probe.tokenizer.checks import FIX

        fail_check("generation could not start", ValueError(f"{exc}; fix: {FIX}"))
