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
    shows, with its example value; ``-v`` shows them all (``enabled = False``).

    pydicom also *warns* each of them, right after logging it, and a warning is what a Python-API user
    without logging set up sees: for messages starting with ``also_warned``, a repeated kind also gets a
    warnings filter ignoring that kind from the library's modules, so the warnings fold the same way."""

    _QUOTED = re.compile(r"'[^']*'")

    def __init__(self, also_warned: str | None = None) -> None:
        super().__init__()
        self.also_warned = also_warned
        self.enabled = True
        self._seen: set[str] = set()
        self._lock = threading.Lock()

    def filter(self, record: logging.LogRecord) -> bool:
        if not self.enabled:
            return True
        message = record.getMessage()
        kind = self._QUOTED.sub("'...'", message)
        with self._lock:
            if kind not in self._seen:
                self._seen.add(kind)
                return True
            if self.also_warned is not None and message.startswith(self.also_warned):
                self._ignore_warnings_like(message, record.name.partition(".")[0])
        return False

    def _ignore_warnings_like(self, message: str, library: str) -> None:
        """Checked on every repeat, not remembered: a ``warnings.catch_warnings`` block drops the filter
        on exit. Added only when absent, because each change to the filters lets every other warning
        already shown once show again."""
        pattern = self._QUOTED.sub(lambda _: "'[^']*'", re.escape(message))
        module = rf"{re.escape(library)}\."
        entry = ("ignore", re.compile(pattern, re.I), Warning, re.compile(module), 0)  # as filterwarnings stores it
        if entry not in warnings.filters:
            warnings.filterwarnings("ignore", message=pattern, module=module)

    def reset(self) -> None:
        """Forget the kinds seen and a ``-v`` choice. (Warnings filters already added stay: the warnings
        module has no public way to take one out; a test's ``catch_warnings`` restores its own.)"""
        with self._lock:
            self._seen.clear()
            self.enabled = True


dicom_notices = OncePerKindFilter(also_warned="Invalid value for VR")


def fold_dicom_notices() -> None:
    """One notice per kind of DICOM header complaint wherever covidscan reads DICOM (API, scripts, CLI),
    not one (or two) per file. Idempotent and cheap, so the DICOM reader calls it before each read."""
    logging.getLogger("pydicom").addFilter(dicom_notices)


def reset_warnings() -> None:
    """Forget every key, so each check warns again on its next occurrence."""
    warn_once.reset()
    dicom_notices.reset()
