"""Local training with the model in contiguous or channels-last memory order (`engine.channels_last`),
side by side, for the built-in convolutional models on 28x28 one-channel images.

Each case is one client's `train_locally` (the loop every method shares: plain SGD with momentum
and weight decay) over 640 random images, on one thread, best of `--repeats`. The table shows the
milliseconds per step in each order and their ratio (below 1: channels-last is faster).

    python benchmarks/memory_format.py [--repeats 3]

The last line printed is JSON with the figures.
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from clients.runtime import worker_model
from clients.training import train_locally
from fedsim.config import load_config
from fedsim.data.tensors import LocalData

MODELS = ["lenet5", "cnn", "resnet"]
BATCHES = [10, 64]
EXAMPLES = 640


def step_ms(name: str, batch: int, channels_last: bool, repeats: int) -> float:
    """Milliseconds per local step, best of `repeats` epochs over EXAMPLES images."""
    config = load_config(None, [f"model.name={name}", f"engine.channels_last={str(channels_last).lower()}",
                                f"client.batch_size={batch}", "client.momentum=0.9",
                                "client.weight_decay=1e-5"])
    model = worker_model(config, (1, 28, 28), 10)
    generator = torch.Generator().manual_seed(0)
    x = torch.rand(EXAMPLES, 1, 28, 28, generator=generator)
    y = torch.randint(0, 10, (EXAMPLES,), generator=generator)
    data = LocalData(x, y, x[:0], y[:0])
    steps = EXAMPLES // batch
    train_locally(model, data, config.client, [], 0, 0.01, steps=2)  # warm-up
    best = float("inf")
    for _ in range(repeats):
        started = time.perf_counter()
        train_locally(model, data, config.client, [], 0, 0.01, steps=steps)
        best = min(best, (time.perf_counter() - started) / steps)
    return 1e3 * best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    torch.set_num_threads(1)
    rows = []
    print(f"{'model':<8} {'batch':>5} {'contiguous ms':>14} {'channels-last ms':>17} {'ratio':>6}")
    for name in MODELS:
        for batch in BATCHES:
            plain = step_ms(name, batch, False, args.repeats)
            last = step_ms(name, batch, True, args.repeats)
            rows.append({"model": name, "batch": batch, "contiguous_ms": round(plain, 3),
                         "channels_last_ms": round(last, 3), "ratio": round(last / plain, 3)})
            print(f"{name:<8} {batch:>5} {plain:>14.2f} {last:>17.2f} {last / plain:>6.2f}", flush=True)
    print(json.dumps(rows))


if __name__ == "__main__":
    main()
