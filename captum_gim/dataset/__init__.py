r"""Attribute a whole dataset: the package behind ``captum-gim attribute``.

- :func:`attribute_dataset`: every row of a JSONL/CSV file, ``datasets.Dataset``, list of
  dicts or PyHealth ``SampleDataset``, attributed in batches into shard files that can be
  resumed after a crash and shared between processes (``torchrun``, ``accelerate
  launch``); see :mod:`captum_gim.dataset.run`.
- :func:`load_attributions`: the records of a finished run (a list of dicts or a
  ``pandas.DataFrame``).
- :class:`Backend`, :class:`BadRow`, :class:`Encoded`, :class:`MethodSettings`: to plug in
  a model kind of your own through a ``module:function`` entry point
  (:mod:`captum_gim.dataset.entry`).

The output folder (:mod:`captum_gim.dataset.shards`, :mod:`captum_gim.dataset.manifest`):
``shard-00000.parquet`` ... (or ``.safetensors``), one errors file per shard, the merged
``errors.jsonl``, ``run.json`` (the recorded arguments) and ``index.json``.
"""

from .backend import Backend, BadRow, Encoded
from .manifest import ArgumentsMismatch, load_attributions, read_index
from .methods import METHODS, MethodSettings
from .run import AttributeRun, attribute_dataset

__all__ = [
    "attribute_dataset",
    "AttributeRun",
    "load_attributions",
    "read_index",
    "ArgumentsMismatch",
    "Backend",
    "BadRow",
    "Encoded",
    "MethodSettings",
    "METHODS",
]
