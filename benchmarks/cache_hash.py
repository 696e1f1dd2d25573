"""Cost of verifying cached feature files: a sha256 of the file (ood-sweep's choice) vs Parquet page checksums.

A realistic feature file (default 50,000 samples x 512 float32 penultimate features + 10 logits, as
:class:`ood_core.feature_store.FeatureWriter` writes it) is written and read back several ways; the best of
``--repeat`` runs is printed, in seconds and in seconds per GB of file:

* write: plain / hashed while writing (``record_hash=True``: sha256 of the bytes as they stream out, plus
  the ``.sha256`` record) / with Parquet page checksums (``write_page_checksum=True``, CRC32 per data page);
* read: ``pq.read_table`` plain / with ``page_checksum_verification=True``;
* verify: :func:`ood_core.storage.verify` (reads the file and hashes it), what a rerun pays per cached file.

    python benchmarks/cache_hash.py [--rows 50000] [--dim 512] [--repeat 3]
"""
from __future__ import annotations

import argparse
import hashlib
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from ood_core import storage  # noqa: E402
from ood_core.feature_store import FeatureWriter  # noqa: E402


def best(fn, repeat):
    times = []
    for _ in range(repeat):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return min(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, default=50_000)
    ap.add_argument("--dim", type=int, default=512)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--dir", default=None, help="where to write (default: a temporary directory)")
    args = ap.parse_args()

    rng = np.random.default_rng(0)
    n, d = args.rows, args.dim
    feats = np.abs(rng.standard_normal((n, d), dtype=np.float32))  # post-ReLU-like, incompressible mantissas
    logits = rng.standard_normal((n, 10), dtype=np.float32)
    index, labels = np.arange(n, dtype=np.int64), rng.integers(0, 10, n)
    batch = 512

    with tempfile.TemporaryDirectory(dir=args.dir) as tmp:
        def write(path, record_hash):
            with FeatureWriter(path, {"dataset": "bench"}, {}, record_hash=record_hash) as w:
                for s in range(0, n, batch):
                    w.write(index[s:s + batch], labels[s:s + batch],
                            {"penultimate": feats[s:s + batch], "logits": logits[s:s + batch]})

        plain, hashed, crc = (os.path.join(tmp, f"{k}.parquet") for k in ("plain", "hashed", "crc"))
        t_plain = best(lambda: write(plain, False), args.repeat)
        t_hashed = best(lambda: write(hashed, True), args.repeat)
        table = pq.read_table(plain)
        t_table_plain = best(lambda: pq.write_table(table, plain + ".2", compression="snappy"), args.repeat)
        t_table_crc = best(lambda: pq.write_table(table, crc, compression="snappy", write_page_checksum=True),
                           args.repeat)
        gb = os.path.getsize(plain) / 1e9

        t_read = best(lambda: pq.read_table(plain), args.repeat)
        t_read_crc = best(lambda: pq.read_table(crc, page_checksum_verification=True), args.repeat)
        assert storage.verify(hashed).ok
        t_verify = best(lambda: storage.verify(hashed), args.repeat)
        data = Path(hashed).read_bytes()
        t_sha_mem = best(lambda: hashlib.sha256(data).hexdigest(), args.repeat)
        t_readbytes = best(lambda: Path(plain).read_bytes(), args.repeat)

    def row(name, secs, base=None):
        extra = f"  ({secs / base:.2f}x)" if base else ""
        print(f"{name:<52s} {secs:8.3f} s  {secs / gb:7.3f} s/GB{extra}")

    print(f"feature file: {n} x {d} float32 + 10 logits, snappy: {gb * 1e3:.1f} MB")
    row("write, FeatureWriter plain", t_plain)
    row("write, FeatureWriter + sha256 while writing", t_hashed, t_plain)
    row("write, pq.write_table plain", t_table_plain)
    row("write, pq.write_table + page checksums", t_table_crc, t_table_plain)
    row("read, pq.read_table", t_read)
    row("read, pq.read_table + page checksum verification", t_read_crc, t_read)
    row("verify on reuse: storage.verify (read + sha256)", t_verify)
    row("  of which: read the bytes", t_readbytes)
    row("  of which: sha256 of bytes in memory", t_sha_mem)


if __name__ == "__main__":
    main()
