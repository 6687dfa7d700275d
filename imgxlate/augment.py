"""Paired augmentation: geometry applied identically to input and target, photometry to the input.

Randomness enters through an explicit ``torch.Generator``; every transform is a deterministic
function of the parameters drawn from it.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:        # torchvision is imported where it is used: the batch job's model actors use only
    from torchvision import tv_tensors  # dihedral, and importing torchvision costs them ~1.8 s (torch._dynamo)
    from torchvision.transforms import v2

N_DIHEDRAL = 8


def dihedral(x: torch.Tensor, k: int) -> torch.Tensor:
    """The k-th of the 8 symmetries of the square (k in 0..7) on the last two dims: k % 4 quarter
    turns, then a left-right flip when k >= 4. Exact (no resampling), so valid for masks too."""
    if not 0 <= k < N_DIHEDRAL:
        raise ValueError(f"dihedral index must be in 0..7, got {k}")
    x = torch.rot90(x, k % 4, dims=(-2, -1))
    return x.flip(-1) if k >= 4 else x


def dihedral_inverse(x: torch.Tensor, k: int) -> torch.Tensor:
    """Undo :func:`dihedral` (for geometric self-ensembles)."""
    if k >= 4:
        x = x.flip(-1)
    return torch.rot90(x, -(k % 4), dims=(-2, -1))


def random_dihedral_pair(x: torch.Tensor, y: torch.Tensor, generator: torch.Generator | None = None):
    """The same random symmetry applied to an (input, target) pair of any sizes (LR/HR, image/mask)."""
    k = int(torch.randint(N_DIHEDRAL, (1,), generator=generator))
    return dihedral(x, k), dihedral(y, k)


def segmentation_transform(size: int, photometric: bool = True) -> v2.Compose:
    """For (tv_tensors.Image, tv_tensors.Mask) pairs: random resized crop and flips on both (the
    mask resampled nearest-neighbour by torchvision), colour jitter on the image only."""
    from torchvision.transforms import v2

    ops: list = [
        v2.RandomResizedCrop(size, scale=(0.6, 1.0), ratio=(0.8, 1.25), antialias=True),
        v2.RandomHorizontalFlip(),
    ]
    if photometric:
        ops.append(v2.ColorJitter(brightness=0.2, contrast=0.2, saturation=0.2))
    return v2.Compose(ops)


def as_pair(image: torch.Tensor, mask: torch.Tensor) -> tuple[tv_tensors.Image, tv_tensors.Mask]:
    from torchvision import tv_tensors

    return tv_tensors.Image(image), tv_tensors.Mask(mask)
