"""Benchmark corpora: deterministic CT-like and small DICOM files, written once and reused.

Two corpora, each a directory of Explicit VR Little Endian files with preamble + ``DICM``:

* ``ct``: 1000 CT Image Storage instances, 512x512 16-bit MONOCHROME2, ~0.5 MB each,
  one patient, one study, 4 series (files under ``ct/<series>/``).
* ``small``: 2000 CT Image Storage instances, 64x64 16-bit, ~10 KB each,
  one patient, one study, 8 series (files under ``small/<series>/``).

Every UID is ``2.25.<n>`` derived from a fixed seed string, and the pixel data comes from a
fixed-seed numpy generator, so two runs on two machines produce byte-identical files.
A corpus whose manifest (``<name>.json`` beside its directory, never inside it, so senders
that scan the directory see only DICOM files) matches the spec and whose file count is right
is not rewritten.

``subset(corpus_dir, n)`` hard-links the first ``n`` files (sorted) into a sibling directory,
for runs against slow receivers.

Usage: ``python bench/corpus.py --out bench/corpus [--corpus ct,small]``
"""

from __future__ import annotations

import argparse
import hashlib
import json
import shutil
import sys
import time
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import PYDICOM_IMPLEMENTATION_UID, UID, CTImageStorage, ExplicitVRLittleEndian

SEED = "dicom-forwarder-bench-v1"


@dataclass(frozen=True)
class CorpusSpec:
    """What one corpus holds; its JSON form is the manifest that decides regeneration."""

    name: str
    count: int
    rows: int
    columns: int
    series: int
    version: int = 1


SPECS: dict[str, CorpusSpec] = {
    "ct": CorpusSpec(name="ct", count=1000, rows=512, columns=512, series=4),
    "small": CorpusSpec(name="small", count=2000, rows=64, columns=64, series=8),
}


def uid(*parts: object) -> str:
    """Return a deterministic ``2.25.<n>`` UID (at most 64 chars) from ``parts``."""
    digest = hashlib.sha256("/".join([SEED, *map(str, parts)]).encode()).digest()
    return "2.25." + str(int.from_bytes(digest[:16], "big"))


def _base_image(spec: CorpusSpec) -> np.ndarray:
    """A CT-ish 16-bit slice: air around a water-ish disc with noise (values 0..4095)."""
    rng = np.random.default_rng(int.from_bytes(hashlib.sha256(SEED.encode()).digest()[:8], "big"))
    yy, xx = np.mgrid[0 : spec.rows, 0 : spec.columns]
    cy, cx = (spec.rows - 1) / 2, (spec.columns - 1) / 2
    r2 = ((yy - cy) / (0.42 * spec.rows)) ** 2 + ((xx - cx) / (0.45 * spec.columns)) ** 2
    body = np.where(r2 <= 1.0, 1040, 24).astype(np.int32)
    noise = rng.integers(-40, 41, size=(spec.rows, spec.columns), dtype=np.int32)
    image: np.ndarray = np.clip(body + noise, 0, 4095).astype(np.uint16)
    return image


def _dataset(spec: CorpusSpec, index: int, pixels: np.ndarray) -> Dataset:
    """Build instance ``index`` (0-based) of ``spec`` with a realistic CT header."""
    per_series = -(-spec.count // spec.series)
    series_no = index // per_series + 1
    instance_no = index % per_series + 1
    sop_uid = uid(spec.name, "instance", index)

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = CTImageStorage
    meta.MediaStorageSOPInstanceUID = UID(sop_uid)
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    meta.ImplementationClassUID = PYDICOM_IMPLEMENTATION_UID
    meta.ImplementationVersionName = "FWD_BENCH_1"

    ds = Dataset()
    ds.file_meta = meta
    ds.SpecificCharacterSet = "ISO_IR 100"
    ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
    ds.SOPClassUID = CTImageStorage
    ds.SOPInstanceUID = sop_uid
    ds.StudyDate = ds.SeriesDate = ds.ContentDate = ds.AcquisitionDate = "20240312"
    ds.StudyTime = "101500"
    ds.SeriesTime = f"1016{series_no:02d}"
    ds.ContentTime = ds.AcquisitionTime = f"1017{instance_no % 60:02d}"
    ds.AccessionNumber = f"BENCH{spec.name.upper()}01"
    ds.Modality = "CT"
    ds.Manufacturer = "BENCH"
    ds.InstitutionName = "Forwarder Benchmark Hospital"
    ds.ReferringPhysicianName = "Referrer^Bench"
    ds.StudyDescription = f"Benchmark {spec.name} study"
    ds.SeriesDescription = f"Axial {series_no}"
    ds.ManufacturerModelName = "SyntheticCT"
    ds.PatientName = "Bench^Patient"
    ds.PatientID = f"BENCH-{spec.name.upper()}"
    ds.PatientBirthDate = "19700101"
    ds.PatientSex = "O"
    ds.BodyPartExamined = "CHEST"
    ds.SliceThickness = "1.25"
    ds.KVP = "120"
    ds.SoftwareVersions = "1"
    ds.PatientPosition = "HFS"
    ds.StudyInstanceUID = uid(spec.name, "study")
    ds.SeriesInstanceUID = uid(spec.name, "series", series_no)
    ds.StudyID = "1"
    ds.SeriesNumber = series_no
    ds.AcquisitionNumber = 1
    ds.InstanceNumber = instance_no
    z = -instance_no * 1.25
    ds.ImagePositionPatient = ["-250.0", "-250.0", f"{z:.2f}"]
    ds.ImageOrientationPatient = ["1", "0", "0", "0", "1", "0"]
    ds.FrameOfReferenceUID = uid(spec.name, "frame")
    ds.PositionReferenceIndicator = ""
    ds.SliceLocation = f"{z:.2f}"
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.Rows = spec.rows
    ds.Columns = spec.columns
    spacing = f"{500.0 / spec.columns:.6f}"
    ds.PixelSpacing = [spacing, spacing]
    ds.BitsAllocated = 16
    ds.BitsStored = 12
    ds.HighBit = 11
    ds.PixelRepresentation = 0
    ds.WindowCenter = "40"
    ds.WindowWidth = "400"
    ds.RescaleIntercept = "-1024"
    ds.RescaleSlope = "1"
    ds.RescaleType = "HU"
    ds.PixelData = pixels.tobytes()
    ds["PixelData"].VR = "OW"
    return ds


def _paths(spec: CorpusSpec, root: Path) -> Iterator[tuple[int, Path]]:
    per_series = -(-spec.count // spec.series)
    for index in range(spec.count):
        series_no = index // per_series + 1
        yield index, root / f"series{series_no:02d}" / f"IM{index:05d}.dcm"


def dicom_files(corpus_dir: Path) -> list[Path]:
    """The corpus's files, sorted, as the senders see them."""
    return sorted(p for p in corpus_dir.rglob("*") if p.is_file())


def _is_current(spec: CorpusSpec, corpus_dir: Path, manifest: Path) -> bool:
    try:
        recorded = json.loads(manifest.read_text())
    except (OSError, ValueError):
        return False
    return recorded.get("spec") == asdict(spec) and len(dicom_files(corpus_dir)) == spec.count


def generate(spec: CorpusSpec, out: Path) -> Path:
    """Write corpus ``spec`` under ``out/<name>`` unless it is already there; return its dir."""
    corpus_dir = out / spec.name
    manifest = out / f"{spec.name}.json"
    if _is_current(spec, corpus_dir, manifest):
        return corpus_dir
    if corpus_dir.exists():
        shutil.rmtree(corpus_dir)
    manifest.unlink(missing_ok=True)
    base = _base_image(spec)
    started = time.monotonic()
    total = 0
    for index, path in _paths(spec, corpus_dir):
        # per-file variation without regenerating noise: shift the slice and nudge the values
        pixels = np.roll(base, shift=(index * 7) % spec.rows, axis=0) + np.uint16(index % 16)
        path.parent.mkdir(parents=True, exist_ok=True)
        _dataset(spec, index, pixels).save_as(path, enforce_file_format=True)
        total += path.stat().st_size
    manifest.write_text(
        json.dumps({"spec": asdict(spec), "files": spec.count, "bytes": total}, indent=2) + "\n"
    )
    print(
        f"corpus {spec.name}: {spec.count} files, {total / 1e6:.1f} MB "
        f"in {time.monotonic() - started:.1f} s -> {corpus_dir}",
        file=sys.stderr,
    )
    return corpus_dir


def subset(corpus_dir: Path, count: int) -> Path:
    """Hard-link the first ``count`` files of ``corpus_dir`` into ``<corpus_dir>-first<count>``.

    Hard links keep the files' bytes and page-cache pages shared with the full corpus. The
    subset is rebuilt when its file list does not match.
    """
    files = dicom_files(corpus_dir)[:count]
    target = corpus_dir.with_name(f"{corpus_dir.name}-first{count}")
    wanted = [target / f.relative_to(corpus_dir) for f in files]
    if target.exists() and dicom_files(target) == sorted(wanted):
        return target
    if target.exists():
        shutil.rmtree(target)
    for src, dst in zip(files, wanted, strict=True):
        dst.parent.mkdir(parents=True, exist_ok=True)
        dst.hardlink_to(src)
    return target


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "corpus")
    parser.add_argument(
        "--corpus", default=",".join(SPECS), help=f"comma list of {', '.join(SPECS)}"
    )
    args = parser.parse_args(argv)
    names = [n for n in args.corpus.split(",") if n]
    unknown = [n for n in names if n not in SPECS]
    if unknown:
        parser.error(f"unknown corpus: {', '.join(unknown)}")
    for name in names:
        print(generate(SPECS[name], args.out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
