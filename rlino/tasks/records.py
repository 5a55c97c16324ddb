"""Reading task data: local JSONL / parquet files and Hugging Face dataset ids, with clear errors.

Shared by the built-in tasks so that every task accepts the same kinds of `path`. JSONL may be
gzip-compressed (`.jsonl.gz`, as rlino ships GSM8K). `datasets` and `pyarrow` are imported only
when a parquet file or a hub id is actually read.
"""

from __future__ import annotations

import gzip
import json
import math
import zlib
from pathlib import Path
from typing import Any, BinaryIO

from rlino.errors import UserError

Record = dict[str, Any]
DATA_SUFFIXES = (".jsonl", ".jsonl.gz", ".json", ".parquet")


def read_file(path: Path) -> list[Record]:
    """All records of one JSONL (one object per line; gzipped if it ends in .gz) or parquet file."""
    if path.suffix == ".parquet":
        return _read_parquet(path)
    records = []
    try:
        with _open_bytes(path) as f:
            for lineno, raw in enumerate(f, 1):
                record = _parse_line(path, lineno, raw)
                if record is not None:
                    records.append(record)
    except (gzip.BadGzipFile, EOFError, zlib.error) as e:  # corrupt or truncated .gz
        raise UserError(f"{path}: not a readable gzip file ({e or type(e).__name__})") from None
    except IsADirectoryError:
        raise UserError(f"{path}: is a directory, not a data file") from None
    return records


def _parse_line(path: Path, lineno: int, raw: bytes) -> Record | None:
    """The JSON object on line `lineno` (None for a blank line); UserError naming file and line.

    Lines are decoded one by one so that bad bytes are reported on their own line. NaN, Infinity
    and numbers beyond float range (1e400) are refused: no task field can use them, and they
    would surface later as an overflow far from the file.
    """
    try:
        line = raw.decode("utf-8-sig" if lineno == 1 else "utf-8")  # a leading BOM is harmless
    except UnicodeDecodeError:
        raise UserError(f"{path}:{lineno}: not UTF-8 text") from None
    if not line.strip():
        return None
    try:
        record = json.loads(line, parse_constant=_refuse_constant, parse_float=_finite_float)
    except json.JSONDecodeError as e:
        raise UserError(f"{path}:{lineno}: not valid JSON ({e.msg})") from None
    except ValueError as e:  # _refuse_constant, _finite_float, or an int of over 4300 digits
        raise UserError(f"{path}:{lineno}: {str(e).splitlines()[0][:120]}") from None
    except RecursionError:
        raise UserError(f"{path}:{lineno}: JSON nested too deep") from None
    if not isinstance(record, dict):
        raise UserError(f"{path}:{lineno}: expected a JSON object per line")
    return record


def _refuse_constant(name: str) -> Any:
    """json's hook for NaN / Infinity / -Infinity, which strict JSON does not have."""
    raise ValueError(f"not valid JSON ({name} is not a JSON number)")


def _finite_float(text: str) -> float:
    """json's hook for floats: the value, unless it overflows to infinity."""
    value = float(text)
    if not math.isfinite(value):
        raise ValueError(f"number out of range ({text[:40]})")
    return value


def _read_parquet(path: Path) -> list[Record]:
    """All rows of a parquet file as dicts; a corrupt or non-parquet file is a UserError."""
    import pyarrow
    import pyarrow.parquet as pq

    try:
        return pq.read_table(path).to_pylist()
    except (OSError, ValueError, pyarrow.ArrowException) as e:
        reason = " ".join(str(e).split())[:200] or type(e).__name__
        raise UserError(f"{path}: not a readable parquet file ({reason})") from None


def _open_bytes(path: Path) -> BinaryIO:
    """`path` opened for reading bytes, decompressed on the fly when it ends in .gz."""
    if path.suffix == ".gz":
        return gzip.open(path, "rb")  # type: ignore[return-value]
    return path.open("rb")


def split_files(directory: Path, split: str) -> list[Path]:
    """Files of `split` in a directory: `split.jsonl[.gz]`, `split-*.parquet`, `*/split...`."""
    found: list[Path] = []
    top = (f"{split}.jsonl", f"{split}.jsonl.gz", f"{split}.json", f"{split}.parquet")
    for pattern in (*top, f"{split}-*.parquet"):
        found += _matches(directory, pattern)
    if not found:  # HF snapshot layout: main/test-00000-of-00001.parquet, data/train-....parquet
        for pattern in (f"*/{split}.jsonl", f"*/{split}.jsonl.gz", f"*/{split}-*.parquet"):
            found += _matches(directory, pattern)
    return found


def _matches(directory: Path, pattern: str) -> list[Path]:
    """Sorted files matching `pattern`, less any `x.jsonl.gz` whose `x.jsonl` is beside it.

    So a decompressed copy next to its archive is read once, not twice.
    """
    paths = sorted(directory.glob(pattern))
    return [p for p in paths if not (p.suffix == ".gz" and p.with_suffix("").exists())]


def load_hub(dataset_id: str, config: str | None, split: str | None) -> dict[str, list[Record]]:
    """Splits of a Hugging Face dataset (all of them when `split` is None), as lists of records.

    Raises UserError naming the dataset when `datasets` cannot load it (offline, unknown id).
    """
    try:
        import datasets

        loaded = datasets.load_dataset(dataset_id, config, split=split)
    except Exception as e:  # network, auth, unknown id, missing split: all reported the same way
        reason = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"[:200]
        raise UserError(f"could not load Hugging Face dataset {dataset_id!r} ({reason})") from None
    if split is not None:
        return {split: [dict(r) for r in loaded]}
    return {name: [dict(r) for r in part] for name, part in loaded.items()}


def is_local(path: str) -> bool:
    """Whether `path` names something on disk (else it is taken as a hub dataset id)."""
    return Path(path).expanduser().exists()
