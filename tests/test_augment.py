"""Image transform: exact normalisation, batched per-image augmentation, seeded, black fill."""

import pytest
import torch
from pydantic import ValidationError

from ember.data.augment import AugmentConfig, ImageTransform, build_image_transform
from ember.errors import EmberError

GREY = ([0.1307], [0.3081])
RGB = ([0.485, 0.456, 0.406], [0.229, 0.224, 0.225])


def images(b: int, c: int, size: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (b, c, size, size), dtype=torch.uint8, generator=g)


def digits_like(b: int = 64) -> torch.Tensor:
    """8x8 grey strokes on a 0 background, like scikit-learn's digits scaled to 0-255."""
    x = torch.zeros(b, 1, 8, 8, dtype=torch.uint8)
    x[:, 0, 1:7, 3:5] = 255  # a vertical bar ("1")
    x[:, 0, 1, 2:6] = 160
    return x


def reference(x: torch.Tensor, mean, std) -> torch.Tensor:
    m = torch.tensor(mean).view(-1, 1, 1)
    s = torch.tensor(std).view(-1, 1, 1)
    return (x.float() / 255 - m) / s


def seeded(t: ImageTransform, x: torch.Tensor, seed: int) -> torch.Tensor:
    torch.manual_seed(seed)
    return t(x)


@pytest.mark.parametrize("stats,c", [(GREY, 1), (RGB, 3)])
def test_eval_is_exact_normalisation(stats, c):
    mean, std = stats
    x = images(16, c, 8)
    t = build_image_transform(mean, std, AugmentConfig(rotation=30, hflip=1.0)).eval()
    y = t(x)
    assert y.dtype == torch.float32 and y.shape == x.shape
    assert torch.equal(y, reference(x, mean, std))
    assert torch.equal(y[:, -1], (x[:, -1].float() / 255 - mean[-1]) / std[-1])  # per channel


def test_train_with_everything_off_equals_eval():
    x = images(16, 3, 8)
    t = build_image_transform(*RGB, AugmentConfig())
    assert not AugmentConfig().enabled()
    assert torch.equal(t.train()(x), t.eval()(x))


def test_rotation_changes_images_seeded_and_per_image():
    x = digits_like(64)
    t = build_image_transform(*GREY, AugmentConfig(rotation=30)).train()
    a = seeded(t, x, 0)
    assert a.shape == x.shape and a.dtype == torch.float32 and a.device == x.device
    assert not torch.equal(a, reference(x, *GREY))
    assert torch.equal(a, seeded(t, x, 0))  # same seed, same result, bit for bit
    assert not torch.equal(a, seeded(t, x, 1))
    # 64 copies of one image: every copy drew its own angle, so no two outputs match
    flat = a.flatten(1)
    assert torch.cdist(flat, flat).add(torch.eye(64) * 1e9).min() > 0


def test_resume_from_saved_rng_state_is_bit_identical():
    # What ember's checkpoints do: save the torch RNG state, restore it, go on.
    x = images(32, 3, 16)
    t = build_image_transform(
        *RGB,
        AugmentConfig(
            rotation=15,
            scale=(0.9, 1.1),
            translate=0.1,
            crop=0.7,
            hflip=0.5,
            brightness=0.2,
            contrast=0.2,
            saturation=0.2,
            hue=0.05,
            p=0.8,
        ),
    )
    torch.manual_seed(3)
    t(x)
    state = torch.get_rng_state()
    first = [t(x) for _ in range(3)]
    torch.set_rng_state(state)
    again = [t(x) for _ in range(3)]
    assert all(torch.equal(a, b) for a, b in zip(first, again))
    assert not torch.equal(first[0], first[1])


@pytest.mark.parametrize("key,dim", [("hflip", -1), ("vflip", -2)])
def test_flip_with_probability_one_is_exact(key, dim):
    x = images(8, 3, 8)
    t = build_image_transform(*RGB, AugmentConfig(**{key: 1.0}))
    assert torch.equal(t(x), torch.flip(reference(x, *RGB), dims=[dim]))


def test_fill_is_black_in_raw_pixel_space():
    x = torch.zeros(16, 1, 8, 8, dtype=torch.uint8)
    t = build_image_transform(*GREY, AugmentConfig(rotation=45, scale=(0.7, 1.3), translate=0.3, crop=0.5))
    y = seeded(t, x, 0)
    assert torch.allclose(y, torch.full_like(y, (0 - GREY[0][0]) / GREY[1][0]), atol=1e-6)
    # A white image: the corners a rotation uncovers are black (0 before normalising), not
    # mean-grey, which a fill of 0 after normalising would give.
    black = (0 - GREY[0][0]) / GREY[1][0]
    white = torch.full((64, 1, 8, 8), 255, dtype=torch.uint8)
    z = seeded(build_image_transform(*GREY, AugmentConfig(rotation=45)), white, 0)
    corners = z[:, 0, [0, 0, -1, -1], [0, -1, 0, -1]]
    assert corners.min().item() == pytest.approx(black, abs=1e-6) and z.min() >= black - 1e-6


def test_crop_keeps_size_and_changes_images():
    x = images(8, 3, 32)
    y = seeded(build_image_transform(*RGB, AugmentConfig(crop=0.5)), x, 0)
    assert y.shape == x.shape
    assert not torch.equal(y, reference(x, *RGB))


def test_p_gates_each_image():
    x = digits_like(64)
    y = seeded(build_image_transform(*GREY, AugmentConfig(rotation=30, crop=0.8, p=0.5)), x, 0)
    untouched = (y == reference(x, *GREY)).flatten(1).all(1)
    assert 10 < int(untouched.sum()) < 54  # about half, each image on its own
    off = build_image_transform(*GREY, AugmentConfig(rotation=30, p=0.0))
    assert not off.augment.enabled() and torch.equal(off(x), reference(x, *GREY))


@pytest.mark.parametrize("c,size,stats", [(1, 8, GREY), (3, 32, RGB)])
def test_everything_on_runs_and_stays_in_range(c, size, stats):
    extra = dict(saturation=0.3, hue=0.1, hflip=0.5) if c == 3 else {}
    cfg = AugmentConfig(
        rotation=10, scale=(0.9, 1.1), translate=0.1, crop=0.8, brightness=0.3, contrast=0.3, p=0.9, **extra
    )
    x = digits_like(64) if c == 1 else images(64, 3, size)
    y = seeded(build_image_transform(*stats, cfg), x, 0)
    assert y.shape == x.shape and y.dtype == torch.float32 and torch.isfinite(y).all()
    mean, std = (torch.tensor(v).view(1, -1, 1, 1) for v in stats)
    raw = y * std + mean  # back to [0, 1]: nothing overshoots (clamped jitter, bilinear warps)
    assert raw.min() >= -1e-5 and raw.max() <= 1 + 1e-5


def test_user_errors_name_cause_and_fix():
    with pytest.raises(EmberError, match=r"augment\.saturation=0\.4.*3-channel.*Set augment\.saturation=0"):
        build_image_transform(*GREY, AugmentConfig(saturation=0.4))
    with pytest.raises(EmberError, match="augment.hue"):
        ImageTransform(*GREY, AugmentConfig(hue=0.1))
    with pytest.raises(EmberError, match=r"2 mean\(s\).*3 channel\(s\)"):
        ImageTransform([0.5, 0.5], [0.2, 0.2, 0.2], channels=3)
    with pytest.raises(EmberError, match="std"):
        build_image_transform([0.5], [0.0], None)
    with pytest.raises(ValidationError, match="scale"):
        AugmentConfig(scale=(1.2, 0.8))
    with pytest.raises(ValidationError):
        AugmentConfig(rotation=200)
    with pytest.raises(ValidationError):
        AugmentConfig(flip=0.5)  # unknown keys are refused, not ignored
    with pytest.raises(TypeError, match="uint8"):
        build_image_transform(*GREY, None)(torch.zeros(2, 1, 8, 8))
