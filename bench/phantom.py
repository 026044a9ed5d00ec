"""A CT phantom corpus closer to real CT than ``corpus.py``'s ``ct``, for compression figures.

``corpus.py``'s ``ct`` slice is a disc of 1040 with uniform noise of +-40 on an air floor of 24
(clipped at 0) filling the whole 512x512 matrix: nearly every pixel carries ~6.3 bits of
white noise, which no lossless coder can remove. A real CT slice differs in ways that matter
to a lossless coder: outside the circular reconstruction field of view every pixel is one
padding value; inside it there are large regions of different density (air, lung, fat, soft
tissue, bone, the table) with noise of a few HU to tens of HU; and the noise is spatially
correlated by the reconstruction kernel.

This phantom (``ctphantom``, 300 slices, 512x512, 16 bits allocated, 12 stored, unsigned,
rescale intercept -1024, explicit VR little endian, the same header as ``corpus.py``'s):

* outside a centred circle of radius 256 (the field of view): 0 (= -1024 HU, no noise);
* inside: air -1000 HU; a table strip (200 HU) below the body; an elliptical body whose axes
  change slowly along z; a 12-pixel subcutaneous fat layer (-100 HU); soft tissue 40 HU; two
  lungs (-850 HU) whose size follows z (absent in the lower third); a vertebral body and a
  ring of ribs (700 HU);
* white Gaussian noise of sigma 12 HU inside the field of view (20 HU in the lungs),
  uncorrelated: conservative, since real kernel-filtered noise is correlated and compresses
  better.

The parameters were fixed from typical values (soft-tissue noise of 10-15 HU at standard
dose) before any compression was measured, and are not tuned to a target. Deterministic
(fixed seeds); a manifest beside the folder decides regeneration as in ``corpus.py``.

Usage: ``python bench/phantom.py --out bench/corpus``
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import corpus as corpus_mod

SPEC = corpus_mod.CorpusSpec(name="ctphantom", count=300, rows=512, columns=512, series=1)
INTERCEPT = -1024
NOISE_HU = 12.0
LUNG_NOISE_HU = 20.0


def slice_pixels(index: int, count: int = SPEC.count, size: int = SPEC.rows) -> np.ndarray:
    """Slice ``index`` of ``count`` (0 = top of the chest), stored values (HU + 1024)."""
    z = index / max(1, count - 1)  # 0..1 along the scan
    rng = np.random.default_rng(1_000_003 + index)
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
    c = (size - 1) / 2
    fov = (yy - c) ** 2 + (xx - c) ** 2 <= (size / 2) ** 2
    hu = np.full((size, size), -1000.0, dtype=np.float32)
    noise_sd = np.full((size, size), NOISE_HU, dtype=np.float32)
    # table: a strip under the body
    table = (yy > c + 0.36 * size) & (yy < c + 0.39 * size) & (np.abs(xx - c) < 0.42 * size)
    hu[table] = 200.0
    # body: an ellipse whose axes grow towards the abdomen
    ax, ay = (0.36 + 0.04 * z) * size, (0.25 + 0.03 * z) * size
    r_body = ((xx - c) / ax) ** 2 + ((yy - c) / ay) ** 2
    body = r_body <= 1.0
    hu[body] = -100.0  # fat, then soft tissue inside it
    inner = ((xx - c) / (ax - 12)) ** 2 + ((yy - c) / (ay - 12)) ** 2 <= 1.0
    hu[inner] = 40.0
    # lungs: present in the upper two thirds, largest at a third of the way down
    if z < 0.66:
        scale = np.sin(np.pi * z / 0.66) * 0.8 + 0.2
        for side in (-1, 1):
            lx, ly = c + side * 0.17 * size, c - 0.02 * size
            rx, ry = 0.12 * size * scale, 0.17 * size * scale
            lung = ((xx - lx) / rx) ** 2 + ((yy - ly) / ry) ** 2 <= 1.0
            hu[lung & inner] = -850.0
            noise_sd[lung & inner] = LUNG_NOISE_HU
    # spine: a vertebral body behind the centre; ribs: blobs on a ring inside the fat layer
    spine = (xx - c) ** 2 + (yy - (c + 0.15 * size)) ** 2 <= (0.045 * size) ** 2
    hu[spine] = 700.0
    if z < 0.75:
        for k in range(12):
            a = np.pi * (0.15 + 0.7 * k / 11)
            bx = c + (ax - 24) * np.cos(a) * (1 if k % 2 else -1)
            by = c - (ay - 24) * np.sin(a) * 0.9
            rib = (xx - bx) ** 2 + (yy - by) ** 2 <= (0.012 * size) ** 2
            hu[rib] = 700.0
    hu += rng.normal(0.0, 1.0, size=(size, size)).astype(np.float32) * noise_sd
    stored = np.clip(np.rint(hu - INTERCEPT), 0, 4095)
    stored[~fov] = 0  # outside the field of view: the padding value, no noise
    out: np.ndarray = stored.astype(np.uint16)
    return out


def generate(out: Path) -> Path:
    """Write the phantom under ``out/ctphantom`` unless it is already there; return its dir."""
    corpus_dir = out / SPEC.name
    manifest = out / f"{SPEC.name}.json"
    recorded = None
    if manifest.exists():
        recorded = json.loads(manifest.read_text())
    if (
        recorded
        and recorded.get("spec") == asdict(SPEC)
        and len(corpus_mod.dicom_files(corpus_dir)) == SPEC.count
    ):
        return corpus_dir
    if corpus_dir.exists():
        shutil.rmtree(corpus_dir)
    manifest.unlink(missing_ok=True)
    started = time.monotonic()
    total = 0
    for index in range(SPEC.count):
        path = corpus_dir / "series01" / f"IM{index:05d}.dcm"
        path.parent.mkdir(parents=True, exist_ok=True)
        ds = corpus_mod._dataset(SPEC, index, slice_pixels(index))
        ds.StudyDescription = "Benchmark CT phantom study"
        ds.save_as(path, enforce_file_format=True)
        total += path.stat().st_size
    manifest.write_text(
        json.dumps({"spec": asdict(SPEC), "files": SPEC.count, "bytes": total}, indent=2) + "\n"
    )
    print(
        f"corpus {SPEC.name}: {SPEC.count} files, {total / 1e6:.1f} MB "
        f"in {time.monotonic() - started:.1f} s -> {corpus_dir}",
        file=sys.stderr,
    )
    return corpus_dir


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "corpus")
    args = parser.parse_args(argv)
    print(generate(args.out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
