"""Warn once: protective checks speak once per process, not once per epoch, fold or batch.

Also the one wording of the research-use notice that every verdict carries (API, web page, CSV, DICOM).

The keys already warned about live in one :class:`WarnOnce` registry object instead of a hidden
module-level set, so a notebook that wants to see a warning again, or a test suite that must not
depend on which test ran first, calls :func:`reset_warnings`.
"""

from __future__ import annotations

import logging
import re
import threading
import warnings

RESEARCH_USE_NOTICE = (
    "Research use only: covidscan is not a medical device and its output is not a diagnosis; "
    "do not use it to make decisions about a patient."
)


class WarnOnce:
    """Issue ``warnings.warn(message, category)`` the first time ``key`` is seen, then stay quiet."""

    def __init__(self) -> None:
        self._seen: set[str] = set()
        self._lock = threading.Lock()

    def __call__(self, key: str, message: str, category: type[Warning] = UserWarning, stacklevel: int = 3) -> bool:
        """Warn unless ``key`` was warned about since the last reset; returns whether it warned."""
        with self._lock:
            if key in self._seen:
                return False
            self._seen.add(key)
        warnings.warn(message, category, stacklevel=stacklevel)
        return True

    def reset(self) -> None:
        with self._lock:
            self._seen.clear()


warn_once = WarnOnce()


class OncePerKindFilter(logging.Filter):
    """Let a library's log message through once per kind (its text with quoted values blanked).

    pydicom logs "Invalid value for VR UI: '<uid>'" for every file of a de-identified series whose
    UIDs are UUIDs: hundreds of identical lines for one harmless fact. The first of each kind still
    shows, with its example value; ``-v`` shows them all."""

    _QUOTED = re.compile(r"'[^']*'")

    def __init__(self) -> None:
        super().__init__()
        self._seen: set[str] = set()
        self._lock = threading.Lock()

    def filter(self, record: logging.LogRecord) -> bool:
        kind = self._QUOTED.sub("'...'", record.getMessage())
        with self._lock:
            if kind in self._seen:
                return False
            self._seen.add(kind)
        return True


def reset_warnings() -> None:
    """Forget every key, so each check warns again on its next occurrence."""
    warn_once.reset()
