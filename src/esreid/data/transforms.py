"""Image transforms: PIL image in, normalised float tensor [3, H, W] out.

Training adds the paper's random horizontal flip and, optionally, the Bag-of-Tricks
pad-and-random-crop; evaluation only resizes and normalises.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torchvision.transforms import InterpolationMode, v2

__all__ = ["IMAGENET_MEAN", "IMAGENET_STD", "build_transforms"]

IMAGENET_MEAN: tuple[float, float, float] = (0.485, 0.456, 0.406)
IMAGENET_STD: tuple[float, float, float] = (0.229, 0.224, 0.225)


def build_transforms(
    height: int,
    width: int,
    is_train: bool,
    flip_prob: float = 0.5,
    pad: int = 0,
    random_erasing: float = 0.0,
    mean: Sequence[float] = IMAGENET_MEAN,
    std: Sequence[float] = IMAGENET_STD,
) -> Callable:
    """Build the train or eval transform for ``height`` x ``width`` inputs.

    Both resize with bilinear interpolation (antialiased) to exactly (height, width),
    convert to float in [0, 1] and normalise channel-wise with ``mean``/``std``. With
    ``is_train`` the image is also flipped horizontally with probability ``flip_prob`` and,
    when ``pad > 0``, zero-padded (black, before normalisation) by ``pad`` pixels on every
    side and randomly cropped back to (height, width), and with probability ``random_erasing``
    a rectangle of 2-40% of its area (aspect 0.3-3.3) is set to 0 after normalisation, i.e.
    to the mean pixel (Random Erasing, Zhong et al.). Randomness comes from torch's global
    generator. Returns a callable taking an RGB PIL image and returning a float32 tensor
    [3, height, width].
    """
    if height < 1 or width < 1:
        raise ValueError(
            f"build_transforms: height and width must be positive, got height={height}, "
            f"width={width}"
        )
    if not 0.0 <= flip_prob <= 1.0:
        raise ValueError(f"build_transforms: flip_prob must be in [0, 1], got {flip_prob}")
    if pad < 0:
        raise ValueError(f"build_transforms: pad must be >= 0, got {pad}")
    if not 0.0 <= random_erasing <= 1.0:
        raise ValueError(
            f"build_transforms: random_erasing must be in [0, 1], got {random_erasing}")
    if len(mean) != 3 or len(std) != 3:
        raise ValueError(
            f"build_transforms: mean and std need 3 values (RGB), got mean={tuple(mean)}, "
            f"std={tuple(std)}"
        )
    if any(s <= 0 for s in std):
        raise ValueError(f"build_transforms: std values must be positive, got {tuple(std)}")

    steps: list[Callable] = [
        v2.ToImage(),
        v2.Resize((height, width), interpolation=InterpolationMode.BILINEAR, antialias=True),
    ]
    if is_train:
        steps.append(v2.RandomHorizontalFlip(p=flip_prob))
        if pad > 0:
            steps.append(v2.Pad(pad, fill=0))
            steps.append(v2.RandomCrop((height, width)))
    steps += [
        v2.ToDtype(torch.float32, scale=True),
        v2.Normalize(mean=list(mean), std=list(std)),
    ]
    if is_train and random_erasing > 0:
        steps.append(v2.RandomErasing(p=random_erasing, scale=(0.02, 0.4), ratio=(0.3, 3.3),
                                      value=0.0))
    steps += [
        # Plain tensors collate and move between processes without tv_tensors metadata.
        v2.ToPureTensor(),
    ]
    return v2.Compose(steps)
