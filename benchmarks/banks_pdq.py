"""safeclip.pdq against Meta's reference PDQ (the ``pdqhash`` package, a Cython binding of ThreatExchange's C++):
parity, robustness to common edits, and speed.

    pip install pdqhash        # the reference; a benchmark/test tool only, not a safeclip dependency
    python benchmarks/banks_pdq.py [--corpus ../shared/corpus] [--robust-n 50] [--speed-n 30]

1. ``parity``: every photo (and every tricky file that decodes): our hash vs the reference's, the distribution of
   the distances, how many hashes of quality >= 80 are more than 10 bits off (a correct port has none), quality
   differences, and the 8 dihedral variants against the reference's ``compute_dihedral``. Names each image that
   differs at all.
2. ``robustness``: the first ``n`` photos (sorted), each edited (JPEG quality 30, resized to 50%, 5% cropped off each
   side, brightness +15%, a large caption drawn across it, mirrored, rotated 90 degrees): the share still within
   the match distance (31) of the original's hash, plain and as the minimum over the original's 8 dihedral
   variants; and over all pairs of distinct photos, the false matches and the smallest distance.
3. ``speed``: seconds per hash on full-size photos, ours (from a PIL image and from an RGB array) and the
   reference's (from the array), and the ratio.

Photos are decoded with PIL and ``ImageOps.exif_transpose``, then converted to RGB. Functions return dicts;
``benchmarks/banks.py`` calls :func:`parity` and :func:`robustness`.
"""

from __future__ import annotations

import argparse
import io
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageEnhance, ImageFont, ImageOps

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from _common import CORPUS, IMAGE_SUFFIXES, pct  # noqa: E402

from safeclip.pdq import MATCH_DISTANCE, MIN_QUALITY, hamming, hamming_matrix, hashes_to_array, pdq_hash, \
    pdq_hash_dihedral  # noqa: E402


def _reference():
    try:
        import pdqhash
    except ImportError as e:
        raise SystemExit("this benchmark compares with the reference: pip install pdqhash") from e
    return pdqhash


def _ref_bits(vector: np.ndarray) -> bytes:
    # pdqhash's vector is bit 255 first; packed MSB-first it is the reference's hex layout (ThreatExchange's
    # "%064x" % int("".join(map(str, vector)), 2)).
    return np.packbits(np.asarray(vector, dtype=np.uint8)).tobytes()


def _images(folder: Path, suffixes: set[str] | None = None) -> list[Path]:
    if not folder.is_dir():
        return []
    return sorted(p for p in folder.iterdir() if p.is_file() and (suffixes is None or p.suffix.lower() in suffixes))


def _load(path: Path) -> Image.Image:
    with Image.open(path) as im:
        return ImageOps.exif_transpose(im).convert("RGB")


def _stats(xs: list[int]) -> dict:
    if not xs:
        return {"n": 0}
    return {"n": len(xs), "min": min(xs), "median": statistics.median(xs), "p99": pct(xs, 0.99), "max": max(xs)}


def parity(photos_dir: Path | str, n: int | None = None, tricky_dir: Path | str | None = None) -> dict:
    """Our hashes vs the reference's on the photos (the first ``n``; all by default) and the tricky files."""
    pdqhash = _reference()
    paths = _images(Path(photos_dir), IMAGE_SUFFIXES)[:n]
    if tricky_dir is not None:
        paths += _images(Path(tricky_dir))
    rows, undecodable = [], []
    for path in paths:
        try:
            rgb = _load(path)
        except Exception as e:  # tricky/ holds READMEs and formats this Pillow may lack (AVIF)
            undecodable.append(f"{path.name} ({type(e).__name__})")
            continue
        arr = np.asarray(rgb)
        vector, ref_quality = pdqhash.compute(arr)
        ours = pdq_hash(rgb)
        ref_variants, _ = pdqhash.compute_dihedral(arr)
        dihedral = max(hamming(got.bits, _ref_bits(ref)) for got, ref in zip(pdq_hash_dihedral(rgb), ref_variants))
        rows.append({"image": f"{path.parent.name}/{path.name}", "size": rgb.size,
                     "distance": hamming(ours.bits, _ref_bits(vector)), "quality": ours.quality,
                     "ref_quality": int(ref_quality), "dihedral_max": dihedral})
    distances = [r["distance"] for r in rows]
    usable = [r for r in rows if r["ref_quality"] >= MIN_QUALITY]
    return {
        "images": len(rows),
        "undecodable": undecodable,
        "distance": _stats(distances),
        "exact": sum(d == 0 for d in distances),
        # Quality < 50 hashes are discarded in use: a flat image's coefficients are all rounding noise, so its
        # bits are arbitrary in both implementations.
        "usable": len(usable),
        "distance_usable": _stats([r["distance"] for r in usable]),
        "dihedral_max_usable": max((r["dihedral_max"] for r in usable), default=0),
        "q80_over_10": [r["image"] for r in rows if r["ref_quality"] >= 80 and r["distance"] > 10],
        "quality_differs": [(r["image"], r["quality"], r["ref_quality"]) for r in rows
                            if r["quality"] != r["ref_quality"]],
        "dihedral_max": max((r["dihedral_max"] for r in rows), default=0),
        "differing": [(r["image"], r["distance"], r["ref_quality"]) for r in rows if r["distance"] or r["dihedral_max"]],
        "low_quality": [(r["image"], r["ref_quality"]) for r in rows if r["ref_quality"] < MIN_QUALITY],
    }


def _caption(im: Image.Image) -> Image.Image:
    out = im.copy()
    w, h = out.size
    font = ImageFont.load_default(size=max(12, h // 7))
    draw = ImageDraw.Draw(out)
    text = "BREAKING NEWS 2024"
    left, top, right, bottom = draw.textbbox((0, 0), text, font=font, stroke_width=max(1, h // 100))
    x, y = (w - (right - left)) // 2, (h - (bottom - top)) // 2
    draw.text((x - left, y - top), text, font=font, fill=(255, 255, 255), stroke_width=max(1, h // 100),
              stroke_fill=(0, 0, 0))
    return out


def _jpeg(im: Image.Image, quality: int) -> Image.Image:
    buf = io.BytesIO()
    im.save(buf, "JPEG", quality=quality)
    buf.seek(0)
    with Image.open(buf) as out:
        return out.convert("RGB")


def _crop(im: Image.Image, frac: float) -> Image.Image:
    w, h = im.size
    return im.crop((round(w * frac), round(h * frac), w - round(w * frac), h - round(h * frac)))


EDITS: dict[str, Callable[[Image.Image], Image.Image]] = {
    "jpeg q30": lambda im: _jpeg(im, 30),
    "resize 50%": lambda im: im.resize((im.width // 2, im.height // 2), Image.Resampling.LANCZOS),
    "crop 2%/side": lambda im: _crop(im, 0.02),
    "crop 5%/side": lambda im: _crop(im, 0.05),
    "brightness +15%": lambda im: ImageEnhance.Brightness(im).enhance(1.15),
    "caption": _caption,
    "mirror": lambda im: im.transpose(Image.Transpose.FLIP_LEFT_RIGHT),
    "rotate 90": lambda im: im.transpose(Image.Transpose.ROTATE_90),
}


def robustness(photos_dir: Path | str, n: int = 50) -> dict:
    """Recall of edited copies of the first ``n`` photos, and false matches over all pairs of distinct photos."""
    paths = _images(Path(photos_dir), IMAGE_SUFFIXES)
    hashes, variants = [], []
    per_edit: dict[str, dict[str, list[int]]] = {name: {"plain": [], "dihedral": []} for name in EDITS}
    for i, path in enumerate(paths):
        rgb = _load(path)
        dih = pdq_hash_dihedral(rgb)
        hashes.append(dih[0])
        variants.append(dih)
        if i >= n or dih[0].quality < MIN_QUALITY:  # an unusable original is never in a bank
            continue
        for name, edit in EDITS.items():
            edited = pdq_hash(edit(rgb))
            per_edit[name]["plain"].append(hamming(edited, dih[0]))
            per_edit[name]["dihedral"].append(min(hamming(edited, v) for v in dih))
    edits = {}
    for name, d in per_edit.items():
        edits[name] = {"recall": float(np.mean(np.array(d["plain"]) <= MATCH_DISTANCE)),
                       "recall_dihedral": float(np.mean(np.array(d["dihedral"]) <= MATCH_DISTANCE)),
                       "median": statistics.median(d["plain"]), "median_dihedral": statistics.median(d["dihedral"]),
                       "max_dihedral": max(d["dihedral"])}
    codes = hashes_to_array(hashes)
    dist = hamming_matrix(codes, codes)
    pairs = dist[np.triu_indices(len(codes), k=1)]
    # With dihedral queries: each photo's 8 variants against every other photo's hash.
    var_codes = hashes_to_array([v for dih in variants for v in dih])
    dmin = hamming_matrix(var_codes, codes).reshape(len(codes), 8, len(codes)).min(axis=1)
    np.fill_diagonal(dmin, 256)
    quality = np.array([h.quality for h in hashes])
    ok = quality >= MIN_QUALITY
    upper = np.triu(np.ones_like(dist, dtype=bool), k=1)
    usable_pairs = upper & ok[:, None] & ok[None, :]
    i, j = np.unravel_index(int(np.argmin(np.where(usable_pairs, dist, 256))), dist.shape)
    either = (dmin <= MATCH_DISTANCE) | (dmin.T <= MATCH_DISTANCE)
    return {
        "photos": min(n, len(paths)),
        "originals_used": len(per_edit["jpeg q30"]["plain"]),
        "usable_pairs": int(usable_pairs.sum()),
        "false_matches_usable": int((dist[usable_pairs] <= MATCH_DISTANCE).sum()),
        "false_matches_dihedral_usable": int(either[usable_pairs].sum()),
        "min_pair_distance_usable": int(dist[i, j]),
        "min_pair_usable": (paths[i].name, paths[j].name),
        "min_pair_distance_dihedral_usable": int(np.where(usable_pairs | usable_pairs.T, dmin, 256).min()),
        "low_quality_matches": [(paths[a].name, paths[b].name, int(dist[a, b])) for a, b in zip(*np.nonzero(
            upper & (dist <= MATCH_DISTANCE) & ~usable_pairs))],
        "edits": edits,
        "corpus": len(codes),
        "pairs": int(len(pairs)),
        "false_matches": int((pairs <= MATCH_DISTANCE).sum()),
        "false_matches_dihedral": int(((dmin <= MATCH_DISTANCE) | (dmin.T <= MATCH_DISTANCE))[
            np.triu_indices(len(codes), k=1)].sum()),
        "min_pair_distance": int(pairs.min()) if len(pairs) else None,
        "min_pair_distance_dihedral": int(dmin.min()) if len(pairs) else None,
        "quality_below_min": sum(q < MIN_QUALITY for q in quality),
    }


def speed(photos_dir: Path | str, n: int = 30, repeat: int = 3) -> dict:
    """Seconds per hash on the first ``n`` full-size photos (best of ``repeat`` each), ours and the reference's."""
    pdqhash = _reference()
    ours_pil, ours_arr, ref = [], [], []
    sizes = []
    for path in _images(Path(photos_dir), IMAGE_SUFFIXES)[:n]:
        rgb = _load(path)
        arr = np.asarray(rgb)
        sizes.append(rgb.size)
        for out, fn in ((ours_pil, lambda: pdq_hash(rgb)), (ours_arr, lambda: pdq_hash(arr)),
                        (ref, lambda: pdqhash.compute(arr))):
            fn()
            best = float("inf")
            for _ in range(repeat):
                t = time.perf_counter()
                fn()
                best = min(best, time.perf_counter() - t)
            out.append(best)
    return {"photos": len(sizes), "megapixels_median": statistics.median(w * h / 1e6 for w, h in sizes),
            "ours_pil_ms": 1e3 * statistics.mean(ours_pil), "ours_array_ms": 1e3 * statistics.mean(ours_arr),
            "reference_ms": 1e3 * statistics.mean(ref),
            "ratio_reference_over_ours_array": statistics.mean(ref) / statistics.mean(ours_arr),
            "ratio_reference_over_ours_pil": statistics.mean(ref) / statistics.mean(ours_pil)}


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--corpus", type=Path, default=CORPUS)
    ap.add_argument("--robust-n", type=int, default=50)
    ap.add_argument("--speed-n", type=int, default=30)
    args = ap.parse_args(argv)
    photos_dir, tricky_dir = args.corpus / "photos", args.corpus / "tricky"
    import pdqhash

    print(f"reference: pdqhash {pdqhash.__version__}; numpy {np.__version__}")
    p = parity(photos_dir, tricky_dir=tricky_dir)
    d = p["distance"]
    print(f"\n== parity: {p['images']} images (photos + tricky), distance ours vs reference")
    print(f"  all: min {d['min']}  median {d['median']}  p99 {d['p99']}  max {d['max']}  exact {p['exact']}/{p['images']}")
    u = p["distance_usable"]
    print(f"  quality >= {MIN_QUALITY} ({p['usable']} images): min {u['min']}  median {u['median']}  p99 {u['p99']}  "
          f"max {u['max']}")
    print(f"  quality >= 80 and distance > 10: {len(p['q80_over_10'])} {p['q80_over_10']}")
    print(f"  quality differs: {len(p['quality_differs'])} {p['quality_differs']}")
    print(f"  dihedral variants vs reference's compute_dihedral: max distance {p['dihedral_max_usable']} at quality "
          f">= {MIN_QUALITY} ({p['dihedral_max']} over all)")
    print(f"  images that differ at all (image, distance, reference quality): {p['differing']}")
    print(f"  reference quality < {MIN_QUALITY} (discarded in use): {p['low_quality']}")
    print(f"  not decoded: {p['undecodable']}")

    r = robustness(photos_dir, n=args.robust_n)
    print(f"\n== robustness: first {r['photos']} photos ({r['originals_used']} of quality >= {MIN_QUALITY}), recall at "
          f"distance <= {MATCH_DISTANCE}")
    print(f"  {'edit':<17}{'recall':>8}{'median d':>10}{'recall (8 var.)':>17}{'median d':>10}{'max d':>7}")
    for name, e in r["edits"].items():
        print(f"  {name:<17}{e['recall']:>8.2f}{e['median']:>10}{e['recall_dihedral']:>17.2f}"
              f"{e['median_dihedral']:>10}{e['max_dihedral']:>7}")
    print(f"  false matches over the {r['usable_pairs']} pairs of distinct photos of quality >= {MIN_QUALITY} "
          f"({r['corpus'] - r['quality_below_min']} of {r['corpus']}): {r['false_matches_usable']} (with dihedral "
          f"variants: {r['false_matches_dihedral_usable']}); min distance {r['min_pair_distance_usable']} "
          f"{r['min_pair_usable']} (with variants: {r['min_pair_distance_dihedral_usable']})")
    print(f"  over all {r['pairs']} pairs, low-quality hashes kept: {r['false_matches']} matches "
          f"(with variants {r['false_matches_dihedral']}), those with a low-quality hash: {r['low_quality_matches']}")

    s = speed(photos_dir, n=args.speed_n)
    print(f"\n== speed: {s['photos']} full-size photos (median {s['megapixels_median']:.2f} MP), best of 3 each, mean")
    print(f"  ours from PIL {s['ours_pil_ms']:.2f} ms  ours from array {s['ours_array_ms']:.2f} ms  "
          f"reference {s['reference_ms']:.2f} ms  ratio reference/ours {s['ratio_reference_over_ours_array']:.1f}x "
          f"(array), {s['ratio_reference_over_ours_pil']:.1f}x (PIL)")


if __name__ == "__main__":
    main()
