from kolora_probe.report.redact import MASK, redact, redact_text, secret_values


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


def test_escaped_forms_of_a_secret_are_masked():
    import html
    import json

    secret = 'p&ss<w>rd"9999'
    korean = "비밀번호비밀번호"
    import xml.etree.ElementTree as ET

    as_attribute = ET.tostring(ET.Element("p", value=secret), encoding="unicode")   # how junit.xml writes it
    as_text = ET.tostring(ET.Element("p", text=secret), encoding="unicode")
    for text in (html.escape(secret), html.escape(json.dumps(secret)), json.dumps(korean), as_attribute, as_text,
                 html.escape(json.dumps(korean)), html.escape(secret, quote=False),
                 html.escape(secret).replace("&quot;", "&#34;")):
        clean = redact_text(f"x {text} y", [secret, korean])
        assert "ss" not in clean.replace("x ", "").replace(" y", "").replace(MASK, "") and MASK in clean, (text, clean)


def test_url_credentials_and_secret_variable_names():
    assert redact_text("clone https://ci:pw9@git.example/r.git", []) == f"clone https://{MASK}@git.example/r.git"
    assert redact_text("see https://git.example/r.git", []) == "see https://git.example/r.git"
    env = {"DB_PASSWORD": "hunter22", "SSH_KEY": "keykeykey", "GITHUB_AUTH": "authauth", "MY_CREDENTIALS": "credcred",
           "PWD": "/home/user/project", "KEYBOARD_LAYOUT": "qwerty-us"}
    secrets = secret_values(env)
    assert {"hunter22", "keykeykey", "authauth", "credcred"} <= set(secrets)
    assert "/home/user/project" not in secrets and "qwerty-us" not in secrets
