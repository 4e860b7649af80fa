"""Batched image augmentation and normalisation on the training device.

The loader hands over uint8 images ``[B, C, H, W]`` (0-255) already on the device. One
``ImageTransform`` turns them into the float32 input the model expects, for the whole
batch at once and with no per-sample Python loop:

    to float in [0, 1]  ->  random augmentation (training mode only)  ->  (x - mean) / std

Sets prepared from float arrays hold float32 images on their own scale: those skip the
1/255 and go straight to augmentation and ``(x - mean) / std`` (statistics on that scale);
colour jitter, which clamps to [0, 1], is refused for them.

``mean`` and ``std`` are per channel, computed on the [0, 1] scale when the data was
prepared. Validation uses the same module in eval mode: convert and normalise only.

The augmentations are kornia's (``kornia.augmentation``), run in this order: colour
jitter, random resized crop, random affine (rotation, zoom, shift), flips. Colour comes
first and the resampling transforms after it, so the area that a rotation or shift
uncovers is exactly 0 in raw pixel space (black, the digits' background) whatever the
colour settings; normalisation comes last, so that 0 becomes ``(0 - mean) / std``.
Every image draws its own parameters (``same_on_batch=False``).

Randomness comes from torch's global CPU generator, which kornia samples its parameters
from by default; ember's checkpoints save that state, so a resumed run draws the same
augmentations as an uninterrupted one. It stays on the CPU even for CUDA images, on
purpose: kornia's generators hand their parameters back on the CPU (for ranges given as
Python numbers), so sampling them on the GPU would cost a device-to-host sync per batch,
and the CPU draws make a seed give the same augmentations on any device.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from types import ModuleType
from typing import Any

import torch
from pydantic import Field, model_validator
from torch import Tensor, nn

from ember.errors import EmberError
from ember.extras import require
from ember.schema import RecipeModel


class AugmentConfig(RecipeModel):
    """Which random augmentations a training batch gets; the defaults turn every one off."""

    rotation: float = Field(0.0, ge=0, le=180)  # max degrees, uniform in [-rotation, rotation]
    scale: tuple[float, float] = (1.0, 1.0)  # zoom factor range (affine scale), e.g. (0.9, 1.1)
    translate: float = Field(0.0, ge=0, lt=1)  # max shift as a fraction of the width / height
    crop: float = Field(1.0, gt=0, le=1)  # random resized crop: min area fraction kept (1 = off)
    hflip: float = Field(0.0, ge=0, le=1)  # probability; keep 0 for digits (a flipped 2 is not a 2)
    vflip: float = Field(0.0, ge=0, le=1)
    brightness: float = Field(0.0, ge=0, le=1)  # colour jitter strengths, 0 = off
    contrast: float = Field(0.0, ge=0, le=1)
    saturation: float = Field(0.0, ge=0, le=1)  # needs 3 channels
    hue: float = Field(0.0, ge=0, le=0.5)  # needs 3 channels
    p: float = Field(1.0, ge=0, le=1)  # probability that an image gets the crop + affine at all

    @model_validator(mode="after")
    def _scale_range(self) -> AugmentConfig:
        lo, hi = self.scale
        if not 0 < lo <= hi:
            raise ValueError(
                f"augment.scale={list(self.scale)} must be a range [min, max] with 0 < min <= max, "
                "e.g. [0.9, 1.1] (or [1.0, 1.0] for no zoom)"
            )
        return self

    def affine_on(self) -> bool:
        return self.p > 0 and (self.rotation > 0 or self.scale != (1.0, 1.0) or self.translate > 0)

    def crop_on(self) -> bool:
        return self.p > 0 and self.crop < 1

    def color_on(self) -> bool:
        return any(v > 0 for v in (self.brightness, self.contrast, self.saturation, self.hue))

    def enabled(self) -> bool:
        """True if any transform can change an image."""
        return self.affine_on() or self.crop_on() or self.color_on() or self.hflip > 0 or self.vflip > 0


def _kornia() -> ModuleType:
    """kornia.augmentation, imported only when an augmentation is on: images without it need no kornia."""
    return require("kornia.augmentation", "vision", "Image augmentation (a recipe's data.augment section)")


def _color_ops(cfg: AugmentConfig) -> list[nn.Module]:
    if not cfg.color_on():
        return []
    K = _kornia()
    # A fixed order of only the enabled steps: a random order per call would add a
    # permutation draw and a host sync for nothing a classifier needs.
    order = [i for i, v in enumerate((cfg.brightness, cfg.contrast, cfg.saturation, cfg.hue)) if v > 0]
    return [K.ColorJitter(cfg.brightness, cfg.contrast, cfg.saturation, cfg.hue, p=1.0, order=order)]


def _geometric_ops(cfg: AugmentConfig, size: tuple[int, int]) -> list[nn.Module]:
    """Crop and affine for (H, W) = ``size`` images; both always apply, the ``p`` gate is ours."""
    if not (cfg.crop_on() or cfg.affine_on()):
        return []
    K = _kornia()
    ops: list[nn.Module] = []
    if cfg.crop_on():
        # cropping_mode="resample" warps the whole batch in one grid_sample; the default
        # "slice" mode crops image by image in a Python loop with a host sync.
        ops.append(K.RandomResizedCrop(size, scale=(cfg.crop, 1.0), p=1.0, cropping_mode="resample"))
    if cfg.affine_on():
        ops.append(
            K.RandomAffine(  # kornia's default p is 0.5
                degrees=cfg.rotation,
                translate=(cfg.translate, cfg.translate) if cfg.translate > 0 else None,
                scale=cfg.scale if cfg.scale != (1.0, 1.0) else None,
                padding_mode="zeros",
                p=1.0,
            )
        )
    return ops


def _flip_ops(cfg: AugmentConfig) -> list[nn.Module]:
    if not (cfg.hflip > 0 or cfg.vflip > 0):
        return []
    K = _kornia()
    ops: list[nn.Module] = []
    if cfg.hflip > 0:
        ops.append(K.RandomHorizontalFlip(p=cfg.hflip))
    if cfg.vflip > 0:
        ops.append(K.RandomVerticalFlip(p=cfg.vflip))
    return ops


class ImageTransform(nn.Module):
    """uint8 [B,C,H,W] -> float32 normalised [B,C,H,W], with augmentation in training mode.

    ``train()`` / ``eval()`` switch the augmentation on and off. The output is on the
    input's device; call ``.to(device)`` once so that mean and std live there too.
    """

    mean: Tensor
    std: Tensor

    def __init__(
        self,
        mean: Sequence[float],
        std: Sequence[float],
        augment: AugmentConfig | None = None,
        channels: int | None = None,
        pixels: str = "uint8",
    ) -> None:
        super().__init__()
        mean, std = [float(m) for m in mean], [float(s) for s in std]
        channels = len(mean) if channels is None else channels
        if len(mean) != channels or len(std) != channels:
            raise EmberError(
                f"The image normalisation statistics have {len(mean)} mean(s) and {len(std)} std(s), but the "
                f"images have {channels} channel(s); there must be one of each per channel. Prepare the data again "
                "(`ember data prepare`) so that its statistics match its images."
            )
        if not all(s > 0 for s in std):  # also refuses NaN
            raise EmberError(
                f"The image normalisation std {std} has a value <= 0 (a channel that is constant over the whole "
                "training set); dividing by it would give inf or NaN. Check the images, or prepare the data again."
            )
        augment = augment or AugmentConfig()
        _check_float_augment(augment, pixels)
        if augment.enabled():
            _kornia()  # now, not at the first batch: crop and affine are built there
        for key in ("saturation", "hue"):
            value = getattr(augment, key)
            if value > 0 and channels != 3:
                raise EmberError(
                    f"augment.{key}={value} needs colour (3-channel RGB) images, but these have {channels} "
                    f"channel(s). Set augment.{key}=0; brightness and contrast work on any number of channels."
                )
        self.channels = channels
        self.pixels = pixels  # "uint8": 0-255, divided by 255; "float32": values as prepared, not rescaled
        self.augment = augment
        # Not persistent: the statistics belong to the data set, not to a checkpoint of this module.
        self.register_buffer("mean", torch.tensor(mean).view(-1, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std).view(-1, 1, 1), persistent=False)
        self.color = nn.Sequential(*_color_ops(augment))
        self.flips = nn.Sequential(*_flip_ops(augment))
        # Crop and affine are built on the first batch: RandomResizedCrop needs the output size up front.
        self.geometric = nn.Sequential()
        self._size: tuple[int, int] | None = None
        self._pin_rng()

    def _apply(self, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> ImageTransform:
        # kornia moves its parameter sampling to the module's device on .to(); keep it on
        # the CPU generator (see the module docstring).
        out = super()._apply(fn, *args, **kwargs)
        self._pin_rng()
        return out

    def _pin_rng(self) -> None:
        for op in [*self.color, *self.geometric, *self.flips]:
            op.set_rng_device_and_dtype(torch.device("cpu"), torch.float32)

    def _augment(self, x: Tensor) -> Tensor:
        x = self.color(x)
        size = (x.shape[-2], x.shape[-1])
        if self._size != size:
            self.geometric = nn.Sequential(*_geometric_ops(self.augment, size))
            self._pin_rng()
            self._size = size
        if len(self.geometric):
            moved = self.geometric(x)
            if self.augment.p < 1:
                # One draw per image gates crop and affine together; kornia's own p cannot,
                # since RandomResizedCrop's p picks the whole batch or none of it.
                gate = (torch.rand(x.shape[0]) < self.augment.p).to(x.device, non_blocking=True)
                moved = torch.where(gate.view(-1, 1, 1, 1), moved, x)
            x = moved
        return self.flips(x)

    def forward(self, x: Tensor) -> Tensor:
        want = torch.uint8 if self.pixels == "uint8" else torch.float32
        if x.dtype != want or x.ndim != 4 or x.shape[1] != self.channels:
            raise TypeError(
                f"ImageTransform takes {self.pixels} images [B, {self.channels}, H, W]; got {x.dtype} {list(x.shape)}"
            )
        y = x.to(torch.float32) / 255 if self.pixels == "uint8" else x
        if self.training and self.augment.enabled():
            y = self._augment(y)
        return (y - self.mean.to(y.device)) / self.std.to(y.device)


def _check_float_augment(augment: AugmentConfig, pixels: str) -> None:
    """Colour jitter assumes [0, 1] pixels and clamps to that range: on float arrays (any scale)
    it would clip the user's values, so it is refused; crops, affine moves and flips keep them."""
    if pixels == "uint8":
        return
    on = [k for k in ("brightness", "contrast", "saturation", "hue") if getattr(augment, k) > 0]
    if on:
        raise EmberError(
            f"augment.{on[0]}={getattr(augment, on[0])} is colour jitter, which works on 0-255 images and clamps "
            f"to that range; this data set holds float arrays (prepared from float .npz values, kept as they "
            f"are), so it would clip them. Set augment.{'/'.join(on)} to 0; rotation, scale, translate, crop "
            f"and flips work on any values."
        )


def build_image_transform(
    mean: Sequence[float], std: Sequence[float], augment: AugmentConfig | None, pixels: str = "uint8"
) -> ImageTransform:
    """The transform for a data set with these per-channel statistics (one per channel) and pixel
    dtype (``"uint8"``, or ``"float32"`` for float arrays, normalised without the 1/255)."""
    return ImageTransform(mean, std, augment, channels=len(mean), pixels=pixels)
