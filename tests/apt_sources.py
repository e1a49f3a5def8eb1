"""The Debian mirror this machine's apt already uses (``/etc/apt/sources.list`` and
``/etc/apt/sources.list.d/*.sources`` / ``*.list``), so that nothing in the repository names a mirror host.

    python3 tests/apt_sources.py        # prints it (.ci/setup.d/30-aarch64.sh, tests/test_aarch64.py)

``$FEDMOE_DEBIAN_MIRROR`` overrides it. Standard library only: the CI set-up runs it before any install.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

APT = Path("/etc/apt")
SIDE_SUITES = ("-security", "-updates", "-backports", "-proposed")  # not the main archive


def debian_mirror(apt: Path = APT) -> str:
    """The URI of the first ``deb`` source for a main suite (``$FEDMOE_DEBIAN_MIRROR`` if set).

    Raises:
        LookupError: no such source (set ``FEDMOE_DEBIAN_MIRROR``).
    """
    if os.environ.get("FEDMOE_DEBIAN_MIRROR"):
        return os.environ["FEDMOE_DEBIAN_MIRROR"]
    files = [apt / "sources.list", *sorted((apt / "sources.list.d").glob("*.list"))]
    entries = [e for f in files if f.is_file() for e in _one_line_entries(f.read_text())]
    entries += [e for f in sorted((apt / "sources.list.d").glob("*.sources")) for e in _deb822_entries(f.read_text())]
    for uri, suites in entries:
        if any(not s.endswith(SIDE_SUITES) for s in suites):
            return uri.rstrip("/")
    raise LookupError(f"no deb source for a main suite in {apt}; set FEDMOE_DEBIAN_MIRROR to a Debian mirror URL")


def _one_line_entries(text: str):
    """``(uri, [suite])`` of each ``deb [options] URI SUITE COMPONENT...`` line."""
    for line in text.splitlines():
        words = line.split("#", 1)[0].split()
        if words[:1] != ["deb"]:
            continue
        if len(words) > 1 and words[1].startswith("["):  # [arch=... signed-by=...]
            close = next((i for i, w in enumerate(words) if w.endswith("]")), len(words) - 1)
            words = [words[0], *words[close + 1 :]]
        if len(words) >= 3:
            yield words[1], [words[2]]


def _deb822_entries(text: str):
    """``(uri, suites)`` of each enabled ``Types: deb`` paragraph."""
    for paragraph in text.split("\n\n"):
        fields = {}
        for line in paragraph.splitlines():
            if line.strip() and not line.startswith(("#", " ", "\t")) and ":" in line:
                key, value = line.split(":", 1)
                fields[key.strip().lower()] = value.split()
        if "deb" in fields.get("types", []) and fields.get("enabled", ["yes"]) != ["no"] and fields.get("uris"):
            yield fields["uris"][0], fields.get("suites", [])


if __name__ == "__main__":
    try:
        print(debian_mirror())
    except LookupError as exc:
        sys.exit(f"error: {exc}")
