r"""Shard files: fixed ranges of the dataset, written atomically and deterministically.

A run's output folder holds, for shard ``k`` (rows ``[k * shard_size, (k + 1) * shard_size)``):

- ``shard-0000k.parquet`` (or ``.safetensors``): one record per attributed row, the
  columns of :data:`COLUMN_KINDS` that the model kind produces, in a fixed order;
- ``shard-0000k.errors.jsonl``: the shard's bad rows (``{"reason", "message", "row"}``,
  one JSON object a line, possibly none), written *before* the shard file;

plus ``index.json`` and ``errors.jsonl`` (the per-shard errors merged in shard order),
both written by rank 0. Every file is written to a temporary name in the same folder and
moved into place with ``os.replace``, so a reader (or a resumed run) sees a whole file or
none. A shard counts as finished when its shard file exists.

Serialization is deterministic: no timestamps, fixed column order, parquet written with
fixed settings (zstd level 3, no dictionary, no statistics, one row group, page index
and checksums off), safetensors with a single metadata entry (a JSON object with sorted
keys: the safetensors writer orders several metadata entries at random), JSON with
sorted keys. The same records give the same bytes in any process.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Any, Dict, Iterable, List, Mapping, Sequence, Tuple

import numpy as np

__all__ = [
    "COLUMN_KINDS",
    "FORMATS",
    "INDEX_NAME",
    "ERRORS_NAME",
    "plan_shards",
    "shard_name",
    "errors_name",
    "atomic_write",
    "write_json",
    "encode_shard",
    "decode_shard",
    "read_shard",
    "write_errors",
    "read_errors",
    "merge_errors",
    "remove_stale_temporaries",
]

#: the output formats and their file extensions
FORMATS: Dict[str, str] = {"parquet": ".parquet", "safetensors": ".safetensors"}
INDEX_NAME = "index.json"
ERRORS_NAME = "errors.jsonl"

#: every column a shard may hold and its kind. ``int``/``float``/``str``: one value per
#: row; ``list_*``: a variable-length list per row (``scores`` and ``tokens`` have one
#: entry per unit: token, code or value).
COLUMN_KINDS: Dict[str, str] = {
    "row": "int",
    "id": "str",
    "features": "list_str",
    "tokens": "list_str",
    "token_ids": "list_int",
    "values": "list_float",
    "shape": "list_int",
    "scores": "list_float",
    "target": "int",
    "target_label": "str",
    "output": "float",
    "prediction": "int",
    "logits": "list_float",
}

_TMP_MARK = ".tmp-"
_META_KEY = "captum_gim"


def plan_shards(n_rows: int, shard_size: int) -> List[Tuple[int, int]]:
    r"""``[(start, stop), ...]``: the rows of each shard, in order (the last may be shorter).

    Raises:
        ValueError: ``shard_size`` is not a positive integer.
    """
    if isinstance(shard_size, bool) or not isinstance(shard_size, int) or shard_size < 1:
        raise ValueError(f"shard_size must be a positive integer, got {shard_size!r}")
    return [(s, min(s + shard_size, n_rows)) for s in range(0, n_rows, shard_size)]


def shard_name(k: int, fmt: str) -> str:
    r"""The file name of shard ``k`` in format ``fmt`` (``shard-00003.parquet``)."""
    if fmt not in FORMATS:
        raise ValueError(f"format must be one of {', '.join(FORMATS)}, got {fmt!r}")
    return f"shard-{k:05d}{FORMATS[fmt]}"


def errors_name(k: int) -> str:
    r"""The file name of shard ``k``'s errors (``shard-00003.errors.jsonl``)."""
    return f"shard-{k:05d}.errors.jsonl"


def atomic_write(path: Path, data: bytes) -> None:
    r"""Write ``data`` to ``path`` whole or not at all: a temporary file in the same
    folder (named for this process), flushed to disk, then ``os.replace``."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}{_TMP_MARK}{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def json_bytes(obj: Any) -> bytes:
    r"""``obj`` as JSON with sorted keys, one-space indent and a final newline."""
    return (json.dumps(obj, sort_keys=True, indent=1, ensure_ascii=False) + "\n").encode()


def write_json(path: Path, obj: Any) -> None:
    r"""``obj`` written atomically as deterministic JSON (:func:`json_bytes`)."""
    atomic_write(path, json_bytes(obj))


def remove_stale_temporaries(folder: Path) -> List[str]:
    r"""Delete temporary files left by a killed run (``.NAME.tmp-PID``); returns their
    names. Call it only while no process of this run writes (before the first barrier)."""
    removed = []
    for p in sorted(Path(folder).glob(f".*{_TMP_MARK}*")):
        if p.is_file():
            p.unlink()
            removed.append(p.name)
    return removed


# ----------------------------------------------------------------------- encoding


def _check_columns(records: Sequence[Mapping[str, Any]], columns: Sequence[str]) -> None:
    unknown = [c for c in columns if c not in COLUMN_KINDS]
    if unknown:
        raise ValueError(f"unknown shard column(s) {unknown}; known: {list(COLUMN_KINDS)}")
    for r in records:
        missing = [c for c in columns if c not in r]
        if missing:
            raise ValueError(f"record of row {r.get('row')} lacks column(s) {missing}")


def _arrow_type(kind: str) -> Any:
    import pyarrow as pa

    return {
        "int": pa.int64(),
        "float": pa.float32(),
        "str": pa.string(),
        "list_str": pa.list_(pa.string()),
        "list_int": pa.list_(pa.int64()),
        "list_float": pa.list_(pa.float32()),
    }[kind]


def _column_values(records: Sequence[Mapping[str, Any]], name: str) -> List[Any]:
    kind = COLUMN_KINDS[name]
    if kind == "int":
        return [int(r[name]) for r in records]
    if kind == "float":
        return [float(np.float32(r[name])) for r in records]
    if kind == "str":
        return [str(r[name]) for r in records]
    if kind == "list_str":
        return [[str(x) for x in r[name]] for r in records]
    if kind == "list_int":
        return [np.asarray(r[name], dtype=np.int64).tolist() for r in records]
    return [np.asarray(r[name], dtype=np.float32).tolist() for r in records]


def _parquet_bytes(records: Sequence[Mapping[str, Any]], columns: Sequence[str]) -> bytes:
    import pyarrow as pa
    import pyarrow.parquet as pq

    fields = [pa.field(c, _arrow_type(COLUMN_KINDS[c])) for c in columns]
    schema = pa.schema(fields)
    arrays = [pa.array(_column_values(records, c), type=f.type) for c, f in zip(columns, fields)]
    table = pa.Table.from_arrays(arrays, schema=schema)
    sink = pa.BufferOutputStream()
    pq.write_table(
        table,
        sink,
        row_group_size=max(len(records), 1),
        version="2.6",
        data_page_version="1.0",
        compression="zstd",
        compression_level=3,
        use_dictionary=False,
        write_statistics=False,
        write_page_index=False,
        write_page_checksum=False,
        store_schema=True,
    )
    return sink.getvalue().to_pybytes()


def _safetensors_bytes(records: Sequence[Mapping[str, Any]], columns: Sequence[str]) -> bytes:
    from safetensors.numpy import save

    tensors: Dict[str, np.ndarray] = {}
    strings: Dict[str, Any] = {}
    for c in columns:
        kind = COLUMN_KINDS[c]
        values = _column_values(records, c)
        if kind in ("str", "list_str"):
            strings[c] = values
        elif kind in ("int", "float"):
            tensors[c] = np.asarray(values, dtype=np.int64 if kind == "int" else np.float32)
        else:
            dtype = np.int64 if kind == "list_int" else np.float32
            lengths = [len(v) for v in values]
            tensors[c] = np.asarray([x for v in values for x in v], dtype=dtype)
            tensors[f"{c}.offsets"] = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
    meta = json.dumps({"columns": list(columns), "n_rows": len(records), "strings": strings},
                      sort_keys=True, ensure_ascii=False)
    # one metadata entry: safetensors orders several at random (a Rust HashMap)
    return bytes(save(tensors, metadata={_META_KEY: meta}))


def encode_shard(records: Sequence[Mapping[str, Any]], columns: Sequence[str], fmt: str) -> bytes:
    r"""The bytes of a shard holding ``records`` (one mapping per row) in ``fmt``.

    Args:
        records: per row, a value for every name in ``columns`` (lists as lists or
            numpy arrays).
        columns: the column names, in the order they are stored (see
            :data:`COLUMN_KINDS`).
        fmt: ``"parquet"`` or ``"safetensors"``. In safetensors, numeric columns are
            tensors (a list column ``c`` as the flat values ``c`` and ``c.offsets``, of
            length rows + 1); string columns are in the ``captum_gim`` metadata entry.
    """
    _check_columns(records, columns)
    if fmt == "parquet":
        return _parquet_bytes(records, columns)
    if fmt == "safetensors":
        return _safetensors_bytes(records, columns)
    raise ValueError(f"format must be one of {', '.join(FORMATS)}, got {fmt!r}")


def decode_shard(data: bytes, fmt: str) -> List[Dict[str, Any]]:
    r"""The records of a shard's bytes (the inverse of :func:`encode_shard`); list
    columns come back as Python lists."""
    if fmt == "parquet":
        import pyarrow as pa
        import pyarrow.parquet as pq

        table = pq.read_table(pa.BufferReader(data))
        return table.to_pylist()
    if fmt == "safetensors":
        from safetensors.numpy import load

        tensors = load(data)
        header_len = int.from_bytes(data[:8], "little")
        meta = json.loads(json.loads(data[8 : 8 + header_len])["__metadata__"][_META_KEY])
        n = int(meta["n_rows"])
        out: List[Dict[str, Any]] = [{} for _ in range(n)]
        for c in meta["columns"]:
            kind = COLUMN_KINDS[c]
            if c in meta["strings"]:
                for rec, v in zip(out, meta["strings"][c]):
                    rec[c] = v
            elif kind in ("int", "float"):
                for rec, v in zip(out, tensors[c].tolist()):
                    rec[c] = v
            else:
                flat, off = tensors[c], tensors[f"{c}.offsets"]
                for i, rec in enumerate(out):
                    rec[c] = flat[off[i] : off[i + 1]].tolist()
        return out
    raise ValueError(f"format must be one of {', '.join(FORMATS)}, got {fmt!r}")


def read_shard(path: Path) -> List[Dict[str, Any]]:
    r"""The records of the shard file ``path`` (format from its extension)."""
    path = Path(path)
    for fmt, ext in FORMATS.items():
        if path.name.endswith(ext):
            return decode_shard(path.read_bytes(), fmt)
    raise ValueError(f"{path} is not a shard file ({', '.join(FORMATS.values())})")


# ------------------------------------------------------------------------- errors


def write_errors(path: Path, errors: Iterable[Mapping[str, Any]]) -> None:
    r"""One JSON object per bad row (sorted keys; rows in increasing order), atomically."""
    rows = sorted(errors, key=lambda e: int(e["row"]))
    atomic_write(path, b"".join(json.dumps(dict(e), sort_keys=True, ensure_ascii=False).encode()
                                + b"\n" for e in rows))


def read_errors(path: Path) -> List[Dict[str, Any]]:
    r"""The bad rows recorded in an errors file."""
    text = Path(path).read_text(encoding="utf-8")
    return [json.loads(line) for line in text.splitlines() if line.strip()]


def merge_errors(folder: Path, n_shards: int, out: Path) -> int:
    r"""Concatenate the per-shard errors files of shards ``0..n_shards-1`` in shard order
    into ``out`` (atomically); returns the number of bad rows."""
    folder = Path(folder)
    parts = [(folder / errors_name(k)).read_bytes() for k in range(n_shards)]
    data = b"".join(parts)
    atomic_write(out, data)
    return sum(1 for line in data.splitlines() if line.strip())


_SHARD_RE = re.compile(r"^shard-(\d{5,})\.(parquet|safetensors)$")


def shard_number(name: str) -> int:
    r"""``k`` of a shard file name ``shard-0000k.<ext>`` (ValueError otherwise)."""
    m = _SHARD_RE.match(name)
    if not m:
        raise ValueError(f"{name!r} is not a shard file name")
    return int(m.group(1))
