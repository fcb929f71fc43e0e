"""The same project through fedsim's Python API, passing the function and class themselves.
Run from the repository root: python examples/lenet-digits/notebook.py"""

import sys
from pathlib import Path

import fedsim

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from data import shifted_digits  # noqa: E402
from model import lenet  # noqa: E402
from strategy import TrimmedMean  # noqa: E402

if __name__ == "__main__":
    summary = fedsim.run(HERE / "experiment.toml", "engine.backend=inprocess",
                         strategy={"name": TrimmedMean}, model={"name": lenet},
                         data={"dataset": shifted_digits})
    print(summary.rounds[["round", "test_accuracy", "train_loss"]].tail(3).to_string(index=False))
    print("run directory:", summary.run_dir)
