r"""The rows to attribute: a JSONL or CSV file (read with Hugging Face ``datasets``), a
``datasets.Dataset``, a list of dicts, or a PyHealth ``SampleDataset``.

:func:`load_rows` returns :class:`Rows`: random access by row number (0-based: the
``n``-th record of the file, blank lines of a JSONL file not counted; the ``n``-th data
line of a CSV file after its header), the column names, and a fingerprint of the
content (the SHA-256 of the file; of the records otherwise, read in order), which a
resumed run compares with the one recorded in the output folder.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Dict, Iterator, List, Mapping, Sequence, Tuple, Union

__all__ = ["Rows", "load_rows", "is_sample_dataset", "FILE_KINDS"]

#: file extensions and the ``datasets`` loader that reads them
FILE_KINDS: Dict[str, str] = {".jsonl": "json", ".json": "json", ".csv": "csv"}


@dataclass
class Rows:
    r"""The dataset, row by row.

    Attributes:
        n_rows (int): how many rows.
        columns (tuple of str): the column names (for PyHealth samples: the sample keys).
        fingerprint (str): ``sha256:...`` of the content.
        source (str): what was read (the file path, or a description).
        kind (str): ``"records"`` (plain values: text, labels, raw codes) or
            ``"pyhealth-samples"`` (a ``SampleDataset``'s processed samples).
        get (Callable[[int], dict]): the row with a given number.
    """

    n_rows: int
    columns: Tuple[str, ...]
    fingerprint: str
    source: str
    kind: str
    get: Callable[[int], Dict[str, Any]]

    def __len__(self) -> int:
        return self.n_rows

    def __getitem__(self, i: int) -> Dict[str, Any]:
        return self.get(int(i))


def is_sample_dataset(data: Any) -> bool:
    r"""Whether ``data`` is a PyHealth ``SampleDataset`` (without importing PyHealth)."""
    return any(
        c.__name__ == "SampleDataset" and c.__module__.startswith("pyhealth.")
        for c in type(data).__mro__
    )


def _sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return "sha256:" + h.hexdigest()


@contextlib.contextmanager
def _quiet_datasets() -> Iterator[None]:
    import datasets
    from datasets.utils import logging as ds_logging

    bars = datasets.is_progress_bar_enabled()
    verbosity = ds_logging.get_verbosity()
    datasets.disable_progress_bars()
    ds_logging.set_verbosity_error()
    try:
        yield
    finally:
        ds_logging.set_verbosity(verbosity)
        if bars:
            datasets.enable_progress_bars()


def _read_file(path: Path) -> Rows:
    if not path.is_file():
        raise FileNotFoundError(f"data file {path} does not exist")
    loader = FILE_KINDS.get(path.suffix.lower())
    if loader is None:
        raise ValueError(
            f"data file {path}: give a {', '.join(FILE_KINDS)} file (JSON lines: one object "
            "per line; CSV: a header line with the column names)"
        )
    import datasets

    # a private cache: the parse is cheap, and several processes of one run (or runs of
    # other users) never share or lock a cache folder
    cache = tempfile.mkdtemp(prefix="captum-gim-data-")
    try:
        with _quiet_datasets():
            ds = datasets.load_dataset(
                loader, data_files=str(path), split="train", cache_dir=cache, keep_in_memory=True
            )
    except Exception as e:  # datasets raises several types for a malformed file
        first = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise ValueError(f"could not read {path} as {loader.upper()}: {first}") from e
    finally:
        shutil.rmtree(cache, ignore_errors=True)
    return _from_hf(ds, _sha256_file(path), str(path))


def _from_hf(ds: Any, fingerprint: str, source: str) -> Rows:
    return Rows(
        n_rows=len(ds),
        columns=tuple(ds.column_names),
        fingerprint=fingerprint,
        source=source,
        kind="records",
        get=lambda i: dict(ds[i]),
    )


def _sample_bytes(value: Any, h: Any) -> None:
    import torch

    if isinstance(value, torch.Tensor):
        h.update(f"T{value.dtype}{tuple(value.shape)}".encode())
        h.update(value.detach().cpu().contiguous().numpy().tobytes())
    elif isinstance(value, (list, tuple)):
        h.update(f"L{len(value)}".encode())
        for v in value:
            _sample_bytes(v, h)
    elif isinstance(value, Mapping):
        for k in sorted(value):
            h.update(f"K{k}".encode())
            _sample_bytes(value[k], h)
    else:
        h.update(repr(value).encode())


def _from_samples(ds: Any) -> Rows:
    n = len(ds)
    h = hashlib.sha256()
    columns: List[str] = []
    for i in range(n):
        sample = ds[i]
        if i == 0:
            columns = list(sample)
        _sample_bytes(dict(sample), h)
    name = getattr(ds, "dataset_name", None) or type(ds).__name__
    return Rows(
        n_rows=n,
        columns=tuple(columns),
        fingerprint="sha256:" + h.hexdigest(),
        source=f"PyHealth {type(ds).__name__} {name!r} ({n} samples)",
        kind="pyhealth-samples",
        get=lambda i: dict(ds[i]),
    )


def _from_records(records: Sequence[Mapping[str, Any]]) -> Rows:
    rows = [dict(r) for r in records]
    for i, r in enumerate(rows):
        if not isinstance(r, dict):
            raise TypeError(f"row {i} is a {type(r).__name__}; give one dict per row")
    columns: Dict[str, None] = {}
    for r in rows:
        columns.update(dict.fromkeys(r))
    blob = json.dumps(rows, sort_keys=True, default=repr, ensure_ascii=False).encode()
    return Rows(
        n_rows=len(rows),
        columns=tuple(columns),
        fingerprint="sha256:" + hashlib.sha256(blob).hexdigest(),
        source=f"{len(rows)} records given in Python",
        kind="records",
        get=lambda i: dict(rows[i]),
    )


def load_rows(data: Union[str, Path, Sequence[Mapping[str, Any]], Any]) -> Rows:
    r"""The rows of ``data``.

    Args:
        data: a ``.jsonl``/``.json`` or ``.csv`` file (read with ``datasets``), a
            ``datasets.Dataset``, a list of dicts, or a PyHealth ``SampleDataset``.

    Returns:
        Rows: random access to the rows, their columns and the content's fingerprint.

    Raises:
        FileNotFoundError: the file does not exist.
        ValueError: the file is not JSON lines or CSV, or cannot be parsed.
        TypeError: ``data`` is none of the above.

    Examples::

        >>> rows = load_rows("prompts.jsonl")       # doctest: +SKIP
        >>> rows[0]                                 # doctest: +SKIP
        {'prompt': 'The capital of France is', 'answer': ' Paris'}
    """
    if isinstance(data, (str, Path)):
        return _read_file(Path(data))
    if is_sample_dataset(data):
        return _from_samples(data)
    try:
        import datasets

        if isinstance(data, datasets.Dataset):
            # the content's hash: datasets' own fingerprint can be random (unhashable
            # transforms), which would make a resumed run look like another one
            h = hashlib.sha256()
            for batch in data.iter(batch_size=1000):
                h.update(json.dumps(batch, sort_keys=True, default=repr, ensure_ascii=False).encode())
            return _from_hf(data, "sha256:" + h.hexdigest(), f"datasets.Dataset ({len(data)} rows)")
    except ImportError:  # pragma: no cover - datasets is a dependency of the extra
        pass
    if isinstance(data, Sequence) and not isinstance(data, (bytes, str)):
        return _from_records(data)
    raise TypeError(
        "data must be a JSONL/CSV file path, a datasets.Dataset, a list of dicts or a "
        f"PyHealth SampleDataset, got {type(data).__name__}"
    )
