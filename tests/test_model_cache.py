"""A hub id served from the Hugging Face cache with HF_HUB_OFFLINE=1, through the real suite (subprocess)."""
from __future__ import annotations

import shutil

from suite_runner import run_suite

SUITE = ("checks/test_model.py", "checks/test_tokenizer.py")


def _fake_hf_cache(cache, repo_id: str, src) -> None:
    """Lay ``src``'s files out like huggingface_hub's cache (snapshots/<commit>, refs/main)."""
    commit = "0123456789abcdef0123456789abcdef01234567"
    repo = cache / ("models--" + repo_id.replace("/", "--"))
    snap = repo / "snapshots" / commit
    snap.mkdir(parents=True)
    for f in src.iterdir():
        shutil.copy(f, snap / f.name)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)


def test_suite_loads_a_hub_id_from_the_hf_cache_offline(tmp_path, model_zoo):
    cache = tmp_path / "hub"
    _fake_hf_cache(cache, "kolora-test/tiny-kogpt2", model_zoo.tiny)
    env = {"HF_HUB_CACHE": str(cache), "HF_HUB_OFFLINE": "1"}
    run = run_suite(*SUITE, "--model=kolora-test/tiny-kogpt2", reports=tmp_path / "r", env=env)
    assert run.returncode == 0, run.output[-3000:]
    ev = {e["name"]: e["actual"] for e in run.outcome("test_model_found")["evidence"]}
    assert ev["model_source_kind"] == "cache" and "snapshots" in ev["model_path"]
    # an id that is not cached is reported, never replaced by the cached one
    run = run_suite(*SUITE, "--model=kolora-test/other-model", reports=tmp_path / "r2", env=env)
    entry = run.outcome("test_model_found")
    assert run.returncode == 1 and entry["outcome"] == "failed"
    assert entry["message"].startswith("model not found: model 'kolora-test/other-model'")
    assert "HF_HUB_OFFLINE" in entry["message"] and "--model DIR" in entry["message"]
    # every check that needs the model points at this one root cause
    assert run.outcome("test_korean_round_trip_lossless")["message"] == "blocked: model not found — see test_model_found"
