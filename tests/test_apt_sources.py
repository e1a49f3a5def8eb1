"""``tests/apt_sources.py``: the Debian mirror comes from the machine's apt sources, never from the repository."""

from __future__ import annotations

import pytest
from apt_sources import debian_mirror

DEB822 = """Types: deb
# http://snapshot.debian.org/archive/debian-security/20250520T000000Z
URIs: http://mirror.example/debian-security
Suites: bookworm-security
Components: main

Types: deb deb-src
URIs: http://mirror.example/debian/
Suites: bookworm bookworm-updates
Components: main
"""


def test_the_main_suite_s_uri_from_deb822_sources(tmp_path, monkeypatch):
    monkeypatch.delenv("FEDMOE_DEBIAN_MIRROR", raising=False)
    (tmp_path / "sources.list.d").mkdir()
    (tmp_path / "sources.list.d" / "debian.sources").write_text(DEB822)
    assert debian_mirror(tmp_path) == "http://mirror.example/debian"


def test_one_line_sources_with_options_come_first(tmp_path, monkeypatch):
    monkeypatch.delenv("FEDMOE_DEBIAN_MIRROR", raising=False)
    (tmp_path / "sources.list.d").mkdir()
    (tmp_path / "sources.list.d" / "debian.sources").write_text(DEB822)
    (tmp_path / "sources.list").write_text(
        "# deb http://old.example/debian buster main\n"
        "deb [arch=amd64 signed-by=/k.gpg] http://local.example/debian trixie main\n"
    )
    assert debian_mirror(tmp_path) == "http://local.example/debian"


def test_the_environment_overrides_and_no_source_is_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.setenv("FEDMOE_DEBIAN_MIRROR", "http://override.example/debian")
    assert debian_mirror(tmp_path) == "http://override.example/debian"
    monkeypatch.delenv("FEDMOE_DEBIAN_MIRROR")
    with pytest.raises(LookupError, match="set FEDMOE_DEBIAN_MIRROR"):
        debian_mirror(tmp_path)
