"""eprun.data.augment: per-batch random crop with padding and horizontal flip."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from eprun.data import AugmentConfig
from eprun.data.augment import augment
from eprun.errors import DataError


def distinct_batch(batch: int = 64, channels: int = 3, height: int = 8, width: int = 10) -> torch.Tensor:
    """Float32 images whose values are all distinct and ≥ 1 (so zero padding is recognisable)."""
    return torch.arange(1, 1 + batch * channels * height * width, dtype=torch.float32).view(
        batch, channels, height, width
    )


def reference(x: torch.Tensor, cfg: AugmentConfig, seed: int) -> torch.Tensor:
    """Test oracle: the documented draws (δy, δx, then f), applied one example at a time."""
    generator = torch.Generator().manual_seed(seed)
    batch, _, height, width = x.shape
    p = cfg.random_crop_padding
    dy = torch.randint(0, 2 * p + 1, (batch,), generator=generator)
    dx = torch.randint(0, 2 * p + 1, (batch,), generator=generator)
    no_flip = torch.zeros(batch, dtype=torch.bool)
    flip = torch.rand((batch,), generator=generator) < 0.5 if cfg.horizontal_flip else no_flip
    mode = {"zeros": "constant", "reflect": "reflect", "replicate": "replicate"}[cfg.padding_mode]
    out = []
    for b in range(batch):
        padded = F.pad(x[b:b + 1], (p, p, p, p), mode=mode)[0] if p else x[b]
        crop = padded[:, int(dy[b]):int(dy[b]) + height, int(dx[b]):int(dx[b]) + width]
        out.append(crop.flip(-1) if flip[b] else crop)
    return torch.stack(out)


def test_identity_when_off():
    x = distinct_batch()
    generator = torch.Generator().manual_seed(0)
    state = generator.get_state()
    assert augment(x, AugmentConfig(), generator) is x
    assert torch.equal(generator.get_state(), state)  # no draws either
    assert not AugmentConfig().enabled


CASES = [(mode, flip, p) for mode in ("zeros", "reflect", "replicate") for flip in (False, True)
         for p in (0, 1, 3) if p or flip]


@pytest.mark.parametrize("mode, flip, p", CASES)
def test_matches_per_example_reference(mode, flip, p):
    x = distinct_batch(batch=32)
    cfg = AugmentConfig(random_crop_padding=p, padding_mode=mode, horizontal_flip=flip)
    out = augment(x, cfg, torch.Generator().manual_seed(11))
    assert out.shape == x.shape and out.dtype == torch.float32 and out.device == x.device
    assert torch.equal(out, reference(x, cfg, seed=11))


def test_crop_shifts_content_by_at_most_p():
    p = 2
    x = distinct_batch(batch=200, channels=2, height=6, width=7)
    out = augment(x, AugmentConfig(random_crop_padding=p), torch.Generator().manual_seed(0))
    assert out.shape == x.shape
    _, _, height, width = x.shape
    shifts = set()
    for b in range(len(x)):
        # Locate the shift from one surviving pixel (values are distinct), then check all pixels.
        i, j = (out[b, 0] != 0).nonzero()[0].tolist()
        src = (x[b, 0] == out[b, 0, i, j]).nonzero()[0].tolist()
        sy, sx = src[0] - i, src[1] - j
        assert abs(sy) <= p and abs(sx) <= p
        shifted = torch.zeros_like(x[b])
        for r in range(height):
            for c in range(width):
                if 0 <= r + sy < height and 0 <= c + sx < width:
                    shifted[:, r, c] = x[b, :, r + sy, c + sx]
        assert torch.equal(out[b], shifted)
        shifts.add((sy, sx))
    assert shifts == {(sy, sx) for sy in range(-p, p + 1) for sx in range(-p, p + 1)}


def test_flip_flips_exactly_the_chosen_examples():
    x = distinct_batch(batch=64)
    out = augment(x, AugmentConfig(horizontal_flip=True), torch.Generator().manual_seed(5))
    generator = torch.Generator().manual_seed(5)
    torch.randint(0, 1, (64,), generator=generator)  # δy, δx: always 0 without padding
    torch.randint(0, 1, (64,), generator=generator)
    chosen = torch.rand((64,), generator=generator) < 0.5
    assert 10 < int(chosen.sum()) < 54
    assert torch.equal(out[chosen], x[chosen].flip(-1))
    assert torch.equal(out[~chosen], x[~chosen])


def test_deterministic_given_seed_and_input_untouched():
    x = torch.randn(16, 3, 12, 12, generator=torch.Generator().manual_seed(0))
    before = x.clone()
    cfg = AugmentConfig(random_crop_padding=4, padding_mode="reflect", horizontal_flip=True)
    a = augment(x, cfg, torch.Generator().manual_seed(42))
    b = augment(x, cfg, torch.Generator().manual_seed(42))
    c = augment(x, cfg, torch.Generator().manual_seed(43))
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert torch.equal(x, before)
    # One generator across batches: successive batches differ, and the sequence is reproducible.
    g1, g2 = torch.Generator().manual_seed(7), torch.Generator().manual_seed(7)
    first, second = augment(x, cfg, g1), augment(x, cfg, g1)
    assert not torch.equal(first, second)
    assert torch.equal(first, augment(x, cfg, g2)) and torch.equal(second, augment(x, cfg, g2))


def test_non_contiguous_input():
    x = distinct_batch(batch=8, height=9, width=9).transpose(2, 3)
    cfg = AugmentConfig(random_crop_padding=2, horizontal_flip=True)
    assert torch.equal(augment(x, cfg, torch.Generator().manual_seed(1)), reference(x, cfg, seed=1))


def test_reflect_padding_too_large():
    x = distinct_batch(batch=2, height=4, width=4)
    with pytest.raises(DataError, match=r"reflect padding needs p < the image size 4×4"):
        augment(x, AugmentConfig(random_crop_padding=4, padding_mode="reflect"), torch.Generator())


def test_needs_a_4d_batch():
    with pytest.raises(ValueError, match=r"\(B, C, H, W\)"):
        augment(torch.zeros(4, 784), AugmentConfig(horizontal_flip=True), torch.Generator())


def test_check():
    assert list(AugmentConfig(random_crop_padding=4, padding_mode="reflect", horizontal_flip=True).check()) == []
    problems = dict(AugmentConfig(random_crop_padding=-1, padding_mode="wrap", horizontal_flip="yes").check())
    assert set(problems) == {"random_crop_padding", "padding_mode", "horizontal_flip"}
    assert "got -1" in problems["random_crop_padding"]
    assert "zeros, reflect, replicate" in problems["padding_mode"]
    assert "random_crop_padding" in dict(AugmentConfig(random_crop_padding=1.5).check())
