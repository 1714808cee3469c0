r"""What an ``attribute`` output folder records about its run: ``run.json`` and ``index.json``.

``run.json`` is written by rank 0 when a run starts in an empty folder: the schema, the
*arguments that shape the results* (the model as given, the data's fingerprint and row
count, the method and its budget, target and baseline, batch and shard sizes, format,
device type, torch threads, seed) and the model's resolved settings (baseline token id,
length limit, columns...). A later run in the same folder must bring the same record, or
it is refused with the names of the arguments that differ
(:class:`ArgumentsMismatch`); arguments that cannot change the files (the output
folder, the progress bar, the number of processes) are not recorded.

``index.json`` is written last, by rank 0, once every shard exists: the same record plus
one entry per shard (file, rows, records, bad rows, SHA-256 of the file) and the totals.
Neither file holds a time, a path, a host or a rank, so both are byte-identical for a
one-process, a multi-process and a resumed run.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any, Dict, List, Mapping, Sequence, Tuple

from .shards import (
    ERRORS_NAME,
    INDEX_NAME,
    errors_name,
    json_bytes,
    read_errors,
    remove_stale_temporaries,
    shard_name,
    write_json,
)

__all__ = [
    "SCHEMA",
    "RUN_NAME",
    "ArgumentsMismatch",
    "differences",
    "prepare_folder",
    "build_index",
    "read_index",
    "load_attributions",
]

SCHEMA = "captum-gim/attribute/1"
RUN_NAME = "run.json"


class ArgumentsMismatch(ValueError):
    r"""The output folder holds a run made with other arguments.

    Attributes:
        names (list of str): the arguments that differ (dotted for nested ones:
            ``data.fingerprint``, ``model_settings.max_length``).
    """

    def __init__(self, folder: Path, diffs: Sequence[Tuple[str, Any, Any]]) -> None:
        self.names = [name for name, _, _ in diffs]
        shown = "; ".join(f"{name}: recorded {old!r}, now {new!r}" for name, old, new in diffs)
        super().__init__(
            f"{folder} holds a run made with other arguments ({shown}). Resume with the "
            "recorded arguments, or write to another folder (--out)"
        )


def _canonical(obj: Any) -> Any:
    # what the record looks like after a JSON round trip (tuples become lists...)
    return json.loads(json.dumps(obj, sort_keys=True))


def differences(recorded: Mapping[str, Any], current: Mapping[str, Any], prefix: str = "") -> List[Tuple[str, Any, Any]]:
    r"""``(name, recorded, current)`` for each entry that differs, nested mappings
    compared entry by entry (names dotted).

    Args:
        recorded: the record read from the folder.
        current: the record of this run.
        prefix: prepended to the names (for the nested calls).

    Returns:
        list of tuple: one per differing entry, sorted by name.
    """
    out: List[Tuple[str, Any, Any]] = []
    for key in sorted(set(recorded) | set(current)):
        old, new = recorded.get(key), current.get(key)
        if isinstance(old, Mapping) and isinstance(new, Mapping):
            out += differences(old, new, f"{prefix}{key}.")
        elif old != new:
            out.append((f"{prefix}{key}", old, new))
    return out


def prepare_folder(folder: Path, record: Mapping[str, Any]) -> Dict[str, Any]:
    r"""Make ``folder`` ready for a run with ``record`` (rank 0 only, before any shard is
    written): create it, delete temporary files a killed run left, then check the
    recorded ``run.json`` against ``record`` or write it.

    Args:
        folder: the output folder.
        record: ``{"schema", "arguments", "model_settings", ...}`` of this run.

    Returns:
        dict: ``{"resumed": bool, "removed": [names of deleted temporaries]}``.

    Raises:
        ArgumentsMismatch: the folder holds a run with other arguments.
        ValueError: the folder holds shard files but no ``run.json`` (not an output
            folder of ``attribute``), or an unreadable ``run.json``.
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    removed = remove_stale_temporaries(folder)
    path = folder / RUN_NAME
    current = _canonical(record)
    if path.is_file():
        try:
            recorded = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError) as e:
            raise ValueError(f"{path} is unreadable ({e}); remove the folder to start over") from e
        diffs = differences(recorded, current)
        if diffs:
            raise ArgumentsMismatch(folder, diffs)
        return {"resumed": True, "removed": removed}
    strays = sorted(p.name for p in folder.glob("shard-*"))
    if strays:
        raise ValueError(
            f"{folder} holds shard files ({', '.join(strays[:3])}...) but no {RUN_NAME}: it is "
            "not the folder of an attribute run; choose an empty or new folder"
        )
    write_json(path, current)
    return {"resumed": False, "removed": removed}


def _sha256(path: Path) -> str:
    return "sha256:" + hashlib.sha256(path.read_bytes()).hexdigest()


def build_index(
    folder: Path, record: Mapping[str, Any], plan: Sequence[Tuple[int, int]], fmt: str
) -> Dict[str, Any]:
    r"""The content of ``index.json`` for a finished run (every shard file present).

    Args:
        folder: the output folder.
        record: the run's record (as in ``run.json``).
        plan: ``(start, stop)`` rows of each shard.
        fmt: the shard format.

    Returns:
        dict: the record, ``shards`` (per shard: ``file``, ``errors_file``, ``rows``,
        ``n_records``, ``n_errors``, ``sha256``), ``n_rows``, ``n_records``, ``n_errors``,
        ``errors_file``.
    """
    folder = Path(folder)
    shards = []
    n_errors = 0
    for k, (start, stop) in enumerate(plan):
        bad = len(read_errors(folder / errors_name(k)))
        n_errors += bad
        shards.append({
            "shard": k,
            "file": shard_name(k, fmt),
            "errors_file": errors_name(k),
            "rows": [start, stop],
            "n_records": (stop - start) - bad,
            "n_errors": bad,
            "sha256": _sha256(folder / shard_name(k, fmt)),
        })
    n_rows = plan[-1][1] if plan else 0
    return dict(
        _canonical(record),
        shards=shards,
        n_rows=n_rows,
        n_records=n_rows - n_errors,
        n_errors=n_errors,
        errors_file=ERRORS_NAME,
    )


def read_index(folder: Path) -> Dict[str, Any]:
    r"""The ``index.json`` of a finished run in ``folder``.

    Raises:
        FileNotFoundError: no ``index.json``: the run has not finished (run the same
            command again to resume it).
    """
    path = Path(folder) / INDEX_NAME
    if not path.is_file():
        raise FileNotFoundError(
            f"{path} does not exist: the run in {folder} has not finished (run the same "
            "command again to resume it)"
        )
    return json.loads(path.read_text(encoding="utf-8"))


def load_attributions(folder: Path, as_dataframe: bool = False) -> Any:
    r"""Every record of a finished run, in row order (bad rows left out).

    Args:
        folder: the output folder.
        as_dataframe (bool): a ``pandas.DataFrame`` (one row per record) instead of a
            list of dicts.

    Returns:
        list of dict or pandas.DataFrame: the records of every shard, in shard order.

    Raises:
        FileNotFoundError: the run has not finished (no ``index.json``).

    Examples::

        >>> df = load_attributions("attr/", as_dataframe=True)   # doctest: +SKIP
        >>> df[["row", "tokens", "scores", "target"]].head()     # doctest: +SKIP
    """
    from .shards import read_shard

    index = read_index(folder)
    records: List[Dict[str, Any]] = []
    for shard in index["shards"]:
        records += read_shard(Path(folder) / shard["file"])
    if as_dataframe:
        import pandas as pd

        return pd.DataFrame.from_records(records, columns=index["model_settings"]["columns"])
    return records
