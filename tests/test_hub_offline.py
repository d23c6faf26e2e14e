"""An unreachable hub costs one short probe per run, then the run is offline: no retries with back-off, the hub's
error shown whole, said once. "Unreachable" is a closed port on 127.0.0.1 (HF_ENDPOINT), with HF_HUB_OFFLINE
unset for these tests only; nothing here touches the real network."""
from __future__ import annotations

import socket
from pathlib import Path

import pytest

from structure_configs import kogpt2_config, save_config
from suite_runner import run_cli, run_suite
from test_model_cache import _fake_hf_cache

ROOT = Path(__file__).resolve().parent.parent


def closed_port_endpoint() -> str:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return f"http://127.0.0.1:{port}"    # nothing listens there any more: connections are refused


@pytest.fixture
def unreachable_hub(monkeypatch, tmp_path):
    """huggingface_hub online by setting, its endpoint a closed port, an empty cache; the probe forgotten."""
    from huggingface_hub import constants

    from kolora_probe.model import source as model_source

    endpoint = closed_port_endpoint()
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.delenv("TRANSFORMERS_OFFLINE", raising=False)
    monkeypatch.setattr(constants, "ENDPOINT", endpoint)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "empty-cache"))
    model_source.reset_hub_status()
    yield endpoint
    model_source.reset_hub_status()


def test_unreachable_hub_is_probed_once_without_retries(unreachable_hub, monkeypatch):
    import huggingface_hub.utils as hub_utils
    import huggingface_hub.utils._http as hub_http

    from kolora_probe.model.loading import fetch_file
    from kolora_probe.model.source import ModelNotFound, ModelSource, hub_status, resolve_model_source

    sleeps: list[float] = []

    def no_backoff(seconds: float) -> None:
        sleeps.append(seconds)
        raise RuntimeError(f"huggingface_hub backed off {seconds} s before retrying")

    monkeypatch.setattr(hub_http.time, "sleep", no_backoff)
    heads: list[str] = []
    real_get_session = hub_utils.get_session

    class CountingSession:
        def __init__(self, inner):
            self._inner = inner

        def head(self, url, **kw):
            heads.append(url)
            return self._inner.head(url, **kw)

        def __getattr__(self, name):
            return getattr(self._inner, name)

    monkeypatch.setattr(hub_utils, "get_session", lambda: CountingSession(real_get_session()))

    messages = []
    for repo in ("kolora-test/missing-a", "kolora-test/missing-b"):
        with pytest.raises(ModelNotFound) as info:
            resolve_model_source(repo)
        messages.append(str(info.value))
    cached = ModelSource("kolora-test/missing-a", "cache", Path("/nonexistent-snapshot"))
    assert fetch_file(cached, "model.safetensors") is None
    assert sleeps == [] and len(heads) == 1, (sleeps, heads)
    status = hub_status(probe=False)
    assert status is not None and not status.reachable and status.endpoint == unreachable_hub
    for msg in messages:
        assert "\n" not in msg
        # the hub's error whole: the exception's own text, not cut mid-word
        assert f"hub {unreachable_hub}: unreachable ({status.reason}), so this run is offline. Fix: " in msg
        assert status.reason.startswith("ConnectError: ") and "refused" in status.reason.lower()


def test_cli_on_a_local_dir_or_a_cached_id_never_asks_the_hub(unreachable_hub, tmp_path, monkeypatch):
    """No probe (so no note) when the config is local or cached; a missing id: one line with the probe's error."""
    from huggingface_hub import constants

    from kolora_probe.model.source import hub_status

    ko = save_config(kogpt2_config(), tmp_path / "ko")
    cache = tmp_path / "hub"
    _fake_hf_cache(cache, "kolora-test/cached-kogpt2", ko)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    for model in (str(ko), "kolora-test/cached-kogpt2"):
        p = run_cli("lora", "--model", model, "--expected-trainable=none", offline=False)
        assert p.returncode == 0, p.stdout + p.stderr
        assert hub_status(probe=False) is None and "unreachable" not in p.stderr, p.stderr
    p = run_cli("lora", "--model", "kolora-test/not-cached", offline=False)
    assert p.returncode == 2
    (line,) = p.stderr.strip().splitlines()
    assert line.startswith("kolora-probe lora: model 'kolora-test/not-cached' (revision main) not found; ")
    assert f"hub {unreachable_hub}: unreachable (ConnectError: " in line and "Retry" not in line


def test_gate_with_unreachable_hub_says_so_once_and_does_not_retry(tmp_path):
    env = {"HF_HUB_OFFLINE": "", "HF_ENDPOINT": closed_port_endpoint(), "HF_HUB_CACHE": str(tmp_path / "cache")}
    run = run_suite("checks/test_model.py", "--model=kolora-test/not-cached", reports=tmp_path / "r", env=env)
    assert run.returncode == 1
    assert "Retrying in" not in run.output and "Retry" not in run.html
    notes = [l for l in run.output.splitlines() if l.startswith("kolora-probe: note: hub ")]
    assert len(notes) == 1 and "is unreachable (ConnectError: " in notes[0] and "works offline" in notes[0], notes
    msg = run.outcome("test_model_found")["message"]
    assert f"hub {env['HF_ENDPOINT']}: unreachable (ConnectError: " in msg
