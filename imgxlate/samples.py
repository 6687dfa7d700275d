"""Sample photos for demos and tests: the public-domain photos that scikit-image ships."""

from __future__ import annotations

import os

from PIL import Image

PHOTOS = ("astronaut", "chelsea", "coffee", "rocket", "hubble_deep_field", "immunohistochemistry", "camera")


HELD_OUT = ("coffee", "chelsea", "rocket")     # the photos held out first, for demos that train


def write_sample_photos(dst: str, max_side: int | None = None, holdout: int = 0) -> list[str]:
    """Write scikit-image's sample photos as PNG files (``camera`` is grayscale); returns the paths.
    ``holdout`` > 0 writes that many (coffee, chelsea, ...) to ``dst/heldout`` and the rest to ``dst/train``."""
    try:
        from skimage import data
    except ImportError as e:
        raise RuntimeError("sample photos need scikit-image: pip install 'imgxlate[demo]'") from e
    os.makedirs(dst, exist_ok=True)
    paths = []
    for name in PHOTOS:
        im = Image.fromarray(getattr(data, name)())
        if max_side and max(im.size) > max_side:
            im.thumbnail((max_side, max_side), Image.Resampling.LANCZOS)
        folder = dst if not holdout else os.path.join(dst, "heldout" if name in HELD_OUT[:holdout] else "train")
        os.makedirs(folder, exist_ok=True)
        path = os.path.join(folder, f"{name}.png")
        im.save(path)
        paths.append(path)
    return paths
