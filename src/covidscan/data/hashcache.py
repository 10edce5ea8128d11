"""Per-file cache of what the audit learns about an image (SHA-256, perceptual hash, size, mode).

Hashing is the slow part of ``covidscan data audit`` and of the trainer's pre-epoch leakage check;
a second audit, or a training run on data already audited, should not decode every image again.
Entries are keyed by the resolved path, the file's size and modification time (for a DICOM series
folder: its file count, total size and newest modification time) and the hash settings, so an
edited or replaced file is hashed afresh. The store is one SQLite file in the covidscan cache
directory (``$COVIDSCAN_CACHE``, default ``~/.cache/covidscan``): the standard library's, safe for
several processes at once, and looked up in batches so a million files need no big dict in RAM.
A cache that cannot be opened or written is skipped with a warning; it never stops an audit.
"""

from __future__ import annotations

import logging
import os
import sqlite3
from collections.abc import Iterator, Sequence
from contextlib import closing
from pathlib import Path

logger = logging.getLogger(__name__)

_SCHEMA = """
CREATE TABLE IF NOT EXISTS facts (
    path TEXT NOT NULL, settings TEXT NOT NULL, size INTEGER NOT NULL, mtime_ns INTEGER NOT NULL,
    sha256 TEXT NOT NULL, phash BLOB NOT NULL, dims TEXT, mode TEXT,
    PRIMARY KEY (path, settings)
)
"""
_LOOKUP_BATCH = 500  # SQLite's default limit on bound variables is far above this

FileKey = tuple[str, int, int]  # resolved path, size, modification time (ns)
Entry = tuple[str, bytes, str | None, str | None]  # sha256, phash bytes, dims, mode


def cache_dir() -> Path:
    """covidscan's cache directory: ``$COVIDSCAN_CACHE`` or ``~/.cache/covidscan``."""
    return Path(os.environ.get("COVIDSCAN_CACHE", Path.home() / ".cache" / "covidscan"))


def file_key(path: str | Path) -> FileKey:
    """What identifies one version of a file (or of a series folder: count, total size, newest mtime)."""
    path = Path(path).resolve()
    if path.is_dir():
        stats = [entry.stat() for entry in os.scandir(path) if entry.is_file()]
        return str(path), sum(s.st_size for s in stats) + len(stats), max((s.st_mtime_ns for s in stats), default=0)
    stat = path.stat()
    return str(path), stat.st_size, stat.st_mtime_ns


class HashCache:
    """``lookup`` / ``store`` of :data:`Entry` rows for one hash setting (e.g. ``"phash16-v1"``)."""

    def __init__(self, settings: str, path: str | Path | None = None) -> None:
        self.settings = settings
        self.path = Path(path) if path is not None else cache_dir() / "audit-hashes.sqlite"
        self._usable = True

    def _connect(self) -> sqlite3.Connection:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        connection = sqlite3.connect(self.path, timeout=60)
        connection.execute("PRAGMA journal_mode=WAL")  # readers never wait for another process's writer
        connection.execute(_SCHEMA)
        return connection

    def _disable(self, exc: Exception) -> None:
        logger.warning("hash cache %s not used (%s); images are hashed without it", self.path, exc)
        self._usable = False

    def lookup(self, keys: Sequence[FileKey]) -> dict[int, Entry]:
        """Cached entries for ``keys`` whose size and modification time still match, by position."""
        found: dict[int, Entry] = {}
        if not self._usable or not keys:
            return found
        try:
            with closing(self._connect()) as connection:
                for start in range(0, len(keys), _LOOKUP_BATCH):
                    batch = keys[start : start + _LOOKUP_BATCH]
                    rows = connection.execute(
                        "SELECT path, size, mtime_ns, sha256, phash, dims, mode FROM facts "
                        f"WHERE settings = ? AND path IN ({','.join('?' * len(batch))})",
                        (self.settings, *(key[0] for key in batch)),
                    ).fetchall()
                    by_path = {row[0]: row for row in rows}
                    for offset, (path, size, mtime) in enumerate(batch):
                        row = by_path.get(path)
                        if row is not None and row[1] == size and row[2] == mtime:
                            found[start + offset] = (row[3], bytes(row[4]), row[5], row[6])
        except (sqlite3.Error, OSError) as exc:
            self._disable(exc)
        return found

    def store(self, items: Iterator[tuple[FileKey, Entry]] | Sequence[tuple[FileKey, Entry]]) -> None:
        """Insert or replace entries (one transaction)."""
        rows = [(k[0], self.settings, k[1], k[2], *entry) for k, entry in items]
        if not self._usable or not rows:
            return
        try:
            with closing(self._connect()) as connection, connection:
                connection.executemany("INSERT OR REPLACE INTO facts VALUES (?, ?, ?, ?, ?, ?, ?, ?)", rows)
        except (sqlite3.Error, OSError) as exc:
            self._disable(exc)
