"""The step cache's archive key: a streaming SHA-256 of all the archive's bytes vs the old key of member names,
sizes and CRC-32s read from the zip's central directory (which archives with other bytes can share).

Two archives: the demo archive as ``local`` writes it (scikit-learn's digits, the default image size), and a
``--gigabytes`` archive of random bytes (stored, 4 MiB members) written under a temporary folder in /tmp and
deleted afterwards. Each key is computed ``--repeats`` times, alternating, and the best time counts (the first
read of the large archive also warms the page cache for both). The demo archive's key is what a cached rerun
computes: its extra time is the new key's time minus the old one's. A proven hit also hashes the cached outputs:
the bench times that for Preprocess's outputs of the demo archive (the largest cached output of a demo run).
The last line reads ``demo archive key ms: <sha256> vs baseline <crc key> ratio=<baseline/sha256>`` (below 1:
the byte hash is slower; the target is under 1 s added to a cached rerun).

    python bench/cache_hash_bench.py                  # about a minute on 2 CPU cores
    python bench/cache_hash_bench.py --gigabytes 0    # the demo archive only
"""

from __future__ import annotations

import argparse
import hashlib
import os
import sys
import tempfile
import time
import zipfile
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pipelines.util import fsutil

MEMBER = 4 << 20


def crc_key(path: Path) -> str:
    """The old key (baseline): names, sizes and CRC-32s from the central directory."""
    digest = hashlib.sha256(b"zip-content-v1\0")
    with zipfile.ZipFile(path) as archive:
        for info in sorted(archive.infolist(), key=lambda item: item.filename):
            digest.update(f"{info.filename}\0{info.file_size}\0{info.CRC:08x}\n".encode())
    return digest.hexdigest()


def best_seconds(function: Callable[[Path], str], path: Path, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        function(path)
        times.append(time.perf_counter() - started)
    return min(times)


def compare(path: Path, repeats: int) -> tuple[float, float]:
    """(new key seconds, old key seconds), each the best of ``repeats``, taken in turns."""
    new, old = [], []
    for _ in range(repeats):
        new.append(best_seconds(fsutil.content_hash, path, 1))
        old.append(best_seconds(crc_key, path, 1))
    return min(new), min(old)


def verify_seconds(archive: Path, folder: Path, repeats: int) -> tuple[float, int]:
    """The other cost of a proven hit: Preprocess's outputs from the demo archive (its run-folder copy and the
    store's hard links to it) listed and hashed as a lookup does; (best seconds, files)."""
    import contextlib
    import io

    from steps.preprocess import main as preprocess_main

    output = folder / "preprocessed"
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        preprocess_main(["--input", str(archive), "--output-dir", str(output), "--workers", "1"])
    store = fsutil.link_tree(output, folder / "store" / "preprocessed")
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        seen: dict[tuple[int, ...], str] = {}
        files = len(fsutil.file_manifest(output, seen)) + len(fsutil.file_manifest(store, seen))
        times.append(time.perf_counter() - started)
    return min(times), files


def write_random_archive(path: Path, size: int) -> Path:
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_STORED) as archive:
        for index in range(max(1, size // MEMBER)):
            archive.writestr(f"images/{index:05d}.jpg", os.urandom(MEMBER))
    return path


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--gigabytes", type=float, default=1.0, help="size of the random archive (0: none)")
    args = parser.parse_args()
    from pipelines import demo_data

    with tempfile.TemporaryDirectory(prefix="cache-hash-bench-", dir="/tmp") as folder:
        demo = demo_data.write_digits_archive(Path(folder) / "digits.zip")
        demo_new, demo_old = compare(demo, args.repeats)
        megabytes = demo.stat().st_size / 1e6
        print(f"demo archive ({megabytes:.1f} MB): sha256 {demo_new * 1e3:.1f} ms, crc key {demo_old * 1e3:.1f} ms")
        verify, files = verify_seconds(demo, Path(folder), args.repeats)
        print(f"proving a cached Preprocess of the demo archive ({files} output files): {verify * 1e3:.0f} ms")
        if args.gigabytes > 0:
            large = write_random_archive(Path(folder) / "large.zip", int(args.gigabytes * (1 << 30)))
            large_new, large_old = compare(large, max(2, args.repeats // 2))
            size = large.stat().st_size / (1 << 30)
            print(
                f"random archive ({size:.2f} GiB): sha256 {large_new:.2f} s ({size / large_new:.2f} GiB/s), "
                f"crc key {large_old * 1e3:.1f} ms"
            )
            large.unlink()
    print(f"added to a cached rerun by the demo archive's byte hash: {(demo_new - demo_old) * 1e3:.1f} ms")
    print(f"demo archive key ms: {demo_new * 1e3:.1f} vs baseline {demo_old * 1e3:.1f} ratio={demo_old / demo_new:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
