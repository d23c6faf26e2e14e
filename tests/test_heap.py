"""The gate's heap policy (checks/heap.py): each check's cyclic garbage is freed when it ends, what survives is
frozen while the session runs, and the collector is handed back unfrozen when the session ends (a process that
runs pytest in-process goes on with a normal collector)."""
from __future__ import annotations

import gc
import os

import pytest

CHECKS = '''
import gc
import weakref

import pytest


class Node:
    pass


def test_makes_cyclic_garbage():
    a, b = Node(), Node()
    a.other, b.other = b, a                      # a reference cycle: only the cyclic collector can free it
    pytest.ref = weakref.ref(a)
    gc.freeze()                                  # as an earlier check would have: the cycle is not frozen by it
    gc.unfreeze()


def test_the_cycle_was_freed_and_survivors_are_frozen():
    assert pytest.ref() is None, "the previous check's cyclic garbage is still alive"
    assert gc.get_freeze_count() > 0, "nothing was frozen after the previous check"
'''


def test_check_garbage_freed_survivors_frozen_and_unfrozen_at_the_end(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "test_heap_probe.py").write_text(CHECKS, encoding="utf-8")
    gc.unfreeze()
    before = gc.get_freeze_count()
    code = pytest.main([str(tmp_path / "test_heap_probe.py"), "-q", "-p", "no:cacheprovider", "-c", os.devnull,
                        "--rootdir", str(tmp_path), "--import-mode=importlib", "-p", "kolora_probe_checks.heap"])
    assert code == 0
    assert before == 0 and gc.get_freeze_count() == 0     # handed back unfrozen


def test_without_the_policy_the_probe_fails(tmp_path, monkeypatch):
    """The probe above can fail: without the heap plugin nothing is frozen after a check."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "test_heap_probe.py").write_text(CHECKS, encoding="utf-8")
    gc.unfreeze()
    code = pytest.main([str(tmp_path / "test_heap_probe.py"), "-q", "-p", "no:cacheprovider", "-c", os.devnull,
                        "--rootdir", str(tmp_path), "--import-mode=importlib"])
    assert code == 1
