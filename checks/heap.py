"""The gate process's heap: keep CPython's cyclic garbage collector off what the run keeps alive anyway.

A gate process holds millions of long-lived objects: the module state of torch (with torch._dynamo, torch._inductor
and sympy, which bitsandbytes and transformers import), transformers, peft, and the session's model. None of it
becomes garbage, but the cyclic collector re-scans all of it on every full collection during the run, once more in
pytest's unconfigure, and again in the passes at interpreter exit. On a full-size KoGPT-2 gate that was about
15 % of the wall time (6.4 s → 5.5 s, medians of 4 paired runs). So:

* after each check: a collection (it only scans what was created since the last freeze: the check's own objects,
  so its cyclic garbage, GPU tensors included, is freed now), then ``gc.freeze()`` of what is left;
* when the session ends (``pytest_unconfigure``, last): ``gc.unfreeze()``, so a process that runs pytest
  in-process and goes on gets its collector back as it was;
* at interpreter exit (``atexit``): ``gc.freeze()`` — the process is ending; objects are still released by their
  reference counts and module teardown, only the collector's exit passes skip them.
"""
from __future__ import annotations

import atexit
import gc

import pytest

atexit.register(gc.freeze)


@pytest.hookimpl(wrapper=True)
def pytest_runtest_protocol(item, nextitem):  # noqa: ARG001 - pytest's hook signature
    try:
        return (yield)
    finally:
        gc.collect()
        gc.freeze()


@pytest.hookimpl(trylast=True)
def pytest_unconfigure(config) -> None:  # noqa: ARG001
    gc.unfreeze()
