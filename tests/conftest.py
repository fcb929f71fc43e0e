"""Test setup: quiet Flower/Ray, the shared offline datasets, and a private download cache."""

import io
import os
import threading
from functools import partial
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

for _key, _value in {"FLWR_TELEMETRY_ENABLED": "0", "FLWR_DISABLE_UPDATE_CHECK": "1",
                     "RAY_USAGE_STATS_ENABLED": "0"}.items():
    os.environ.setdefault(_key, _value)

SHARED_DATASETS = Path(__file__).resolve().parents[2] / "shared" / "datasets"
if "FEDSIM_DATA_DIR" not in os.environ and SHARED_DATASETS.is_dir():
    os.environ["FEDSIM_DATA_DIR"] = str(SHARED_DATASETS)


@pytest.fixture(autouse=True)
def _private_cache(tmp_path_factory, monkeypatch):
    monkeypatch.setenv("FEDSIM_CACHE_DIR", str(tmp_path_factory.mktemp("cache")))


@pytest.fixture
def data_dir() -> Path:
    root = os.environ.get("FEDSIM_DATA_DIR")
    if not root or not (Path(root) / "fashion-mnist").is_dir():
        pytest.skip("needs the offline dataset folder (FEDSIM_DATA_DIR)")
    return Path(root)


@pytest.fixture
def make_method():
    """A method's server half as the engine builds it: make_method(sizes, "strategy.name=x", ...)."""
    import numpy as np

    from fedsim.config import load_config
    from fedsim.method import RunInfo
    from fedsim.registry import build_method

    def make(sizes, *overrides, param_names=("w",)):
        config = load_config(None, list(overrides))
        run = RunInfo(list(param_names), np.asarray(sizes), config.client, config.experiment.seed)
        return build_method(config, run)

    return make


@pytest.fixture
def http_server(tmp_path):
    """A file server on 127.0.0.1 that honours Range requests for resumed downloads."""

    class RangeHandler(SimpleHTTPRequestHandler):
        def log_message(self, *args):
            pass

        def send_head(self):
            rng = self.headers.get("Range")
            path = self.translate_path(self.path)
            if not rng:
                return super().send_head()
            start = int(rng.split("=")[1].split("-")[0])
            data = open(path, "rb").read()
            self.send_response(206)
            self.send_header("Content-Length", str(len(data) - start))
            self.end_headers()
            return io.BytesIO(data[start:])

    served = tmp_path / "served"
    served.mkdir()
    server = ThreadingHTTPServer(("127.0.0.1", 0), partial(RangeHandler, directory=str(served)))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield served, f"http://127.0.0.1:{server.server_address[1]}/"
    server.shutdown()
    server.server_close()
