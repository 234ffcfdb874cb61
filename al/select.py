"""Per-image pixel selection rules: which n pixels of one image to query, given its score map.

A rule is ``rule(scores: Tensor[H, W], available: BoolTensor[H, W], n, generator) -> LongTensor[n, 2]``
returning (row, col) coordinates. Pixels where ``available`` is False (already labelled, or
void) are never returned; NaN scores rank last.
"""

from __future__ import annotations

import math
from typing import Callable, Optional

import torch
from torch import Tensor

from al.registry import Registry


class NotEnoughPixelsError(ValueError):
    """An image has fewer unlabelled pixels than the number asked for."""


def _candidates(scores: Tensor, available: Tensor, n: int) -> tuple[Tensor, Tensor]:
    """Flat indices of available pixels and their scores (NaN -> -inf)."""
    if scores.shape != available.shape:
        raise ValueError(f"scores {tuple(scores.shape)} and available {tuple(available.shape)} differ in shape")
    index = available.reshape(-1).nonzero().squeeze(1)
    if n > index.numel():
        raise NotEnoughPixelsError(
            f"asked for {n} pixels but only {index.numel()} are unlabelled; lower pixels_per_image "
            f"or the number of cycles"
        )
    values = scores.reshape(-1)[index].double()
    values = torch.nan_to_num(values, nan=-math.inf)
    return index, values


def _to_coords(flat: Tensor, width: int) -> Tensor:
    return torch.stack([flat // width, flat % width], dim=1)


def top_n(scores: Tensor, available: Tensor, n: int, generator: Optional[torch.Generator] = None) -> Tensor:
    """The n available pixels with the largest scores (BalEntAcq's Figure 1 rule).

    Shape: ``scores [H, W], available [H, W] -> [n, 2]`` (row, col).
    """
    index, values = _candidates(scores, available, n)
    chosen = index[values.topk(n).indices]
    return _to_coords(chosen, scores.shape[-1])


def pixelpick(
    scores: Tensor,
    available: Tensor,
    n: int,
    generator: Optional[torch.Generator] = None,
    top_fraction: float = 0.05,
) -> Tensor:
    """PixelPick's diversity rule: keep the top ``top_fraction`` of available pixels by score
    (at least n), then draw n of them uniformly without replacement.

    Shape: ``scores [H, W], available [H, W] -> [n, 2]`` (row, col).
    """
    index, values = _candidates(scores, available, n)
    pool_size = max(n, math.ceil(top_fraction * index.numel()))
    pool = index[values.topk(pool_size).indices]
    draw = torch.randperm(pool_size, generator=generator, device=generator.device if generator else "cpu")[:n]
    return _to_coords(pool[draw.to(pool.device)], scores.shape[-1])


SelectFn = Callable[[Tensor, Tensor, int, Optional[torch.Generator]], Tensor]

# Config name (loop.selection) -> rule; open: register_selection("name", fn).
SELECTION_RULES: Registry[SelectFn] = Registry("selection rule", {
    "topn": top_n,
    "pixelpick": pixelpick,
})
register_selection = SELECTION_RULES.register
