"""Fetching dataset files: look in local folders first, else download with resume and a checksum."""

from __future__ import annotations

import gzip
import hashlib
import os
import urllib.error
import urllib.request
from collections.abc import Iterable
from pathlib import Path

from fedsim.errors import DataError

CACHE_ENV = "FEDSIM_CACHE_DIR"
CHUNK = 1 << 20


def cache_dir() -> Path:
    """The user cache for downloaded datasets (`$FEDSIM_CACHE_DIR`, else ~/.cache/fedsim)."""
    default = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "fedsim"
    return Path(os.environ.get(CACHE_ENV, default))


def checksum_of(path: Path, decompress: bool = False, algorithm: str = "sha256") -> str:
    """The hex digest (SHA-256, or `algorithm`) of a file's bytes, or of its gzip-decompressed
    content."""
    digest = hashlib.new(algorithm)
    opener = gzip.open if decompress else open
    with opener(path, "rb") as handle:
        while chunk := handle.read(CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def download(url: str, dest: Path, timeout: float = 30.0) -> Path:
    """Download `url` to `dest`, resuming a partial `dest.part` with an HTTP Range request."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    part = dest.with_name(dest.name + ".part")
    offset = part.stat().st_size if part.exists() else 0
    request = urllib.request.Request(url, headers={"Range": f"bytes={offset}-"} if offset else {})
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            resumed = offset and response.status == 206
            with open(part, "ab" if resumed else "wb") as out:
                while chunk := response.read(CHUNK):
                    out.write(chunk)
    except urllib.error.HTTPError as exc:
        if exc.code != 416:  # 416: the partial file is already complete
            raise DataError(f"could not download {url}: {exc}") from None
    except (urllib.error.URLError, OSError) as exc:
        raise DataError(f"could not download {url}: {exc}") from None
    part.replace(dest)
    return dest


def matches(path: Path, checksum: str, decompressed: bool) -> bool:
    """Whether a file has `checksum`: a SHA-256 hex digest, or `algorithm:hexdigest` (e.g. the
    MD5 sums a dataset's home publishes, `md5:...`)."""
    algorithm, _, expected = checksum.rpartition(":")
    return checksum_of(path, decompressed, algorithm or "sha256") == expected


def verified_file(
    dataset: str,
    name: str,
    checksum: str,
    folders: Iterable[Path],
    url: str,
    decompressed: bool = False,
) -> Path:
    """A verified copy of `dataset`'s file `name`: the first one in `folders`, else downloaded.

    `checksum` (see `matches`) is that of the file, or of its decompressed content when
    `decompressed`.
    A download that fails verification is deleted and reported; local files are never modified.
    """
    searched = [Path(folder) for folder in folders]
    for folder in searched:
        candidate = folder / name
        if candidate.is_file():
            if not matches(candidate, checksum, decompressed):
                raise DataError(f"{candidate} does not match its checksum; replace it")
            return candidate
    target = cache_dir() / dataset / name
    if not (target.is_file() and matches(target, checksum, decompressed)):
        try:
            download(url, target)
        except DataError as exc:
            places = ", ".join(str(f) for f in searched) or "(none)"
            raise DataError(
                f"{exc}. Offline? Put '{name}' into one of: {places} "
                "(set data.root or FEDSIM_DATA_DIR to the folder holding the dataset's subfolder)"
            ) from None
        if not matches(target, checksum, decompressed):
            target.unlink()
            raise DataError(f"downloaded {url} does not match its checksum; deleted it")
    return target
