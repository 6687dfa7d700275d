"""How a model must be run: its inference contract.

Training writes the contract into the artifact's ``config.json`` at export; the one
:class:`~imgxlate.infer.predictor.Predictor` reads it, and training validation, ``imgxlate eval`` and
the batch job all run models through that Predictor, so a model is applied exactly as it was trained
and scored. No other code prepares model inputs.

    sr     geometry 'native': the model sees the image at its own resolution (tiled when large);
           output quantised like the input (8 or 16 bit, gray stays gray)
    style  geometry 'native' in tiles of the training crop (``tile``): trained on crops of
           ``content_size`` at the photos' own pixel scale, and its instance / batch norm statistics are
           those of such a crop, so the image is run at its own resolution in tiles of that size,
           blended; output quantised like the input
    seg    geometry 'resize': trained on whole images squashed to ``size`` x ``size``, so every input
           is squashed the same way (bilinear, antialiased), the logits resized back to the input's
           resolution (bilinear) and thresholded at ``threshold`` (logit 0 = sigmoid 0.5). An input
           with a side more than ``tile_above`` times the training images' side (an 8k scan for a
           model trained on 512 px images) is cut into overlapping windows of the training images'
           size, each squashed exactly as training squashed a whole image, and the logits blended, so
           objects keep the scale training saw and memory is bounded by the window.

The tile side of 'native' geometry is the contract's ``tile`` when it sets one (style), else a property
of the device; a caller may override it, which changes outputs only by the blending at tile seams.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

NORMALISATION = {
    "sr": "RGB in [0, 1] in and out; data mean subtracted inside the model",
    "style": "RGB in [0, 1] in; RGB out, clamp to [0, 1]",
    "seg": "RGB in [0, 1] in, ImageNet mean/std inside the model; logits out (sigmoid for 1 class)",
}


@dataclass(frozen=True)
class Contract:
    task: str                                   # 'sr', 'style' or 'seg'
    geometry: str = "native"                    # 'native' or 'resize' (whole image to size x size)
    size: int | None = None                     # resize: the model's input side (the last training stage's)
    source_size: tuple[int, int] | None = None  # resize: median (h, w) of the training images
    tile_above: float = 4.0                     # resize: windows when a side exceeds this x the source side
    window_overlap: float = 0.125               # resize: overlap of windows, as a fraction of the window
    tile: int | None = None                     # native: the tile side the model must see (None: device's)
    output: str = "image"                       # 'image' (quantised like the input) or 'mask' (0 / 255)
    threshold: float = 0.0                      # mask: foreground where the logit exceeds this
    normalisation: str = ""

    def __post_init__(self):
        if self.geometry not in ("native", "resize"):
            raise ValueError(f"unknown geometry {self.geometry!r}")
        if self.geometry == "resize" and not self.size:
            raise ValueError("a 'resize' contract needs the model's input size")
        if self.source_size is not None:
            object.__setattr__(self, "source_size", tuple(int(v) for v in self.source_size))

    def window(self, h: int, w: int) -> tuple[int, int] | None:
        """resize geometry: the (h, w) window an input of h x w is cut into, or None for the whole image."""
        if self.geometry != "resize" or self.source_size is None:
            return None
        sh, sw = self.source_size
        if h > self.tile_above * sh or w > self.tile_above * sw:
            return min(sh, h), min(sw, w)
        return None

    def describe(self) -> str:
        if self.geometry == "native":
            return f"native resolution in tiles of {self.tile} px" if self.tile else "native resolution, tiled"
        tiles = (f"; windows of {self.source_size[0]}x{self.source_size[1]} above {self.tile_above:g}x that size"
                 if self.source_size else "")
        return f"whole image squashed to {self.size}x{self.size}{tiles}; logits back to the source size"

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["source_size"] = list(self.source_size) if self.source_size else None
        return d


def for_task(task: str, size: int | None = None, source_size: tuple[int, int] | None = None,
             tile: int | None = None) -> Contract:
    """The contract a task's training implies: seg squashes to its last stage's ``size``; style runs in
    tiles of its training crop (``tile``)."""
    if task == "seg":
        return Contract("seg", "resize", size=size or 128, source_size=source_size, output="mask",
                        normalisation=NORMALISATION[task])
    return Contract(task, "native", tile=tile, normalisation=NORMALISATION.get(task, "RGB in [0, 1] in and out"))


def from_meta(meta: dict | None, task: str) -> Contract:
    """The contract recorded in an artifact's config.json. Artifacts written before contracts existed get
    what their training did: seg the last stage's size from the provenance, sr and style native."""
    meta = meta or {}
    if meta.get("contract"):
        known = {f.name for f in dataclasses.fields(Contract)}
        return Contract(**{k: v for k, v in meta["contract"].items() if k in known})   # newer fields ignored
    stages = meta.get("provenance", {}).get("stages") or []
    size = next((s["size"] for s in reversed(stages) if isinstance(s, dict) and s.get("size")), None)
    content = meta.get("provenance", {}).get("config", {}).get("content_size")
    return for_task(task, size=size, tile=content if task == "style" else None)
