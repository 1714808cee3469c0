r"""Batches of inputs of different lengths: padding, attention masks, batch plans.

Every model kind pads on the **right**. For an encoder (a sequence classifier) the
attention mask hides the pad positions from every real one. For a causal language model
right padding is exact without position-id bookkeeping: a real token attends only to
the tokens before it, so the pads after a row's last real token change nothing at the
real positions, and the explained logit is read at each row's last *real* position
(:func:`captum_gim.adapters.transformers.answer_token_attribution` does this from the
attention mask). Left padding would need shifted position ids (which
``answer_token_attribution`` also supports); the tests check that right-padded batches
give the batch-size-1 attributions within 1e-5.

A shard's rows are put into batches by :func:`plan_batches`: rows sorted by length (ties
by row number), then cut into ``batch_size`` chunks, so that rows of similar length share
a batch and little is padded. The plan depends only on the shard's rows, never on which
process runs it, so batches (and with them every floating-point rounding) are the same
in a one-process, a two-process and a resumed run.
"""

from __future__ import annotations

from typing import List, Sequence, Tuple

import torch
from torch import Tensor

__all__ = ["pad_right", "plan_batches"]


def pad_right(
    sequences: Sequence[Sequence[int]], pad_id: int, device: torch.device = torch.device("cpu")
) -> Tuple[Tensor, Tensor]:
    r"""Token id lists as one right-padded batch.

    Args:
        sequences: one list of token ids per row (each non-empty).
        pad_id: the id put after each row's last token.
        device: where the tensors go.

    Returns:
        (input_ids, attention_mask): ``(batch, longest)`` int64 tensors; the mask is 1 at
        real tokens and 0 at padding.

    Raises:
        ValueError: no sequences, or an empty one.
    """
    if not sequences:
        raise ValueError("pad_right needs at least one sequence")
    if any(len(s) == 0 for s in sequences):
        raise ValueError("pad_right: every sequence needs at least one token")
    longest = max(len(s) for s in sequences)
    ids = torch.full((len(sequences), longest), int(pad_id), dtype=torch.long)
    mask = torch.zeros((len(sequences), longest), dtype=torch.long)
    for i, s in enumerate(sequences):
        ids[i, : len(s)] = torch.as_tensor(list(s), dtype=torch.long)
        mask[i, : len(s)] = 1
    return ids.to(device), mask.to(device)


def plan_batches(lengths: Sequence[int], batch_size: int) -> List[List[int]]:
    r"""Positions ``0..len(lengths)-1`` grouped into batches of rows of similar length.

    Args:
        lengths: the length of each row (tokens, codes...), in row order.
        batch_size: the most rows per batch.

    Returns:
        list of list of int: positions into ``lengths``; sorted by (length, position) and
        cut into chunks of ``batch_size``. Deterministic.

    Raises:
        ValueError: ``batch_size`` is not a positive integer.
    """
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}")
    order = sorted(range(len(lengths)), key=lambda i: (int(lengths[i]), i))
    return [order[i : i + batch_size] for i in range(0, len(order), batch_size)]
