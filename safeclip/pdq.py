"""PDQ, Meta's 256-bit perceptual image hash, in numpy: the hashes of known-content lists (ThreatExchange, HMA).

A port of the reference (ThreatExchange ``pdq/cpp/hashing/pdqhashing.cpp``): luminance, a Jarosz filter (two
passes of a box filter along each axis, windows of about a 128th of the side), decimation to 64x64, the 16x16
lowest non-constant DCT coefficients, one bit per coefficient above their median. Hashes of quality
>= 80 land within a few bits of the reference's (``benchmarks/banks_pdq.py`` measures it on the corpus).

Two images match when their hashes are within :data:`MATCH_DISTANCE` bits; a hash whose quality is below
:data:`MIN_QUALITY` describes a flat or featureless image and should be discarded, neither stored nor queried.

``hex`` is the reference's text layout (``Hash256::format``, ThreatExchange and HMA CSV files): 64 lowercase hex
digits, the 256-bit number whose bit ``16*i + j`` is set when DCT coefficient ``(i, j)`` is above the median,
most significant digit first. ``bits`` holds the same number as 32 big-endian bytes.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from PIL import Image

from safeclip.errors import ConfigError, DataError

__all__ = [
    "MATCH_DISTANCE",
    "MIN_QUALITY",
    "DIHEDRAL_NAMES",
    "PdqHash",
    "pdq_hash",
    "pdq_hash_dihedral",
    "DECODE_SIDE",
    "frame_hashes",
    "hamming",
    "hashes_to_array",
    "hamming_to_many",
    "hamming_matrix",
]

MATCH_DISTANCE = 31
"""Two PDQ hashes at a Hamming distance <= 31 are a match (the reference's recommended threshold)."""

DECODE_SIDE = 512
"""The shorter side a frame is hashed at (:func:`frame_hashes`): decoded at least this large (JPEG draft mode and
box reductions stop there) and reduced by an integer factor to no less. Hashes taken so land at median distance 0
(p95 6, max 10 on the corpus photos) from the full-resolution frame's, at a fraction of its decode cost."""

MIN_QUALITY = 50
"""Hashes of quality <= 49 are discarded (the reference's advice): the image is too flat for its bits to mean much."""

DIHEDRAL_NAMES = ("original", "rot90", "rot180", "rot270", "flip_x", "flip_y", "transpose", "transverse")
"""The order of :func:`pdq_hash_dihedral`'s variants (the reference's). Each is the hash of the image turned so:
``rot90``/``rot270``: rotated 90/270 degrees counter-clockwise (PIL ``Image.Transpose.ROTATE_90``/``ROTATE_270``);
``flip_x``: upside down (``FLIP_TOP_BOTTOM``); ``flip_y``: mirrored left-right (``FLIP_LEFT_RIGHT``);
``transpose``: across the main diagonal (``TRANSPOSE``); ``transverse``: across the other one (``TRANSVERSE``)."""

_HEX = re.compile(r"[0-9a-fA-F]{64}")
_LUMA = (0.299, 0.587, 0.114)
_MIN_SIDE = 5  # the reference hashes smaller images as all zeros, quality 0
_OUT = 64


@dataclass(frozen=True)
class PdqHash:
    """A PDQ hash: ``bits`` (32 bytes, the 256-bit number big-endian) and ``quality`` (0-100)."""

    bits: bytes
    quality: int

    def __post_init__(self) -> None:
        if not isinstance(self.bits, bytes) or len(self.bits) != 32:
            raise DataError(f"a PDQ hash is 32 bytes, got {_describe(self.bits)}: build it with PdqHash.from_hex "
                            "or pdq_hash")
        if isinstance(self.quality, bool) or not isinstance(self.quality, (int, np.integer)) \
                or not 0 <= self.quality <= 100:
            raise DataError(f"a PDQ hash's quality is an integer from 0 to 100, got {self.quality!r}")
        object.__setattr__(self, "quality", int(self.quality))

    @property
    def hex(self) -> str:
        """64 lowercase hex digits, as the reference, ThreatExchange and HMA write the hash."""
        return self.bits.hex()

    @classmethod
    def from_hex(cls, text: str, quality: int = 100) -> PdqHash:
        """The hash written as 64 hex digits (either case; surrounding whitespace ignored). Hex lists carry no
        quality: ``quality`` is the one to record (a list's quality column when it has one)."""
        if not isinstance(text, str):
            raise DataError(f"a PDQ hash in hex is a str of 64 hex digits, got {type(text).__name__}")
        s = text.strip()
        if not _HEX.fullmatch(s):
            shown = s if len(s) <= 80 else s[:77] + "..."
            raise DataError(f"malformed PDQ hash {shown!r}: expected exactly 64 hex digits (0-9, a-f), "
                            f"got {len(s)} characters")
        return cls(bytes.fromhex(s), quality)

    def __str__(self) -> str:
        return self.hex


def _describe(x: object) -> str:
    try:
        return f"{type(x).__name__} of length {len(x)}"  # type: ignore[arg-type]
    except TypeError:
        return type(x).__name__


def pdq_hash(image: Image.Image | np.ndarray) -> PdqHash:
    """The PDQ hash of a PIL image (any mode; converted to RGB) or an ``(H, W, 3)`` uint8 RGB array. Images under
    5 pixels on a side hash, as in the reference, to all zeros with quality 0."""
    coeffs, quality = _dct16(_pixels(image))
    return PdqHash(_bits(coeffs), quality)


def pdq_hash_dihedral(image: Image.Image | np.ndarray) -> tuple[PdqHash, ...]:
    """The hashes of the image's 8 rotations and flips, in :data:`DIHEDRAL_NAMES` order, from one DCT (sign flips
    and transposes of its coefficients, as the reference does): match a query against all 8 to find turned copies."""
    a, quality = _dct16(_pixels(image))
    odd = (np.arange(16) & 1).astype(bool)
    s = np.where(odd, 1.0, -1.0)  # spatial reversal negates the even-indexed (odd-frequency) coefficients
    checker = np.where(np.add.outer(np.arange(16), np.arange(16)) & 1, -1.0, 1.0)
    variants = (a, (a * s[None, :]).T, a * checker, (a * s[:, None]).T, a * s[:, None], a * s[None, :], a.T,
                (a * checker).T)
    return tuple(PdqHash(_bits(v), quality) for v in variants)


# ---------------------------------------------------------------- hashing


def frame_hashes(frames: Sequence[Image.Image], *, dihedral: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """The PDQ hashes of decoded frames (decode them with ``target_size=DECODE_SIDE`` or larger): ``(codes (F, 32)
    uint8, quality (F,) int16)``, each frame first reduced by the integer factor that keeps its shorter side at least
    :data:`DECODE_SIDE`. ``dihedral``: each frame's 8 turns in :data:`DIHEDRAL_NAMES` order, ``(8F, 32)``. What
    audits, checks and ``safeclip bank add`` all hash, so the same file hashes the same everywhere."""
    hashes: list[PdqHash] = []
    for f in frames:
        factor = min(f.size) // DECODE_SIDE
        small = f.reduce(factor) if factor > 1 else f
        hashes += pdq_hash_dihedral(small) if dihedral else (pdq_hash(small),)
    codes = np.frombuffer(b"".join(h.bits for h in hashes), np.uint8).reshape(len(hashes), 32)
    return codes, np.array([h.quality for h in hashes], np.int16)


def _pixels(image: Image.Image | np.ndarray) -> np.ndarray:
    """The image's uint8 pixels: (H, W, 3) RGB, or (H, W) for a grey PIL image, whose values are its luminance as in
    the reference. RGB becomes luminance (the reference's 0.299 R + 0.587 G + 0.114 B) after the downsample: both
    are linear, so they commute, and only 64x64 pixels are converted."""
    if isinstance(image, Image.Image):
        if image.mode not in ("RGB", "L"):
            image = image.convert("RGB")
        return np.asarray(image)
    if isinstance(image, np.ndarray):
        if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
            raise ConfigError(f"pdq_hash takes an (H, W, 3) uint8 RGB array, got shape {image.shape} dtype "
                              f"{image.dtype}: pass a PIL image, or convert with np.asarray(img.convert('RGB'))")
        return image
    raise ConfigError(f"pdq_hash takes a PIL image or an (H, W, 3) uint8 array, got {type(image).__name__}")


def _dct16(pixels: np.ndarray) -> tuple[np.ndarray, int]:
    """The 16x16 DCT coefficients (float64) and the quality of the image's 64x64 luminance downsample."""
    h, w = pixels.shape[:2]
    if h < _MIN_SIDE or w < _MIN_SIDE:
        return np.zeros((16, 16)), 0
    if h == _OUT and w == _OUT:  # the reference takes a 64x64 image as already downsampled
        small = pixels.astype(np.float32)
    else:
        # The Jarosz filter then decimation is linear and acts on each axis apart: along each axis, each of the
        # 64 samples is a weighted sum of a short run of inputs, and only those runs are ever read.
        small = _reduce(_reduce(pixels, _band(h)).swapaxes(0, 1), _band(w)).swapaxes(0, 1)
    if small.ndim == 3:
        small = small @ np.array(_LUMA, dtype=np.float32)
    quality = _quality(small.astype(np.float32))
    d = _dct_matrix()
    return d @ small.astype(np.float64) @ d.T, quality


def _reduce(x: np.ndarray, band: tuple[np.ndarray, np.ndarray]) -> np.ndarray:
    """Along axis 0: output i = sum over l of ``weights[i, l] * x[start[i] + l]`` (float32), one small matrix
    product per output over its contiguous run of input rows."""
    start, weights = band
    run = weights.shape[1]
    flat = np.ascontiguousarray(x).reshape(x.shape[0], -1)
    out = np.empty((_OUT, flat.shape[1]), dtype=np.float32)
    for i in range(_OUT):
        out[i] = weights[i] @ flat[start[i]:start[i] + run]
    return out.reshape(_OUT, *x.shape[1:])


def _jarosz_window(side: int) -> int:
    return (side + 2 * _OUT - 1) // (2 * _OUT)


def _box_extents(side: int, window: int) -> tuple[np.ndarray, np.ndarray]:
    """Where each output of the reference's box1DFloat reads: output k is the mean of inputs ``lo[k]:hi[k]``,
    ``k - (window - half) .. k + half - 1`` clipped to the vector (``half = (window + 2) // 2``)."""
    half = (window + 2) // 2
    k = np.arange(side)
    return np.maximum(k - (window - half), 0), np.minimum(k + half, side)


@functools.lru_cache(maxsize=256)
def _band(side: int) -> tuple[np.ndarray, np.ndarray]:
    """Two box passes then the reference's decimateFloat sampling (centres, not corners) along a side, as the run
    each of the 64 samples reads: ``start`` (64,) and ``weights`` (64, run length) float32."""
    lo, hi = _box_extents(side, _jarosz_window(side))
    rows = ((np.arange(_OUT) + 0.5) * side / _OUT).astype(np.int64)
    # Sample i of the second pass averages first-pass outputs r in [lo[s], hi[s]); each of those averages inputs
    # [lo[r], hi[r]). Spread each r's weight as +w at lo[r] and -w at hi[r], then a cumulative sum.
    o = np.concatenate([np.full(hi[s] - lo[s], i) for i, s in enumerate(rows)])
    r = np.concatenate([np.arange(lo[s], hi[s]) for s in rows])
    weight = 1.0 / ((hi[rows] - lo[rows])[o] * (hi[r] - lo[r]))
    steps = np.zeros((_OUT, side + 1))
    np.add.at(steps, (o, lo[r]), weight)
    np.add.at(steps, (o, hi[r]), -weight)
    dense = np.cumsum(steps, axis=1)[:, :side]
    first, last = lo[lo[rows]], hi[hi[rows] - 1]  # each sample's run: [first, last)
    run = int((last - first).max())
    start = np.minimum(first, side - run)  # keep every run inside the side; the weights beyond it are zeros
    weights = dense[np.arange(_OUT)[:, None], start[:, None] + np.arange(run)].astype(np.float32)
    start.setflags(write=False)
    weights.setflags(write=False)
    return start, weights


@functools.lru_cache(maxsize=1)
def _dct_matrix() -> np.ndarray:
    """The reference's (16, 64) DCT matrix: frequencies 1..16 (the constant one is left out)."""
    i = np.arange(1, 17)[:, None]
    j = np.arange(64)[None, :]
    m = np.sqrt(2.0 / 64) * np.cos(np.pi / 2.0 / 64 * i * (2 * j + 1))
    m.setflags(write=False)
    return m


def _quality(small: np.ndarray) -> int:
    """The reference's pdqImageDomainQualityMetric: summed truncated gradients (in percent of 255) / 90, at most
    100."""
    hundred, full = np.float32(100), np.float32(255)
    dv = np.trunc((small[:-1, :] - small[1:, :]) * hundred / full)
    dh = np.trunc((small[:, :-1] - small[:, 1:]) * hundred / full)
    total = int(np.abs(dv).sum(dtype=np.int64) + np.abs(dh).sum(dtype=np.int64))
    return min(total // 90, 100)


def _bits(coeffs: np.ndarray) -> bytes:
    """Bit ``16*i + j`` set when coefficient (i, j) is above the median (the reference's Torben median of 256
    values: the 128th smallest); as 32 big-endian bytes, the most significant bit (255) first."""
    flat = coeffs.astype(np.float32).ravel()
    median = np.partition(flat, 127)[127]
    return np.packbits((flat > median)[::-1]).tobytes()


# ---------------------------------------------------------------- distances


def _as_codes(x: Any, what: str) -> np.ndarray:
    if isinstance(x, PdqHash):
        return np.frombuffer(x.bits, dtype=np.uint8)
    if isinstance(x, (bytes, bytearray, memoryview)):
        arr = np.frombuffer(bytes(x), dtype=np.uint8)
    else:
        arr = np.asarray(x)
        if arr.dtype != np.uint8:
            raise ConfigError(f"{what}: PDQ hashes are uint8 arrays of 32 bytes per hash, got dtype {arr.dtype}: "
                              "use hashes_to_array")
    if arr.shape[-1:] != (32,):
        raise ConfigError(f"{what}: PDQ hashes are 32 bytes each, got shape {arr.shape}")
    return arr


def hamming(a: PdqHash | bytes | np.ndarray, b: PdqHash | bytes | np.ndarray) -> int:
    """The number of bits in which two hashes differ (``PdqHash``, 32 bytes, or a (32,) uint8 array each)."""
    x, y = _as_codes(a, "hamming's first hash"), _as_codes(b, "hamming's second hash")
    if x.shape != (32,) or y.shape != (32,):
        raise ConfigError(f"hamming compares two hashes, got shapes {x.shape} and {y.shape}: use hamming_to_many "
                          "or hamming_matrix for arrays of hashes")
    return int(np.bitwise_count(x ^ y).sum())


def hashes_to_array(hashes: Sequence[PdqHash]) -> np.ndarray:
    """The hashes' bits as an ``(N, 32)`` uint8 array (one row per hash)."""
    out = np.empty((len(hashes), 32), dtype=np.uint8)
    for i, h in enumerate(hashes):
        out[i] = np.frombuffer(h.bits, dtype=np.uint8)
    return out


def _words(codes: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(codes).view(np.uint64)


def hamming_to_many(query: PdqHash | bytes | np.ndarray, codes: np.ndarray) -> np.ndarray:
    """The distances, ``(N,)`` int32, from one hash to each row of an ``(N, 32)`` uint8 array."""
    q = _as_codes(query, "hamming_to_many's query")
    c = _as_codes(codes, "hamming_to_many's codes")
    if q.shape != (32,) or c.ndim != 2:
        raise ConfigError(f"hamming_to_many takes one hash and an (N, 32) array, got shapes {q.shape} and {c.shape}")
    return np.bitwise_count(_words(c) ^ _words(q)).sum(axis=1, dtype=np.int32)


def hamming_matrix(a: np.ndarray, b: np.ndarray, *, block: int = 4096) -> np.ndarray:
    """The ``(N, M)`` int32 distances between the rows of two ``(N, 32)`` and ``(M, 32)`` uint8 arrays, ``block``
    rows of ``a`` at a time."""
    x, y = _as_codes(a, "hamming_matrix's first array"), _as_codes(b, "hamming_matrix's second array")
    if x.ndim != 2 or y.ndim != 2:
        raise ConfigError(f"hamming_matrix takes two (N, 32) arrays, got shapes {x.shape} and {y.shape}")
    xw, yw = _words(x), _words(y)
    out = np.empty((len(xw), len(yw)), dtype=np.int32)
    for start in range(0, len(xw), block):
        part = xw[start:start + block, None, :] ^ yw[None, :, :]
        out[start:start + block] = np.bitwise_count(part).sum(axis=2, dtype=np.int32)
    return out
