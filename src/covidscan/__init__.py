"""covidscan: train, compare, evaluate, explain and serve COVID-19 classifiers on chest CT and X-ray.

Subpackages, one concern each: ``data`` (loading, splits, leakage audit), ``models`` (registry and
factory), ``training`` (the trainer), ``evaluation`` (metrics, statistics, reports), ``explain``
(CAMs), ``serving`` (HTTP API, batch prediction, export), ``tracking`` (sweeps, experiment logs).
"""

from covidscan import compat as _compat  # noqa: F401  (must run before anything imports torchvision)

__version__ = "0.1.0"  # the one place the version is written: pyproject.toml reads it from here
