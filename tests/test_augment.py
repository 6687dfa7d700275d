"""Paired augmentation keeps input and target aligned."""

import torch

from imgxlate.augment import as_pair, dihedral, dihedral_inverse, random_dihedral_pair, segmentation_transform
from imgxlate.models import build


def test_eight_distinct_symmetries_and_their_inverses():
    x = torch.arange(12.0).reshape(1, 3, 4)
    outs = [dihedral(x, k) for k in range(8)]
    assert len({tuple(o.flatten().tolist()) + tuple(o.shape) for o in outs}) == 8
    for k in range(8):
        assert torch.equal(dihedral_inverse(dihedral(x, k), k), x)


def test_pair_gets_the_same_symmetry():
    lr = torch.rand(3, 6, 5)
    hr = build("bicubic", scale=2, matlab_uint8=False)(lr[None])[0]   # HR is a function of LR
    g = torch.Generator().manual_seed(3)
    for _ in range(8):
        a, b = random_dihedral_pair(lr, hr, g)
        expected = build("bicubic", scale=2, matlab_uint8=False)(a[None])[0]
        assert torch.allclose(b, expected, atol=1e-5)  # bicubic commutes with the symmetries


def test_segmentation_transform_moves_mask_with_image_and_keeps_labels():
    torch.manual_seed(0)
    img = torch.zeros(3, 64, 64)
    img[:, 10:30, 20:50] = 1.0
    mask = torch.zeros(1, 64, 64, dtype=torch.uint8)
    mask[:, 10:30, 20:50] = 1
    tf = segmentation_transform(32, photometric=False)
    for _ in range(5):
        im, m = tf(*as_pair(img, mask))
        assert set(m.unique().tolist()) <= {0, 1}       # nearest neighbour: no new labels
        assert ((im[0] > 0.5) == (m[0] == 1)).float().mean() > 0.9
    im, m = segmentation_transform(32)(*as_pair(img, mask))  # photometric changes touch the image only
    assert m.dtype == torch.uint8 and set(m.unique().tolist()) <= {0, 1}
