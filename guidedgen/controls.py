"""Extra control images from a reference image (controlnet-aux detectors that need no weights),
for ControlNets after the first (seg) one."""

from __future__ import annotations

from typing import Callable

import numpy as np
import torch
from torch import Tensor


def canny_control(images: Tensor, low_threshold: int = 100, high_threshold: int = 200) -> Tensor:
    """Canny edges of reference images, as ``control_v11p_sd15_canny`` expects them.

    Shape: ``images [N, 3, H, W] in [0, 1] -> [N, 3, H, W] in {0, 1}``.
    """
    import cv2
    from controlnet_aux.canny import CannyDetector  # heavy import, only when asked for

    detector = CannyDetector()
    height, width = images.shape[-2:]
    # controlnet-aux works at multiples of 64 px; bring the map back to the image size after
    resolution = max(64, 64 * round(min(height, width) / 64))
    edges = []
    for image in images:
        array = (image.permute(1, 2, 0).cpu().numpy() * 255 + 0.5).astype(np.uint8)
        out = detector(array, low_threshold=low_threshold, high_threshold=high_threshold,
                       detect_resolution=resolution, image_resolution=resolution, output_type="np")
        out = cv2.resize(out, (width, height), interpolation=cv2.INTER_NEAREST)
        edges.append(torch.from_numpy(np.ascontiguousarray(out)).permute(2, 0, 1).float() / 255.0)
    return torch.stack(edges).to(images.device)


# Config name -> detector(reference images) -> control images.
CONTROL_DETECTORS: dict[str, Callable[[Tensor], Tensor]] = {"canny": canny_control}
