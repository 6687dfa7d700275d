"""Third-party image-to-image models through spandrel (MIT, https://github.com/chaiNNer-org/spandrel).

``--model`` given a ``.pth``, ``.ckpt`` or ``.safetensors`` file or URI (Real-ESRGAN, SwinIR, HAT, SPAN,
SCUNet, ... as the community publishes them) is read through imgxlate's storage, decoded without
running code (safetensors, or ``torch.load(weights_only=True)``), and handed to spandrel as a
state_dict: spandrel detects the architecture, scale and channels. The model runs through the same
Predictor as imgxlate's own (tiling, batching, alpha, 16-bit, autocast where the architecture supports
it), so the batch job, ``eval sr`` and ``info`` work with it. Only spandrel's main registry is used:
its architectures are all under permissive licences (MIT, Apache-2.0, BSD or public domain); the
non-commercial and copyleft ones live in separate packages that imgxlate does not install.
"""

from __future__ import annotations

import hashlib
import io

import torch
from torch import nn

from imgxlate.artifact import UnsafeWeightsError, state_dict_from_bytes
from imgxlate.infer.contract import Contract
from imgxlate.io import storage
from imgxlate.io.listing import redact

EXTENSIONS = (".pth", ".ckpt", ".safetensors")

# Upstream licences of some architectures spandrel's main registry implements (all permissive).
LICENCES = {
    "ESRGAN": "Apache-2.0 (xinntao/ESRGAN)",
    "Compact": "BSD-3-Clause (xinntao/Real-ESRGAN)",
    "SwinIR": "Apache-2.0 (JingyunLiang/SwinIR)",
    "Swin2SR": "Apache-2.0 (mv-lab/swin2sr)",
    "SCUNet": "Apache-2.0 (cszn/SCUNet)",
    "NAFNet": "MIT (megvii-research/NAFNet)",
}
PERMISSIVE = "permissive (spandrel's main registry: MIT, Apache-2.0, BSD or public domain; see the upstream repository)"


def is_external(spec: str) -> bool:
    return isinstance(spec, str) and spec.split("?", 1)[0].lower().endswith(EXTENSIONS)


def read_state_dict(uri: str) -> tuple[dict, str]:
    """(state_dict, sha256 of the file) from a .safetensors / .pth / .ckpt file or URI, never running code."""
    data = storage.read_bytes(uri)
    sha = hashlib.sha256(data).hexdigest()
    if uri.split("?", 1)[0].lower().endswith(".safetensors"):
        from safetensors.torch import load

        return load(data), sha
    try:
        return state_dict_from_bytes(data, redact(uri)), sha
    except UnsafeWeightsError:
        raise
    except Exception as e:                 # e.g. a TorchScript archive: refused, it would carry code
        raise UnsafeWeightsError(f"{redact(uri)}: not a state_dict file torch.load(weights_only=True) can read: "
                                 f"{type(e).__name__}: {e}") from e


class SpandrelModel(nn.Module):
    """A spandrel ImageModelDescriptor as an imgxlate model: RGB in [0, 1] in, RGB out, ``scale`` x."""
    arch = "spandrel"
    task = "sr"

    def __init__(self, descriptor, meta: dict):
        super().__init__()
        self.descriptor, self.net, self.meta = descriptor, descriptor.model, meta
        self.scale = descriptor.scale
        self.config = meta["architecture"]
        self.supports_half, self.supports_bfloat16 = descriptor.supports_half, descriptor.supports_bfloat16
        self.register_buffer("anchor", torch.zeros(1), persistent=False)   # tells the Predictor the device

    def forward(self, x):                     # (B, 3, H, W) in [0, 1]
        if self.descriptor.input_channels == 1:
            x = (0.299 * x[:, :1] + 0.587 * x[:, 1:2] + 0.114 * x[:, 2:3])  # BT.601 luma
        y = self.descriptor(x)                # spandrel pads to the size requirements and crops back
        return y.expand(-1, 3, -1, -1) if y.shape[1] == 1 else y[:, :3]   # (B, 3, sH, sW)


def describe(uri: str) -> tuple[object, dict]:
    """(spandrel descriptor, metadata as imgxlate records it) for a model file or URI."""
    from spandrel import ImageModelDescriptor, ModelLoader, ModelTiling, UnsupportedModelError

    state, sha = read_state_dict(uri)
    try:
        descriptor = ModelLoader().load_from_state_dict(state)
    except UnsupportedModelError as e:
        raise ValueError(f"{redact(uri)}: spandrel does not recognise this architecture ({e}); "
                         f"non-commercial architectures are not installed") from e
    if not isinstance(descriptor, ImageModelDescriptor):
        raise ValueError(f"{redact(uri)}: a {descriptor.architecture.name} model is not image-to-image "
                         f"(masked/inpainting models are not supported)")
    if descriptor.input_channels not in (1, 3) or descriptor.output_channels not in (1, 3):
        raise ValueError(f"{redact(uri)}: {descriptor.input_channels} -> {descriptor.output_channels} channels; "
                         f"only gray or RGB models are supported")
    arch = descriptor.architecture
    req = descriptor.size_requirements
    whole = descriptor.tiling in (ModelTiling.DISCOURAGED, ModelTiling.INTERNAL)
    contract = Contract("sr", "native", tile=(1 << 30) if whole else None,
                        normalisation="RGB in [0, 1] in and out (spandrel)")
    meta = {
        "format": "spandrel", "arch": f"spandrel:{arch.id}", "architecture": arch.name, "task": "sr",
        "scale": descriptor.scale, "purpose": str(descriptor.purpose),
        "channels": [descriptor.input_channels, descriptor.output_channels],
        "size_requirements": {"minimum": req.minimum, "multiple_of": req.multiple_of, "square": req.square},
        "tiling": descriptor.tiling.name.lower(), "supports_half": descriptor.supports_half,
        "supports_bfloat16": descriptor.supports_bfloat16,
        "n_params": sum(p.numel() for p in descriptor.model.parameters()),
        "licence": LICENCES.get(arch.id, PERMISSIVE), "source": redact(uri),
        "weights_sha256": sha, "sha256": sha, "model_id": f"{arch.id}-x{descriptor.scale}-{sha[:12]}",
        "contract": contract.to_dict(),
    }
    return descriptor, meta


def load(uri: str, device: str | torch.device = "cpu") -> SpandrelModel:
    descriptor, meta = describe(uri)
    return SpandrelModel(descriptor, meta).to(device).eval()


def save_state_dict(state: dict, path: str) -> None:
    """Write a state_dict as .safetensors or .pth by the path's extension (tests, conversions)."""
    if path.lower().endswith(".safetensors"):
        from safetensors.torch import save

        storage.write_bytes(path, save({k: v.contiguous() for k, v in state.items()}))
        return
    buf = io.BytesIO()
    torch.save(state, buf)
    storage.write_bytes(path, buf.getvalue())
