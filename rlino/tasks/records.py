"""Reading task data: local JSONL / parquet files and Hugging Face dataset ids, with clear errors.

Shared by the built-in tasks so that every task accepts the same kinds of `path`. `datasets` and
`pyarrow` are imported only when a parquet file or a hub id is actually read.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from rlino.errors import UserError

Record = dict[str, Any]
DATA_SUFFIXES = (".jsonl", ".json", ".parquet")


def read_file(path: Path) -> list[Record]:
    """All records of one JSONL (one object per line) or parquet file."""
    if path.suffix == ".parquet":
        import pyarrow.parquet as pq

        return pq.read_table(path).to_pylist()
    records = []
    with path.open(encoding="utf-8") as f:
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
    return records


def split_files(directory: Path, split: str) -> list[Path]:
    """Files of `split` in a local directory: `split.jsonl`, `split-*.parquet`, `*/split...`."""
    found: list[Path] = []
    for pattern in (f"{split}.jsonl", f"{split}.json", f"{split}.parquet", f"{split}-*.parquet"):
        found += sorted(directory.glob(pattern))
    if not found:  # HF snapshot layout: main/test-00000-of-00001.parquet, data/train-....parquet
        for pattern in (f"*/{split}.jsonl", f"*/{split}-*.parquet"):
            found += sorted(directory.glob(pattern))
    return found


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
