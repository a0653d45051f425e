"""Seeded images that are NOT chest X-rays: the out-of-distribution set the input gate must refuse.

Used by the gate's tests (tests/test_ood_gate.py) and by `bench/ood_gate.py`, which reports the gate's statistics
on them beside those of the real COVID-QU-Ex images. Every image is made from `numpy.random.default_rng(seed)`
alone (NumPy and Pillow, no files), so one seed always gives the same bytes:

    >>> from covidseg_tf.nonxray import make_all
    >>> images = make_all(seed=0)          # {name: uint8 array, H x W (grey) or H x W x 3 (colour)}

The kinds (`KINDS`) and what the gate is expected to say about each (`EXPECTED`: the check that refuses it
first, `covidseg_tf.limits.GATE_CHECKS`):

    rgb_noise       uniform random RGB noise                                     colour
    photo           a synthetic colour "scene": sky and ground gradients, saturated shapes   colour
    photo_small     the same scene at 300 x 400 (a photo's aspect)               colour
    grey_noise      uniform random grey noise                                    noise
    gradient        a smooth grey ramp                                           smooth
    text            rendered black text on white paper                           reported only (refused by
                                                                                 the lung checks with version 2's
                                                                                 and 5's lung models, not 3's)
    checkerboard    8 x 8 grey squares                                           lungs
    ct_like         a dark image with a bright disc (a CT slice's statistics)    lungs
    mri_like        a dark image with a textured grey oval, bright rim, small dark ventricles (a brain MRI's)  lungs
    blobs_on_black  a grey oval on black with coarse dark blotches               reported only (`REQUIRED`
                                                                                 leaves it out; see its doc)
    grey_photo      `photo` in black and white                                   reported only (most pass)

"lungs" needs trained lung models (a random model's probability map says nothing), so only the colour, noise
and smooth kinds are refused whatever the models are.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

SIDE = 256

EXPECTED: dict[str, str | None] = {
    "rgb_noise": "colour", "photo": "colour", "photo_small": "colour", "grey_noise": "noise",
    "gradient": "smooth", "text": None, "checkerboard": "lungs", "ct_like": "lungs", "mri_like": "lungs",
    "blobs_on_black": None, "grey_photo": None,
}
"""Kind -> the gate check expected to refuse it first (see the module docstring); None: reported only."""


def _grid(h: int, w: int) -> tuple[np.ndarray, np.ndarray]:
    """(y, x) coordinates in 0..1 of an h x w image."""
    y, x = np.mgrid[0:h, 0:w].astype(np.float32)
    return y / max(h - 1, 1), x / max(w - 1, 1)


def rgb_noise(rng: np.random.Generator, h: int = SIDE, w: int = SIDE) -> np.ndarray:
    """Uniform random RGB noise, h x w x 3 uint8."""
    return rng.integers(0, 256, (h, w, 3), dtype=np.uint8)


def grey_noise(rng: np.random.Generator, h: int = SIDE, w: int = SIDE) -> np.ndarray:
    """Uniform random grey noise, h x w uint8."""
    return rng.integers(0, 256, (h, w), dtype=np.uint8)


def photo(rng: np.random.Generator, h: int = SIDE, w: int = SIDE) -> np.ndarray:
    """A synthetic colour photograph, h x w x 3 uint8: a blue sky gradient over a green-brown ground, a sun, and
    a dozen saturated random ellipses and rectangles (houses, cars, people's clothes), with mild sensor noise."""
    y, x = _grid(h, w)
    horizon = 0.45 + 0.1 * rng.uniform(-1, 1) + 0.05 * np.sin(6.0 * x + rng.uniform(0, 6))
    sky = np.stack([90 + 80 * y, 150 + 60 * y, 235 - 20 * y], -1)
    ground = np.stack([70 + 60 * (1 - y), 120 + 40 * rng.uniform(0.5, 1) * (1 - y), 40 + 20 * y], -1)
    img = np.where((y < horizon)[..., None], sky, ground)
    sun = ((x - rng.uniform(0.1, 0.9)) ** 2 + (y - rng.uniform(0.05, 0.25)) ** 2) < 0.006
    img[sun] = (255, 230, 120)
    for _ in range(12):
        colour = rng.uniform(0, 255, 3) * np.array([1.0, 0.6, 0.6])[rng.permutation(3)]
        cx, cy, rx, ry = rng.uniform(0, 1), rng.uniform(0.3, 1), rng.uniform(0.04, 0.15), rng.uniform(0.04, 0.15)
        inside = (((x - cx) / rx) ** 2 + ((y - cy) / ry) ** 2 < 1) if rng.uniform() < 0.5 else (
            (np.abs(x - cx) < rx) & (np.abs(y - cy) < ry))
        img[inside] = colour
    img = img + rng.normal(0, 4, img.shape)
    return np.clip(np.round(img), 0, 255).astype(np.uint8)


def text(rng: np.random.Generator, h: int = SIDE, w: int = SIDE) -> np.ndarray:
    """Black text on white paper (Pillow's default font, random letters in lines), h x w uint8."""
    from PIL import Image, ImageDraw

    page = Image.new("L", (w, h), 250)
    draw = ImageDraw.Draw(page)
    letters = np.array(list("abcdefghijklmnopqrstuvwxyz      ABCDEFGHIJ0123456789.,"))
    for top in range(6, h - 12, 14):
        line = "".join(rng.choice(letters, size=max(4, w // 6)))
        draw.text((6, top), line, fill=int(rng.integers(0, 40)))
    return np.asarray(page, np.uint8).copy()


def gradient(rng: np.random.Generator, h: int = SIDE, w: int = SIDE) -> np.ndarray:
    """A smooth grey ramp in a random direction, h x w uint8."""
    y, x = _grid(h, w)
    angle = rng.uniform(0, 2 * np.pi)
    v = np.cos(angle) * x + np.sin(angle) * y
    v = (v - v.min()) / max(float(v.max() - v.min()), 1e-6)
    return np.round(20 + 215 * v).astype(np.uint8)


def checkerboard(rng: np.random.Generator, h: int = SIDE, w: int = SIDE) -> np.ndarray:
    """8 x 8 squares of two random grey levels, h x w uint8."""
    dark, bright = int(rng.integers(0, 80)), int(rng.integers(170, 256))
    y, x = np.mgrid[0:h, 0:w]
    return np.where(((y * 8 // h) + (x * 8 // w)) % 2 == 0, dark, bright).astype(np.uint8)


def ct_like(rng: np.random.Generator, h: int = SIDE, w: int = SIDE) -> np.ndarray:
    """A CT slice's statistics, h x w uint8: black background, a bright round body with a brighter rim (bone) and
    soft-tissue texture."""
    y, x = _grid(h, w)
    r = np.hypot((x - 0.5) / rng.uniform(0.38, 0.45), (y - 0.5) / rng.uniform(0.3, 0.4))
    img = np.where(r < 1, 150.0, 5.0) + np.where((r > 0.9) & (r < 1), 80.0, 0.0)
    img += np.where(r < 1, rng.normal(0, 6, (h, w)), 0.0)
    return np.clip(np.round(img), 0, 255).astype(np.uint8)


def mri_like(rng: np.random.Generator, h: int = SIDE, w: int = SIDE) -> np.ndarray:
    """A brain MRI slice's statistics, h x w uint8: dark background, a grey oval head with a bright rim (scalp),
    fine folded texture (gyri, a few pixels across) and two small dark ventricles near the centre."""
    y, x = _grid(h, w)
    r = np.hypot((x - 0.5) / 0.36, (y - 0.5) / 0.44)
    gyri = _smooth(rng, h, w, max(h, w) // 4)
    img = np.where(r < 1, 120 + 22 * gyri, 8.0) + np.where((r > 0.93) & (r < 1), 90.0, 0.0)
    for side in (-1, 1):
        img[(((x - 0.5 - side * 0.045) / 0.025) ** 2 + ((y - 0.48) / 0.09) ** 2) < 1] = 45.0
    return np.clip(np.round(img + rng.normal(0, 3, (h, w))), 0, 255).astype(np.uint8)


def blobs_on_black(rng: np.random.Generator, h: int = SIDE, w: int = SIDE) -> np.ndarray:
    """A grey oval on black with large smooth dark and bright blotches (a coarse 12 x 12 random field), h x w
    uint8: NOT required to be refused (`EXPECTED` None). Its dark blotches look like small lungs to the lung
    model, which is then about as sure as on the hardest real X-rays (a small child's X-ray inside a black
    frame); bench/ood_gate.py reports how many the gate refuses."""
    y, x = _grid(h, w)
    r = np.hypot((x - 0.5) / 0.36, (y - 0.5) / 0.44)
    img = np.where(r < 1, 110 + 35 * _smooth(rng, h, w, 12), 8.0) + np.where((r > 0.93) & (r < 1), 90.0, 0.0)
    return np.clip(np.round(img + rng.normal(0, 3, (h, w))), 0, 255).astype(np.uint8)


def grey_photo(rng: np.random.Generator, h: int = SIDE, w: int = SIDE) -> np.ndarray:
    """`photo` as a black-and-white photograph (Pillow's luma), h x w uint8: NOT required to be refused
    (`EXPECTED` None). Without colour, only the lung checks could refuse it, and the lung model is about as sure
    of the dark shapes of most such scenes as of real lungs; bench/ood_gate.py reports how many pass."""
    from PIL import Image

    return np.asarray(Image.fromarray(photo(rng, h, w)).convert("L"), np.uint8).copy()


def _smooth(rng: np.random.Generator, h: int, w: int, cells: int) -> np.ndarray:
    """Unit-ish smooth random field: a cells x cells normal grid resized bicubically to h x w (float32)."""
    from PIL import Image

    grid = Image.fromarray(rng.normal(0, 1, (cells, cells)).astype(np.float32))
    return np.asarray(grid.resize((w, h), Image.Resampling.BICUBIC), np.float32)


MAKERS: dict[str, Callable[[np.random.Generator], np.ndarray]] = {
    "rgb_noise": rgb_noise, "photo": photo, "photo_small": lambda rng: photo(rng, 300, 400),
    "grey_noise": grey_noise, "text": text, "gradient": gradient, "checkerboard": checkerboard,
    "ct_like": ct_like, "mri_like": mri_like, "blobs_on_black": blobs_on_black, "grey_photo": grey_photo,
}
KINDS = tuple(MAKERS)
REQUIRED = tuple(k for k in KINDS if EXPECTED[k] is not None)
"""The kinds the gate must refuse (all but `blobs_on_black` and `grey_photo`, reported only)."""


def make(kind: str, seed: int = 0) -> np.ndarray:
    """One image of `kind` (`KINDS`) from `seed`: uint8, H x W (grey) or H x W x 3 (colour)."""
    if kind not in MAKERS:
        raise ValueError(f"unknown non-X-ray kind {kind!r}; expected one of {', '.join(KINDS)}")
    return MAKERS[kind](np.random.default_rng(np.random.SeedSequence([seed, KINDS.index(kind)])))


def make_all(seed: int = 0) -> dict[str, np.ndarray]:
    """{kind: `make(kind, seed)`} for every kind."""
    return {kind: make(kind, seed) for kind in KINDS}


def encode_png(image: np.ndarray) -> bytes:
    """PNG bytes of a grey (H x W) or RGB (H x W x 3) uint8 image."""
    import io

    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(image).save(buf, format="PNG")
    return buf.getvalue()
