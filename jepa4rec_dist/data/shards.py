"""WebDataset tar shards of user sequences, and the manifest that describes them.

One sample per user sequence: `__key__` = `u<user index>`, `json` = {"user", "domain", "items",
"timestamps"} with item indices into items.parquet, oldest first. In `valid` and `test` the last item is
the target. Shards hold item indices, not tokens: the catalogue is tokenised once (items.parquet) and a
sequence of 50 items costs ~400 bytes instead of ~20 KB, so the shards stream fast and stay small.

Shards are byte-reproducible (fixed mtime, owner and order) so a prepare run on Ray or locally gives the
same sha256. The manifest is the source of truth the loader checks shards against (size always, sample
count while streaming, sha256 on request).
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import tarfile
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import webdataset as wds

from jepa4rec_dist.data.remote import sha256_file  # noqa: F401  (re-exported: shards.sha256_file)

MANIFEST = "manifest.json"
FORMAT_VERSION = 1
SPLITS = ("train", "valid", "test")


@dataclass
class ShardInfo:
    path: str  # relative to the dataset directory
    samples: int
    bytes: int
    sha256: str


def atomic_write(path: Path, write) -> Path:
    """Write `path` through `write(tmp)` into a temporary file of this process beside it, then rename it into
    place: a crash never leaves a half-written file under the final name, and two processes writing the same
    file at once (two runs filling one cache) never write into each other's temporary file."""
    path = Path(path)
    tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
    try:
        write(tmp)
        tmp.replace(path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def save_npy(path: Path, array) -> None:
    """np.save through a handle: given a name, np.save appends ".npy" (a temporary file's name would change)."""
    with open(path, "wb") as handle:
        np.save(handle, array)


def shard_name(split: str, index: int) -> str:
    return f"shards/{split}-{index:06d}.tar"


def write_shard(root: Path, split: str, index: int, samples: list[dict]) -> ShardInfo:
    """Write one shard (pure function of its inputs: the per-shard unit of work, locally or on Ray). Sample values
    may be numpy arrays (written as JSON lists)."""
    rel = shard_name(split, index)
    path = Path(root) / rel
    path.parent.mkdir(parents=True, exist_ok=True)
    buffer = io.BytesIO()
    with wds.TarWriter(buffer, mtime=0, user="jepa4rec", group="jepa4rec", mode=0o444) as writer:
        for sample in samples:
            payload = {k: v.tolist() if isinstance(v, np.ndarray) else v for k, v in sample.items() if k != "key"}
            writer.write({"__key__": sample["key"], "json": json.dumps(payload, separators=(",", ":")).encode()})
    data = buffer.getvalue()
    atomic_write(path, lambda tmp: tmp.write_bytes(data))
    return ShardInfo(path=rel, samples=len(samples), bytes=len(data), sha256=hashlib.sha256(data).hexdigest())


def count_samples(path: Path) -> int:
    """Samples in a shard by reading it whole; raises ValueError naming the shard if it is corrupt."""
    keys = set()
    try:
        with tarfile.open(path, "r|") as tar:
            for member in tar:
                if member.isreg():
                    keys.add(member.name.split(".", 1)[0])
    except (tarfile.TarError, OSError, EOFError) as exc:
        raise ValueError(f"{path}: corrupt or truncated tar shard ({exc})") from exc
    return len(keys)


def load_manifest(root: str | Path) -> dict:
    """The manifest of a prepared folder: a local path, or a URL (jepa4rec_dist/data/remote.py)."""
    from jepa4rec_dist.data import remote

    if remote.is_remote(root):
        path = remote.join(root, MANIFEST)
        text = remote.read_bytes(path).decode("utf-8")
    else:
        root = Path(remote.normalize(root))
        path = root / MANIFEST
        if not path.is_file():
            raise ValueError(f"{path}: no manifest (run `jepa4rec prepare --out {root}` first)")
        text = path.read_text()
    try:
        manifest = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ValueError(f"{path}: not valid JSON ({exc})") from exc
    for key in ("format_version", "shards", "counts", "tokenizer", "attributes"):
        if key not in manifest:
            raise ValueError(f"{path}: missing key '{key}'")
    if manifest["format_version"] != FORMAT_VERSION:
        raise ValueError(f"{path}: format_version {manifest['format_version']} (this code reads {FORMAT_VERSION})")
    return manifest


def shard_infos(manifest: dict, split: str) -> list[ShardInfo]:
    if split not in manifest["shards"]:
        raise ValueError(f"manifest has no split {split!r} (has {sorted(manifest['shards'])})")
    return [ShardInfo(**s) for s in manifest["shards"][split]]


def check_shards(root: str | Path, manifest: dict, split: str, checksums: bool = False, count: bool = False) -> None:
    """Every shard of `split` exists and matches the manifest (size; sha256 and sample count on request). For a
    remote root the shards are streamed for sha256 / counts (sizes and existence are checked while reading)."""
    from jepa4rec_dist.data import remote

    if remote.is_remote(root):
        for info in shard_infos(manifest, split):
            if checksums or count:
                _check_remote_shard(remote.join(root, info.path), info, split, checksums, count)
        return
    root = Path(remote.normalize(root))
    for info in shard_infos(manifest, split):
        path = root / info.path
        if not path.is_file():
            raise ValueError(f"{path}: listed in {root / MANIFEST} (shards.{split}) but missing")
        size = path.stat().st_size
        if size != info.bytes:
            raise ValueError(f"{path}: {size} bytes, manifest says {info.bytes} (shards.{split}): shard and manifest disagree")
        if checksums and sha256_file(path) != info.sha256:
            raise ValueError(f"{path}: sha256 differs from the manifest (shards.{split}): shard changed or corrupt")
        if count:
            n = count_samples(path)
            if n != info.samples:
                raise ValueError(f"{path}: {n} samples, manifest says {info.samples} (shards.{split})")


def _check_remote_shard(url: str, info: ShardInfo, split: str, checksums: bool, count: bool) -> None:
    from jepa4rec_dist.data import remote

    data = remote.read_bytes(url)
    if len(data) != info.bytes:
        raise ValueError(f"{url}: {len(data)} bytes, manifest says {info.bytes} (shards.{split})")
    if checksums and hashlib.sha256(data).hexdigest() != info.sha256:
        raise ValueError(f"{url}: sha256 differs from the manifest (shards.{split}): shard changed or corrupt")
    if count:
        try:
            with tarfile.open(fileobj=io.BytesIO(data), mode="r|") as tar:
                n = len({m.name.rsplit(".", 1)[0] for m in tar if m.isreg()})
        except (tarfile.TarError, EOFError) as exc:
            raise ValueError(f"{url}: corrupt or truncated tar shard ({exc})") from exc
        if n != info.samples:
            raise ValueError(f"{url}: {n} samples, manifest says {info.samples} (shards.{split})")


def verify_dataset(root: str | Path) -> dict:
    """Full check of a prepared directory (the `jepa4rec verify` command): returns samples per split."""
    manifest = load_manifest(root)
    out = {}
    for split in manifest["shards"]:
        check_shards(root, manifest, split, checksums=True, count=True)
        out[split] = sum(s.samples for s in shard_infos(manifest, split))
    return out


def iter_records(root: str | Path, split: str):
    """Every sequence record of a split, in shard order, without collation (baselines, statistics)."""
    from jepa4rec_dist.data import remote

    for info in shard_infos(load_manifest(root), split):
        path = remote.join(root, info.path)
        try:
            with remote.open_stream(path) as stream, tarfile.open(fileobj=stream, mode="r|") as tar:
                for member in tar:
                    if member.isreg() and member.name.endswith(".json"):
                        record = json.loads(tar.extractfile(member).read())
                        record["key"] = member.name.rsplit(".", 1)[0]
                        yield record
        except (tarfile.TarError, OSError, EOFError, json.JSONDecodeError) as exc:
            raise ValueError(f"{path}: corrupt or truncated tar shard ({exc})") from exc


def shard_info_dicts(infos: list[ShardInfo]) -> list[dict]:
    return [asdict(i) for i in infos]
