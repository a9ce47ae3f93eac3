"""Prepared data where it lies: a local folder, or a URL that nodes without a shared filesystem stream from.

`data.out_dir` may be a local path, `file:///abs/path`, or `http(s)://host/path` (a web server or an object store's
HTTP endpoint serving the prepared folder as is). The manifest is fetched, items.parquet is downloaded once into a
local cache (`JEPA4REC_CACHE`, default ~/.cache/jepa4rec) and checked against the manifest's sha256 when it
records one, and the shards are streamed (WebDataset's URL handling: curl for http(s), any `pipe:` command).
`loader.shard_url` rewrites where shards are read from, e.g. `pipe:aws s3 cp s3://bucket/data/{path} -` or
`https://cdn.example.com/data/{path}`: `{path}` is the shard's path in the manifest (`shards/train-000000.tar`).

A shard that ends early (a dropped connection, a truncated object) is never a silently short epoch: the reader
raises on the transfer's failure, a truncated tar, or a sample count below the manifest's (all name the shard).
Preparing, low-resource views and caches write into a dataset folder and need a local one (`local_root`).
"""

from __future__ import annotations

import hashlib
import http.client
import os
import time
import urllib.error
import urllib.request
from pathlib import Path

REMOTE_SCHEMES = ("http://", "https://")


def is_url(root) -> bool:
    return isinstance(root, str) and root.startswith((*REMOTE_SCHEMES, "file://"))


def is_remote(root) -> bool:
    return isinstance(root, str) and root.startswith(REMOTE_SCHEMES)


def normalize(root):
    """`file:///x` -> Path('/x'); other URLs stay strings; paths become Paths."""
    if isinstance(root, str) and root.startswith("file://"):
        return Path(root[len("file://"):])
    if is_remote(root):
        return root.rstrip("/")
    return Path(root)


def join(root, rel: str) -> str:
    """The location of `rel` (a manifest path such as `shards/train-000000.tar`) under `root`."""
    root = normalize(root)
    return f"{root}/{rel}" if isinstance(root, str) else str(root / rel)


def local_root(root, what: str) -> Path:
    """`root` as a local folder, or an error saying `what` needs one."""
    root = normalize(root)
    if isinstance(root, str):
        raise ValueError(f"{what} needs a local dataset folder, not the URL {root}")
    return root


def read_bytes(location: str, retries: int = 3, timeout: float = 60.0) -> bytes:
    """The whole content of a path or http(s) URL (retried on connection errors; an HTTP error status is not)."""
    if not is_remote(location):
        return Path(normalize(location)).read_bytes()
    for attempt in range(retries):
        try:
            with urllib.request.urlopen(location, timeout=timeout) as response:
                return response.read()
        except urllib.error.HTTPError as exc:
            raise ValueError(f"{location}: HTTP {exc.code} {exc.reason}") from exc
        except (urllib.error.URLError, OSError, http.client.HTTPException) as exc:  # incl. a body cut short
            if attempt == retries - 1:
                raise ValueError(f"{location}: could not be read ({exc})") from exc
            time.sleep(0.5 * (attempt + 1))
    raise AssertionError("unreachable")


def cache_dir() -> Path:
    return Path(os.environ.get("JEPA4REC_CACHE", Path.home() / ".cache" / "jepa4rec"))


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def local_file(root, rel: str, sha256: str | None = None) -> Path:
    """A local path of `rel` under `root`: itself for a local root, else a cached download (fetched again when it
    is missing or its sha256 differs from `sha256`)."""
    root = normalize(root)
    if not isinstance(root, str):
        return root / rel
    url = join(root, rel)
    target = cache_dir() / hashlib.sha1(url.encode()).hexdigest()[:16] / Path(rel).name
    if target.is_file() and (sha256 is None or sha256_file(target) == sha256):
        return target
    data = read_bytes(url)
    if sha256 is not None and hashlib.sha256(data).hexdigest() != sha256:
        raise ValueError(f"{url}: sha256 differs from the manifest's: changed or corrupt")
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_suffix(target.suffix + f".{os.getpid()}.tmp")
    tmp.write_bytes(data)
    tmp.replace(target)
    return target


def shard_location(root, rel: str, template: str | None = None) -> str:
    """Where the loader reads a shard: `loader.shard_url` with `{path}` filled in, else `rel` under `root`."""
    if template:
        if "{path}" not in template:
            raise ValueError(f"loader.shard_url {template!r} must contain {{path}} (the shard's manifest path)")
        return template.replace("{path}", rel)
    return join(root, rel)


def open_stream(location: str):
    """A readable binary stream of a shard location (path, http(s) URL or `pipe:` command), WebDataset's gopen."""
    from webdataset.gopen import gopen

    return gopen(location, "rb")


__all__ = ["is_url", "is_remote", "normalize", "join", "local_root", "read_bytes", "local_file", "shard_location",
           "open_stream", "cache_dir"]
