"""The refactoring guard runs as the README says: record digests, then compare against them."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def digests(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(ROOT / "benchmarks" / "model_digests.py"), "--rounds", "1",
                           "--only", "quickstart", *args], capture_output=True, text=True, cwd=ROOT,
                          timeout=300)


def test_model_digests_record_then_compare(tmp_path):
    record = digests("--record", str(tmp_path / "d.json"))
    assert record.returncode == 0, record.stderr
    recorded = json.loads((tmp_path / "d.json").read_text())
    assert list(recorded) == ["quickstart"] and len(recorded["quickstart"]) == 16
    same = digests("--compare", str(tmp_path / "d.json"))
    assert same.returncode == 0 and "same" in same.stdout
    (tmp_path / "d.json").write_text(json.dumps({"quickstart": "0" * 16}))
    different = digests("--compare", str(tmp_path / "d.json"))
    assert different.returncode == 1 and "DIFFERENT" in different.stdout
    shipped = json.loads((ROOT / "benchmarks" / "model_digests.json").read_text())
    assert {"quickstart", "compare-baselines/scaffold", "ggeur-digits/fedavg-ggeur"} <= set(shipped)
