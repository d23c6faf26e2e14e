"""Installed packages against a requirements file (``packaging`` specifiers, ``importlib.metadata``).

Nothing is imported: versions and ``Requires-Dist`` come from the installed distributions' metadata, so the
check is fast and works even when a package is broken at import time. Each distribution's metadata is read once
per process (parsing METADATA dominates the cost of a dependency walk).
"""
from __future__ import annotations

import functools
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path

from packaging.requirements import InvalidRequirement, Requirement
from packaging.utils import canonicalize_name
from packaging.version import InvalidVersion, Version


class RequirementsFileError(ValueError):
    """The requirements file cannot be read or has a line packaging cannot parse."""


@dataclass(frozen=True)
class RequirementStatus:
    name: str                   # canonical distribution name
    specifier: str              # e.g. "==2.13.0" ("" = any version)
    installed: str | None       # installed version, None if missing
    satisfied: bool
    line: int = 0               # line in the requirements file (0 = a dependency, not a line)
    required_by: str | None = None

    @property
    def message(self) -> str:
        want = f"{self.name}{self.specifier}"
        who = f" (required by {self.required_by})" if self.required_by else ""
        if self.installed is None:
            return f"{want}{who} is not installed; fix: pip install '{want}'"
        if not self.satisfied:
            return f"{want}{who} is required but {self.name} {self.installed} is installed; fix: pip install '{want}'"
        return f"{self.name} {self.installed} satisfies {want or self.name}{who}"


@functools.cache
def _distribution(name: str) -> tuple[str | None, tuple[str, ...]]:
    """(installed version or None, its Requires-Dist lines) of a canonical name, read once per process."""
    try:
        dist = metadata.distribution(name)
    except metadata.PackageNotFoundError:
        return None, ()
    md = dist.metadata                                   # parsed once: .version/.requires would parse it again
    return md["Version"], tuple(md.get_all("Requires-Dist") or dist.requires or ())  # requires: egg-info too


def parse_requirements(path: str | Path) -> list[tuple[int, Requirement]]:
    """(line number, Requirement) for every requirement line whose environment marker applies here."""
    p = Path(path)
    try:
        if not p.is_file():
            raise RequirementsFileError(f"{p}: requirements file not found; pass an existing file with --requirements")
        text = p.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        why = exc.reason if isinstance(exc, UnicodeDecodeError) else (exc.strerror or str(exc))
        raise RequirementsFileError(f"{p}: cannot read the requirements file ({why}); pass a pip requirements text "
                                    f"file with --requirements") from None
    out: list[tuple[int, Requirement]] = []
    for no, raw in enumerate(text.splitlines(), start=1):
        line = raw.split(" #", 1)[0].strip()
        if not line or line.startswith("#") or line.startswith("-"):
            continue  # comments and pip options (-r, --index-url, -e) are pip's business, not a package
        try:
            req = Requirement(line)
        except InvalidRequirement as exc:
            raise RequirementsFileError(f"{p}:{no}: cannot parse {line!r} ({exc}); write it as name<specifier>, "
                                        f"e.g. peft>=0.21") from None
        if req.marker is None or req.marker.evaluate():
            out.append((no, req))
    return out


def requirement_status(req: Requirement, line: int = 0, required_by: str | None = None) -> RequirementStatus:
    name = canonicalize_name(req.name)
    version = _distribution(name)[0]
    ok = False
    if version is not None:
        try:
            ok = req.specifier.contains(Version(version), prereleases=True)
        except InvalidVersion:
            ok = not str(req.specifier)
    return RequirementStatus(name, str(req.specifier), version, ok, line, required_by)


def check_requirements(path: str | Path) -> list[RequirementStatus]:
    """One status per requirement line of ``path``."""
    return [requirement_status(req, no) for no, req in parse_requirements(path)]


def _dependencies(dist_name: str, extras: set[str]) -> list[Requirement]:
    out = []
    for text in _distribution(canonicalize_name(dist_name))[1]:
        try:
            r = Requirement(text)
        except InvalidRequirement:
            continue
        if r.marker is not None:
            envs = [{"extra": e} for e in extras] or [{"extra": ""}]
            if not any(r.marker.evaluate(env) for env in envs):
                continue
        out.append(r)
    return out


def check_dependency_graph(path: str | Path) -> list[RequirementStatus]:
    """Like ``pip check`` restricted to the closure of the file's packages: every Requires-Dist satisfied.

    Returns the status of every dependency edge (one per (package, dependency) pair) reachable from the file.
    """
    seen: set[str] = set()
    queue = [(req.name, set(req.extras)) for _no, req in parse_requirements(path)]
    edges: list[RequirementStatus] = []
    while queue:
        name, extras = queue.pop()
        key = canonicalize_name(name) + "[" + ",".join(sorted(extras)) + "]"
        if key in seen:
            continue
        version = _distribution(canonicalize_name(name))[0]
        if version is None:
            continue
        seen.add(key)
        parent = f"{canonicalize_name(name)} {version}"
        for dep in _dependencies(name, extras):
            edges.append(requirement_status(dep, 0, parent))
            queue.append((dep.name, set(dep.extras)))
    return edges


def write_declared_requirements(path: str | Path, distribution: str = "kolora-probe") -> Path:
    """Write the installed ``distribution``'s own requirements (its ``Requires-Dist`` without extras) to ``path``:
    what the environment checks verify where no requirements.txt is at hand (kolora-probe installed from a wheel)."""
    p = Path(path)
    try:
        declared = metadata.requires(distribution) or []
    except metadata.PackageNotFoundError:
        raise RequirementsFileError(f"{distribution} is not installed as a distribution, so it has no declared "
                                    f"requirements; pass a requirements file with --requirements") from None
    lines = [r for r in declared if "extra ==" not in r]
    p.write_text(f"# {distribution}'s declared requirements (installed metadata)\n" + "\n".join(lines) + "\n",
                 encoding="utf-8")
    return p
