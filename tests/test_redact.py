from kolora_probe.redact import MASK, redact, redact_text, secret_values


def test_env_secret_values_are_masked_everywhere():
    env = {"HF_TOKEN": "abcdef123456", "MY_API_KEY": "zzzzzzzz", "PATH": "/usr/bin", "SHORT_TOKEN": "ab"}
    secrets = secret_values(env)
    assert "abcdef123456" in secrets and "zzzzzzzz" in secrets and "/usr/bin" not in secrets and "ab" not in secrets
    doc = {"a": ["token=abcdef123456"], "b": {"c": "key zzzzzzzz"}}
    assert redact(doc, secrets) == {"a": [f"token={MASK}"], "b": {"c": f"key {MASK}"}}


def test_token_shapes_are_masked_without_env():
    text = "use hf_" + "A" * 30 + " please"
    assert redact_text(text, []) == f"use {MASK} please"
    assert redact_text("hf_short", []) == "hf_short"
