"""Bring your own: load a user's strategy, model, dataset or loss term named by an import string,
`"package.module:Name"` or `"path/to/file.py:Name"`, or registered directly from Python."""

from __future__ import annotations

import hashlib
import importlib
import importlib.util
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from fedsim.errors import ConfigError

_DIRECT: dict[str, Any] = {}  # objects handed over in this process by the Python API
DIRECT = "direct:"  # the prefix of their names
_FILES: dict[str, Path] = {}  # module name -> the plugin file it was loaded from
APP = "@app/"  # a file inside the app bundle, wherever this process's copy of it is
APP_ROOT = Path(__file__).resolve().parents[1]  # the app bundle (or source tree) holding fedsim/


LIBRARY_SOURCES = ("hf:", "imagefolder:", "csv:", "parquet:")  # data read with `datasets`
BUILT_IN_PREFIXES = ("flwr:", *LIBRARY_SOURCES)


def is_plugin(name: str) -> bool:
    """Whether a name is an import string rather than a built-in name."""
    return ":" in name and not name.startswith(BUILT_IN_PREFIXES)


def is_process_local(name: str) -> bool:
    """Whether an import string names an object only this process holds (see `register`)."""
    return name.startswith(DIRECT)


def register(obj: Any) -> str:
    """The import string of a class or function passed from Python: its module and name when a
    worker process can import it, else a name valid in this process only (in-process backend)."""
    module, qualname = getattr(obj, "__module__", ""), getattr(obj, "__qualname__", "")
    if module in _FILES and "<locals>" not in qualname:  # loaded from a file: name the file
        return f"{_FILES[module]}:{qualname}"
    if module and module != "__main__" and "<locals>" not in qualname:
        return f"{module}:{qualname}"
    key = f"{DIRECT}{qualname or type(obj).__name__}-{id(obj):x}"
    _DIRECT[key] = obj
    return key


def _module_from_file(path: Path, label: str):
    if not path.is_file():
        raise ConfigError(f"{label}: file {path} not found")
    stamp = f"{path.resolve()}:{path.stat().st_mtime_ns}"  # an edited file loads anew
    module_name = "fedsim_plugin_" + hashlib.sha1(stamp.encode()).hexdigest()[:12]
    if module_name in sys.modules:
        return sys.modules[module_name]
    _FILES[module_name] = path.resolve()
    spec = importlib.util.spec_from_file_location(module_name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[module_name] = module
    folder = str(path.resolve().parent)  # the user's project: its sibling modules import too
    if folder not in sys.path:
        sys.path.append(folder)
    try:
        spec.loader.exec_module(module)
    except Exception as exc:
        del sys.modules[module_name]
        raise ConfigError(f"{label}: {path} does not import: {type(exc).__name__}: {exc}") from None
    return module


def load_object(name: str, key: str) -> Any:
    """The object an import string names; `key` (e.g. "strategy.name") labels every error."""
    if name in _DIRECT:
        return _DIRECT[name]
    if is_process_local(name):
        raise ConfigError(f"{key} = '{name}' was passed from Python in another process; pass an "
                          "importable object (defined in a module, not in __main__) to run on "
                          "Ray workers, or use engine.backend = 'inprocess'")
    where, _, attribute = name.rpartition(":")
    if not where or not attribute:
        raise ConfigError(f"{key} = '{name}' is not an import string 'package.module:Name' or "
                          "'path/to/file.py:Name'")
    if where.endswith(".py"):
        path = APP_ROOT / where[len(APP):] if where.startswith(APP) else Path(where).expanduser()
        module = _module_from_file(path, f"{key} = '{name}'")
    else:
        if os.getcwd() not in sys.path:  # like `python -m`: the working directory's modules import
            sys.path.append(os.getcwd())
        try:
            module = importlib.import_module(where)
        except Exception as exc:
            raise ConfigError(f"{key} = '{name}': module '{where}' does not import: "
                              f"{type(exc).__name__}: {exc}") from None
    obj = module
    for part in attribute.split("."):
        if not hasattr(obj, part):
            raise ConfigError(f"{key} = '{name}': {where} has no attribute '{attribute}'")
        obj = getattr(obj, part)
    return obj


PLUGIN_KEYS = (("strategy", "name"), ("model", "name"), ("data", "dataset"))  # + objectives' keys


def map_plugins(raw: dict[str, Any], change: Callable[[str, Any], Any]) -> dict[str, Any]:
    """Replace, in a raw spec, each value that can name a plugin (strategy.name, model.name,
    data.dataset and the keys of client.objectives) by `change(dotted key, value)`."""
    for section, key in PLUGIN_KEYS:
        if isinstance(raw.get(section), dict) and key in raw[section]:
            raw[section][key] = change(f"{section}.{key}", raw[section][key])
    objectives = raw.get("client", {}).get("objectives") if isinstance(raw.get("client"), dict) else None
    if isinstance(objectives, dict):
        raw["client"]["objectives"] = {change(f"client.objectives.{k}", k): v for k, v in objectives.items()}
    return raw


def _rewrite_file_plugins(raw: dict[str, Any], rewrite: Callable[[Path], str | None]) -> dict[str, Any]:
    """Apply `rewrite(path)` (a new path text, or None to keep it) to every `file.py:Name`
    plugin of a raw spec (strategy, model, dataset, local objectives)."""

    def fix(key: str, value: Any) -> Any:
        if isinstance(value, str) and is_plugin(value) and not value.startswith(APP):
            where, _, attribute = value.rpartition(":")
            if where.endswith(".py") and (new := rewrite(Path(where).expanduser())) is not None:
                return f"{new}:{attribute}"
        return value

    return map_plugins(raw, fix)


def absolute_source(name: str, base: Path) -> str:
    """A data source naming a relative path (`csv:data.csv`) made absolute against `base`; other
    names unchanged (`hf:` also takes hub names: only a path that exists there is rewritten)."""
    kind, _, where = name.partition(":")
    if not (name.startswith(LIBRARY_SOURCES) and where) or Path(where).is_absolute():
        return name
    path = (base / where).resolve()
    return f"{kind}:{path}" if kind != "hf" or path.exists() else name


def absolute_file_plugins(raw: dict[str, Any], base: Path) -> dict[str, Any]:
    """Make `file.py:Name` plugin paths and the paths of data sources (`csv:data.csv`) in a raw
    spec absolute, relative to the spec's folder, so they mean the same in every worker process."""

    def absolute(path: Path) -> str | None:
        return None if path.is_absolute() else str((base / path).resolve())

    data = raw.get("data")
    if isinstance(data, dict) and isinstance(data.get("dataset"), str):
        data["dataset"] = absolute_source(data["dataset"], base)
    return _rewrite_file_plugins(raw, absolute)


def app_relative_file_plugins(raw: dict[str, Any]) -> dict[str, Any]:
    """Deployed: name plugin files inside the app bundle as `@app/<path in the bundle>`, so every
    node finds them in its own copy of the bundle."""

    def inside(path: Path) -> str | None:
        path = path.resolve()
        return APP + path.relative_to(APP_ROOT).as_posix() if path.is_relative_to(APP_ROOT) else None

    return _rewrite_file_plugins(raw, inside)
