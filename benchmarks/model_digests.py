"""Digests of the final model of every experiment spec's cells after a few rounds: a refactoring
guard. Record before a change, compare after it:

    python benchmarks/model_digests.py --record digests.json
    python benchmarks/model_digests.py --compare digests.json

Each spec in experiments/ contributes its base experiment (or, for a comparison, the first grid
cell of every variant), run in-process for `--rounds` rounds (warm-up encoders for 1 round).
Prints one line per cell: its name, digest and, when comparing, whether it matches.
`benchmarks/model_digests.json` holds the digests recorded before the method-unit engine
(torch 2.13 CPU, 2 threads) on the machine that recorded them. Digests are bit for bit, so they
depend on the CPU's kernels too: on another machine even the commit that recorded them gives
other digests. Record your own before a change.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
import tempfile
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]


def digest(arrays: dict[str, np.ndarray]) -> str:
    """SHA-256 over the arrays' names and bytes, in name order."""
    h = hashlib.sha256()
    for name in sorted(arrays):
        h.update(name.encode())
        h.update(np.ascontiguousarray(arrays[name]).tobytes())
    return h.hexdigest()[:16]


def cells(rounds: int, out: Path):
    """(label, config) for every spec's base experiment or first cell of each variant."""
    from fedsim.compare import load_comparison
    from fedsim.config import load_config, read_toml

    fixed = [f"experiment.rounds={rounds}", "engine.backend=inprocess", "data.warmup.rounds=1",
             "output.save_model=true", f"output.dir={out}"]
    for spec in sorted((ROOT / "experiments").glob("*.toml")):
        if "compare" not in read_toml(spec):
            config = load_config(spec, fixed + [f"output.run_dir={out / spec.stem}"])
            yield spec.stem, config
            continue
        _, grid = load_comparison(spec, fixed)
        seen = set()
        for cell in grid:
            if cell.variant not in seen:
                seen.add(cell.variant)
                yield f"{spec.stem}/{cell.variant}", cell.config


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    mode = parser.add_mutually_exclusive_group(required=True)
    mode.add_argument("--record", type=Path)
    mode.add_argument("--compare", type=Path)
    parser.add_argument("--only", default="", help="run only cells whose label contains this")
    args = parser.parse_args()
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    from fedsim.runner import run_experiment

    expected = json.loads(args.compare.read_text()) if args.compare else {}
    found, mismatches = {}, 0
    with tempfile.TemporaryDirectory() as tmp:
        for label, config in cells(args.rounds, Path(tmp)):
            if args.only not in label:
                continue
            summary = run_experiment(config)
            with np.load(summary.run_dir / "model.npz") as model:
                found[label] = digest({k: model[k] for k in model.files})
            verdict = ""
            if args.compare:
                same = expected.get(label) == found[label]
                mismatches += not same
                verdict = "same" if same else f"DIFFERENT (was {expected.get(label)})"
            print(f"{label:40s} {found[label]}  {verdict}", flush=True)
    if args.record:
        args.record.write_text(json.dumps(found, indent=1) + "\n")
    sys.exit(1 if mismatches else 0)


if __name__ == "__main__":
    main()
