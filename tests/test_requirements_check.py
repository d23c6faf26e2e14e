"""Requirements vs installed distributions, and the dependency graph."""
from __future__ import annotations

import pytest

from kolora_probe.env.requirements import (RequirementsFileError, check_dependency_graph, check_requirements,
                                             parse_requirements)


def req_file(tmp_path, text):
    p = tmp_path / "requirements.txt"
    p.write_text(text)
    return p


def test_satisfied_missing_and_wrong_version(tmp_path):
    import packaging

    statuses = check_requirements(req_file(tmp_path, f"packaging=={packaging.__version__}\n"
                                                     "kolora-no-such-package>=1\npytest<1\n"))
    by = {s.name: s for s in statuses}
    assert by["packaging"].satisfied
    assert not by["kolora-no-such-package"].satisfied and by["kolora-no-such-package"].installed is None
    assert "is not installed; fix: pip install 'kolora-no-such-package>=1'" in by["kolora-no-such-package"].message
    assert not by["pytest"].satisfied and "is required but pytest" in by["pytest"].message
    assert [s.line for s in statuses] == [1, 2, 3]


def test_comments_options_and_markers_are_skipped(tmp_path):
    reqs = parse_requirements(req_file(tmp_path, "# c\n-r other.txt\n--index-url x\npytest  # inline\n"
                                                 "foo; python_version < '3'\n\n"))
    assert [r.name for _, r in reqs] == ["pytest"]


def test_unparseable_line_names_file_and_line(tmp_path):
    with pytest.raises(RequirementsFileError, match=r"requirements.txt:2: cannot parse"):
        parse_requirements(req_file(tmp_path, "pytest\n!!bad\n"))


def test_dependency_graph_walks_transitively(tmp_path):
    edges = check_dependency_graph(req_file(tmp_path, "pytest-html\n"))
    parents = {e.required_by.split()[0] for e in edges}
    names = {e.name for e in edges}
    assert "pytest-html" in parents and "pytest" in names      # direct
    assert "pytest" in parents and "pluggy" in names            # transitive through pytest
    assert all(e.satisfied for e in edges)
