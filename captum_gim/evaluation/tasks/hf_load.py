r"""Loading local Hugging Face checkpoints for ``compare``: quietly, offline, and only
with a tokenizer that fits.

- :func:`quiet_transformers`: transformers' load report and progress bars off, inside a block.
- :func:`load_tokenizer`: the checkpoint's own tokenizer, or a clear error.
- :func:`check_known_tokens`: refuses a tokenizer that maps most of the input to the
  unknown token.
"""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Any, Iterable, Iterator

__all__ = [
    "MAX_UNKNOWN_SHARE", "quiet_transformers", "checkpoint_config", "load_tokenizer",
    "check_known_tokens",
]

#: the most of an input's tokens (special tokens aside) that may be the unknown token
MAX_UNKNOWN_SHARE = 0.5

#: files any one of which makes a directory hold a tokenizer
_TOKENIZER_FILES = (
    "tokenizer.json", "tokenizer_config.json", "vocab.txt", "vocab.json", "tokenizer.model",
    "spiece.model", "sentencepiece.bpe.model", "merges.txt", "tokenizer.tiktoken",
)


@contextlib.contextmanager
def quiet_transformers() -> Iterator[None]:
    r"""Inside the block transformers logs errors only and shows no progress bar (its load
    report, e.g. ``lm_head.weight UNEXPECTED``, and vocabulary notices are chatter to a
    user of ``compare``); the previous verbosity and progress-bar setting come back on
    exit."""
    from transformers.utils import logging as hf_logging

    verbosity = hf_logging.get_verbosity()
    bars = hf_logging.is_progress_bar_enabled()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        hf_logging.set_verbosity(verbosity)
        if bars:
            hf_logging.enable_progress_bar()


def checkpoint_config(path: Path) -> Any:
    r"""The configuration of the local checkpoint ``path`` (its ``config.json``, read
    quietly, offline).

    Raises:
        FileNotFoundError: ``path`` has no ``config.json``.
    """
    from transformers import AutoConfig

    path = Path(path)
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"{path} is not a Hugging Face checkpoint (no config.json)")
    with quiet_transformers():
        return AutoConfig.from_pretrained(str(path), local_files_only=True)


def load_tokenizer(path: Path) -> Any:
    r"""The tokenizer saved in checkpoint directory ``path``, loaded offline and quietly.

    Raises:
        ValueError: the directory has no tokenizer files, or transformers cannot build a
            tokenizer from them (a compared model needs the tokenizer it was trained with:
            any other would map the text to the wrong ids, most of them unknown).
    """
    from transformers import AutoTokenizer

    path = Path(path)
    how = (
        f"save the model's tokenizer next to it (tokenizer.save_pretrained({str(path)!r})) "
        "and run again"
    )
    if not any((path / f).is_file() for f in _TOKENIZER_FILES):
        raise ValueError(
            f"{path} has no tokenizer files (none of {', '.join(_TOKENIZER_FILES)}); "
            f"compare needs the tokenizer the model was trained with: {how}"
        )
    try:
        with quiet_transformers():
            return AutoTokenizer.from_pretrained(str(path), local_files_only=True)
    except Exception as e:  # transformers raises ValueError, OSError, TypeError... here
        raise ValueError(
            f"could not load the tokenizer of {path} ({type(e).__name__}: "
            f"{str(e).splitlines()[0] if str(e) else e}); {how}"
        ) from e


def check_known_tokens(tokenizer: Any, texts: Iterable[str], path: Path) -> float:
    r"""The share of unknown tokens in ``texts`` (special tokens aside); refuses the
    tokenizer when it exceeds :data:`MAX_UNKNOWN_SHARE`.

    Raises:
        ValueError: most tokens are the unknown token: the tokenizer does not fit the
            model or the text, and every attribution would be to ``[UNK]``.
    """
    unk = getattr(tokenizer, "unk_token_id", None)
    if unk is None:
        return 0.0
    total = unknown = 0
    for text in texts:
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        total += len(ids)
        unknown += sum(int(i) == unk for i in ids)
    share = unknown / total if total else 0.0
    if share > MAX_UNKNOWN_SHARE:
        raise ValueError(
            f"the tokenizer of {path} turns {unknown} of {total} input tokens "
            f"({share:.0%}) into the unknown token {tokenizer.unk_token!r}; it is not the "
            "tokenizer this model was trained with, or the inputs are in a language or "
            "script it does not cover. Save the model's own tokenizer next to it."
        )
    return share
