"""Reading task data: local JSONL / parquet files and Hugging Face dataset ids, with clear errors.

Shared by the built-in tasks so that every task accepts the same kinds of `path`. JSONL may be
gzip-compressed (`.jsonl.gz`, as rlino ships GSM8K). `datasets` and `pyarrow` are imported only
when a parquet file or a hub id is actually read.
"""

from __future__ import annotations

import gzip
import json
import zlib
from pathlib import Path
from typing import Any, TextIO

from rlino.errors import UserError

Record = dict[str, Any]
DATA_SUFFIXES = (".jsonl", ".jsonl.gz", ".json", ".parquet")


def read_file(path: Path) -> list[Record]:
    """All records of one JSONL (one object per line; gzipped if it ends in .gz) or parquet file."""
    if path.suffix == ".parquet":
        import pyarrow.parquet as pq

        return pq.read_table(path).to_pylist()
    records = []
    lineno = 0
    try:
        with _open_text(path) as f:
            for lineno, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    record = json.loads(line)
                except json.JSONDecodeError as e:
                    raise UserError(f"{path}:{lineno}: not valid JSON ({e.msg})") from None
                if not isinstance(record, dict):
                    raise UserError(f"{path}:{lineno}: expected a JSON object per line")
                records.append(record)
    except UnicodeDecodeError:
        raise UserError(f"{path}: not UTF-8 text (bad bytes after line {lineno})") from None
    except (gzip.BadGzipFile, EOFError, zlib.error) as e:  # corrupt or truncated .gz
        raise UserError(f"{path}: not a readable gzip file ({e or type(e).__name__})") from None
    return records


def _open_text(path: Path) -> TextIO:
    """`path` opened as UTF-8 text, decompressed on the fly when it ends in .gz."""
    if path.suffix == ".gz":
        return gzip.open(path, "rt", encoding="utf-8")
    return path.open(encoding="utf-8")


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
