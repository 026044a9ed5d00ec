"""Times `forwarder.transform.transform_file` in one process: ms per file for each transform.

The files are instance 0 of the ``ct`` corpus (512x512, 16-bit, 12 bits stored, explicit VR
little endian, ~0.5 MB; ``corpus.py``) and of the ``small`` corpus (64x64, ~10 KB), so the
numbers match what the daemon benchmark sends.
Each transform runs `--count` times (after one warm-up) from the page-cached file into a
tmpfs; the figure is the median, with the minimum and the output size beside it. A second
source, pydicom's CT_small.dcm (a 128x128 GE CT with ~250 header elements, many private),
shows de-identification on a vendor-heavy header.

Usage: ``python bench/bench_engine.py [--count 30] [--out-dir /dev/shm]``
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import corpus
from pydicom.data import get_testdata_file

from forwarder.transform import load_secret, transform_file
from forwarder.transformspec import TransformSpec

CASES: dict[str, TransformSpec] = {
    "read+write only (explicit-le -> explicit-le)": TransformSpec(transfer_syntax="explicit-le"),
    "set/remove": TransformSpec(
        set=(("PatientID", "SITE1-{PatientID}"), ("InstitutionName", "Gateway A")),
        remove=("OtherPatientIDs", "0009,1001"),
    ),
    "deidentify basic": TransformSpec(deidentify="basic"),
    "implicit-le": TransformSpec(transfer_syntax="implicit-le"),
    "rle": TransformSpec(transfer_syntax="rle"),
    "jpeg-ls-lossless": TransformSpec(transfer_syntax="jpeg-ls-lossless"),
    "jpeg2000-lossless": TransformSpec(transfer_syntax="jpeg2000-lossless"),
    "deidentify + jpeg-ls-lossless": TransformSpec(
        deidentify="basic", transfer_syntax="jpeg-ls-lossless"
    ),
}


def _corpus_file(out: Path, name: str) -> Path:
    spec = corpus.SPECS[name]
    ds = corpus._dataset(spec, 0, corpus._base_image(spec))
    path = out / f"{name}-0.dcm"
    ds.save_as(path, enforce_file_format=True)
    return path


def _time(src: Path, dst: Path, spec: TransformSpec, secret: bytes, count: int) -> list[float]:
    transform_file(src, dst, spec, secret)  # warm-up: imports, codec plugins, dicognito
    times = []
    for _ in range(count):
        start = time.perf_counter()
        transform_file(src, dst, spec, secret)
        times.append((time.perf_counter() - start) * 1000)
    return times


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--count", type=int, default=30)
    parser.add_argument("--out-dir", type=Path, default=Path("/dev/shm"))
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(dir=args.out_dir) as tmp:
        work = Path(tmp)
        secret = load_secret(work)
        sources = {
            "CT 512x512 16-bit (ct corpus)": _corpus_file(work, "ct"),
            "CT 64x64 16-bit (small corpus)": _corpus_file(work, "small"),
            "CT_small 128x128 (GE header)": Path(str(get_testdata_file("CT_small.dcm"))),
        }
        print(f"transform_file, one process, median of {args.count} (min), output size")
        for label, src in sources.items():
            print(f"\n{label}: {src.stat().st_size / 1024:.0f} KiB")
            for name, spec in CASES.items():
                header_only = "deidentify" in name or name == "set/remove"
                if label.startswith("CT_small") and not header_only:
                    continue
                dst = work / "out.dcm"
                times = _time(src, dst, spec, secret, args.count)
                print(
                    f"  {name:<46} {statistics.median(times):7.1f} ms"
                    f"  ({min(times):6.1f})  {dst.stat().st_size / 1024:6.0f} KiB"
                )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
