"""Optional dependencies: import one, or say which ``pip install "covidscan[extra]"`` brings it.

The extras (``serve``, ``export``, ``track``, ``pacs``) keep the core install small. Every import of an
extra's module goes through :func:`optional_import`, so a missing one is a one-line user error with
the install command, not a raw ``ModuleNotFoundError`` from deep inside a command.
"""

from __future__ import annotations

import importlib
from types import ModuleType

from covidscan.errors import UserError


class MissingExtraError(UserError, ImportError):
    """An optional dependency is not installed; the message gives the pip command that adds it."""


def optional_import(module: str, *, extra: str) -> ModuleType:
    """Import ``module`` (e.g. ``"fastapi"``, ``"optuna.distributions"``) from the ``extra`` extra.

    Raises :class:`MissingExtraError` naming the install command when the module, or a module it
    needs, cannot be imported.
    """
    try:
        return importlib.import_module(module)
    except ImportError as exc:
        raise MissingExtraError(
            f'{module} is needed here but cannot be imported ({exc}); install it with: pip install "covidscan[{extra}]"'
        ) from exc
