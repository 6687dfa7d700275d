"""Where pretrained weights come from: torchvision's weights API, a file / URI, or nothing.

A spec is ``'none'`` / ``'random'`` (no pretrained weights), ``'imagenet'`` (torchvision's cache,
downloaded when the network allows) or a local path / fsspec URI of a ``state_dict`` saved with
``torch.save`` (loaded with ``weights_only=True``: never arbitrary pickle).
"""

from __future__ import annotations

import torch

from imgxlate.artifact import read_state_dict

NO_WEIGHTS = ("none", "random", "", None)


class PretrainedUnavailable(RuntimeError):
    pass


def imagenet_state_dict(weights_enum, what: str) -> dict:
    try:
        return weights_enum.get_state_dict(progress=False, check_hash=False)
    except Exception as e:  # URLError, socket errors, HTTP errors: all mean "not reachable"
        cache = torch.hub.get_dir() + "/checkpoints"
        raise PretrainedUnavailable(
            f"ImageNet weights for {what} are not in torchvision's cache ({cache}) and could not be "
            f"downloaded ({type(e).__name__}: {e}). Alternatives: copy the file "
            f"'{weights_enum.url.rsplit('/', 1)[-1]}' into that folder, pass a local path or s3:// URI "
            f"of a state_dict, or use 'random' / 'none' for untrained weights."
        ) from e


def state_dict(spec: str | None, weights_enum, what: str) -> dict | None:
    """The state_dict a spec names; None for 'none' / 'random' (keep the random init)."""
    if spec in NO_WEIGHTS:
        return None
    return imagenet_state_dict(weights_enum, what) if spec == "imagenet" else read_state_dict(spec)


def encoder_state(config) -> dict | None:
    """The ResNet34 state_dict a U-Net config's ``encoder_weights`` names (None: random init)."""
    from torchvision.models import ResNet34_Weights

    return state_dict(getattr(config, "encoder_weights", None), ResNet34_Weights.IMAGENET1K_V1, "resnet34")
