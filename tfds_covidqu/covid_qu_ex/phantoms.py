"""Procedural chest-X-ray-like phantoms (the `synthetic` config of `covid_qu_ex`); needs only NumPy and Pillow.

A phantom has a dark background, a bright torso with a brighter mediastinum/spine band, two dark lung fields
(tall, wider at the base, domed diaphragm, heart notch on the image-right lung; random size/position jitter),
rib bands and smooth texture noise. "COVID-19" phantoms get 1-4 (more if tiny) patchy brighter opacities inside
the lungs and `infection_mask = opacity core ∩ lung`; "Non-COVID" phantoms get a faint diffuse haze (no mask),
"Normal" ones nothing. Everything is driven by the given `numpy.random.Generator`, so a seed fixes the bytes.

    >>> rng = np.random.default_rng(0)
    >>> image, lung, infection = make_phantom(rng, "COVID-19")   # uint8 HxW, {0,1}, {0,1}
"""

from __future__ import annotations

import numpy as np
from PIL import Image, ImageFilter

from .sources import CLASS_NAMES  # the builder's one list of class names (sources needs only NumPy and Pillow too)

# Split sizes of the `synthetic` config and the 2:1:1 class pattern (index % 4) used for labels.
SPLIT_SIZES = {"train": 300, "validation": 60, "test": 60}
_LABEL_CYCLE = (0, 0, 1, 2)
_SPLIT_IDS = {"train": 0, "validation": 1, "test": 2}
BASE_SEED = 20210519


def label_for_index(index: int) -> str:
    """Class of the `index`-th phantom of a split (COVID-19, COVID-19, Non-COVID, Normal, ...): 2:1:1."""
    return CLASS_NAMES[_LABEL_CYCLE[index % len(_LABEL_CYCLE)]]


def rng_for(split: str, index: int) -> np.random.Generator:
    """The generator of example `index` of `split`: independent of build order, same on every machine."""
    return np.random.default_rng(np.random.SeedSequence([BASE_SEED, _SPLIT_IDS[split], index]))


def _smooth_noise(rng: np.random.Generator, size: int, cells: int) -> np.ndarray:
    """Zero-mean, unit-ish smooth noise: a cells x cells random grid upsampled bicubically to size x size."""
    grid = rng.standard_normal((cells, cells)).astype(np.float32)
    im = Image.fromarray(grid).resize((size, size), Image.Resampling.BICUBIC)
    return np.asarray(im, dtype=np.float32)


def _blur_mask(mask: np.ndarray, radius: float) -> np.ndarray:
    """Soft version (float32 0..1) of a boolean mask: Pillow's Gaussian blur on 8 bits."""
    im = Image.fromarray(mask.astype(np.uint8) * np.uint8(255)).filter(ImageFilter.GaussianBlur(radius))
    return np.asarray(im, dtype=np.float32) / np.float32(255.0)


def _lung_field(rng: np.random.Generator, yy: np.ndarray, xx: np.ndarray, side: int, jitter: tuple) -> np.ndarray:
    """Boolean lung field; side -1 = image left (patient's right), +1 = image right (patient's left)."""
    dx0, dy0, scale = jitter
    cx = 0.5 + side * (0.185 + rng.uniform(-0.015, 0.015)) + dx0
    cy = 0.47 + rng.uniform(-0.02, 0.02) + dy0
    rx = (0.13 + rng.uniform(-0.012, 0.012)) * scale
    ry = (0.27 + rng.uniform(-0.02, 0.02)) * scale
    dx = (xx - cx) * side  # > 0 lateral
    dy = yy - cy  # > 0 caudal
    # Narrow apex, wide base; the lateral border bulges, the medial border is straighter.
    width = rx * (0.62 + 0.48 * np.clip((dy / ry + 1.0) / 2.0, 0.0, 1.0)) * np.where(dx > 0, 1.08, 0.92)
    rho = np.sqrt((dx / width) ** 2 + (dy / ry) ** 2)
    theta = np.arctan2(dy, dx)
    wobble = np.ones_like(rho)
    for k in (2, 3, 5):
        wobble += rng.uniform(0.0, 0.045) * np.cos(k * theta + rng.uniform(0, 2 * np.pi))
    field = rho < wobble
    # Domed diaphragm, lowest laterally (costophrenic angle).
    dome = cy + ry * (0.80 + rng.uniform(-0.05, 0.05)) + 0.35 * np.clip(dx, -1, 1) ** 2 / max(rx, 1e-3) * 0.5
    field &= yy < dome
    if side > 0:  # heart shadow notch on the image-right (patient's left) lung
        hx, hy = 0.5 + 0.07 + rng.uniform(-0.01, 0.01), cy + ry * 0.55
        heart = ((xx - hx) / (0.11 + rng.uniform(-0.01, 0.015))) ** 2 + ((yy - hy) / 0.13) ** 2 < 1.0
        field &= ~heart
    return field


def make_phantom(
    rng: np.random.Generator, label: str | int = "COVID-19", size: int = 256
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """One phantom: (image uint8 HxW, lung_mask uint8 {0,1}, infection_mask uint8 {0,1}).

    `label` is a class name of CLASS_NAMES or its index; the infection mask is empty unless "COVID-19" and
    always lies inside the lung mask.
    """
    if isinstance(label, (int, np.integer)):
        label = CLASS_NAMES[int(label)]
    if label not in CLASS_NAMES:
        raise ValueError(f"unknown label {label!r}; expected one of {CLASS_NAMES}")
    s = size
    yy, xx = np.mgrid[0:s, 0:s].astype(np.float32) / np.float32(s)
    shift = (rng.uniform(-0.03, 0.03), rng.uniform(-0.03, 0.03), rng.uniform(0.9, 1.1))

    # Torso: a boxy superellipse reaching below the image, brighter near the midline.
    bcx, bcy = 0.5 + shift[0], 0.62 + shift[1]
    bax, bay = 0.44 + rng.uniform(-0.03, 0.03), 0.62
    d = np.abs((xx - bcx) / bax) ** 2.6 + np.abs((yy - bcy) / bay) ** 2.6
    body = np.clip((1.0 - d) / 0.08, 0.0, 1.0)
    body_level = rng.uniform(150, 180)
    img = 12.0 + (body_level - 12.0) * body
    img += 28.0 * np.exp(-(((xx - bcx) / 0.05) ** 2)) * body  # mediastinum / spine
    img += 10.0 * (1.0 - np.abs(xx - bcx) / 0.5) * body

    # Lungs.
    lung = _lung_field(rng, yy, xx, -1, shift) | _lung_field(rng, yy, xx, +1, shift)
    lung_soft = _blur_mask(lung, 2.0 * s / 256)
    depth = rng.uniform(80, 105) * (1.05 - 0.25 * yy)  # darker apex
    img -= depth * lung_soft

    # Ribs: curved bands, more visible over the dark lungs.
    period = rng.uniform(0.075, 0.09)
    phase = rng.uniform(0, 2 * np.pi)
    curve = yy - 0.9 * (xx - bcx) ** 2
    ribs = np.clip((np.sin(2 * np.pi * curve / period + phase) - 0.35) / 0.65, 0.0, 1.0)
    img += rng.uniform(12, 20) * ribs * (0.35 + 0.65 * lung_soft) * body

    # COVID-19: patchy opacities whose core (field > 0.5) inside the lung is the infection mask.
    infection = np.zeros((s, s), dtype=bool)
    if label == "COVID-19":
        ys, xs = np.nonzero(lung)
        weights = (ys.astype(np.float64) / s + 0.25) * (1.0 + 1.5 * np.abs(xs / s - 0.5))  # lower, peripheral
        weights /= weights.sum()
        field = np.zeros((s, s), dtype=np.float32)
        patchy = 1.0 + 0.35 * _smooth_noise(rng, s, 12)
        n_blobs, min_pixels = int(rng.integers(1, 5)), int(0.003 * s * s)
        b = 0
        while b < n_blobs or (b < 8 and ((field * patchy > 0.5) & lung).sum() < min_pixels):
            b += 1
            i = rng.choice(len(ys), p=weights)
            cy, cx = ys[i] / s, xs[i] / s
            for _ in range(int(rng.integers(1, 4))):
                oy, ox = rng.normal(0, 0.025, size=2)
                sy, sx = rng.uniform(0.025, 0.06, size=2)
                field += np.exp(-0.5 * (((yy - cy - oy) / sy) ** 2 + ((xx - cx - ox) / sx) ** 2))
        field = np.clip(field * patchy, 0.0, 1.5)
        infection = (field > 0.5) & lung
        img += rng.uniform(35, 55) * np.clip(field, 0.0, 1.0) * lung_soft
    elif label == "Non-COVID":  # faint diffuse haze without a mask
        img += (6.0 + 4.0 * _smooth_noise(rng, s, 24)) * lung_soft

    # Texture, contrast/brightness jitter, sensor noise.
    img += 7.0 * _smooth_noise(rng, s, 20) * (0.3 + body)
    img = (img - 110.0) * rng.uniform(0.9, 1.1) + 110.0 + rng.uniform(-8, 8)
    img += rng.normal(0.0, 3.0, size=(s, s))
    image = np.clip(np.rint(img), 0, 255).astype(np.uint8)
    return image, lung.astype(np.uint8), infection.astype(np.uint8)


def synthetic_example(split: str, index: int, size: int = 256) -> dict:
    """The `index`-th example of `split` of the `synthetic` config as arrays (image, masks, label, file_name)."""
    label = label_for_index(index)
    image, lung, infection = make_phantom(rng_for(split, index), label, size=size)
    return {
        "image": image,
        "lung_mask": lung,
        "infection_mask": infection,
        "label": label,
        "file_name": f"synthetic_{split}_{index:04d}.png",
    }
