"""The k-th nearest neighbour distance: our torch engine vs faiss ``IndexFlatL2``, side by side.

    python benchmarks/neighbour_search.py [--n-train 50000] [--dim 512] [--n-test 20000] [--k 1 50]
                                          [--threads 2] [--repeat 2]

Same features as ``benchmarks/detectors.py`` (C = 10), L2-normalised as KNN does by default. For each k:

* ``torch``: :func:`ood_core.detectors.neighbour_search.kth_nearest_distance` (what KNN runs);
* ``faiss``: ``IndexFlatL2.search`` (what OpenOOD runs), score = sqrt of its k-th squared distance;
* ``faiss+direct``: faiss's k-th neighbour, its distance recomputed directly (``|q - t|``).

Columns: ``wall_s`` / ``cpu_s``: best wall time / process CPU time of the full search (``--repeat`` rounds,
interleaved; faiss's includes building the index; on a busy machine the CPU time is the steadier figure);
``max_rel_err``: largest relative difference to a float64 search over the first 2,000 test rows; ``batch``:
largest relative difference between scoring 100 test rows one at a time and in the full batch; ``near_dup``: largest
relative error on near-duplicates (training rows spread 1e-4 around three centres of norm ~4, queries
inside the clusters, 35 queries: the expanded form alone cannot order them), unnormalised, against float64.
faiss 1.15 searches a batch of fewer than ``faiss.cvar.distance_compute_blas_threshold`` queries (128,000 by
default) without the expanded form, and larger batches by BLAS in the expanded form, which gets the near-duplicates
wrong (``--blas-threshold 20`` shows it).
"""
from __future__ import annotations

import argparse
import os
import sys
import time

import numpy as np
import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from benchmarks.detectors import make_data  # noqa: E402
from ood_core.detectors.neighbour_search import kth_nearest_distance  # noqa: E402


def faiss_index(bank: torch.Tensor):
    import faiss

    index = faiss.IndexFlatL2(bank.shape[1])
    index.add(bank.numpy())
    return index


def faiss_search(bank, queries, k, direct=False, index=None):
    index = index or faiss_index(bank)
    d2, idx = index.search(queries.numpy(), k)
    if not direct:
        return torch.from_numpy(np.sqrt(np.maximum(d2[:, k - 1], 0)))
    return (queries - bank[torch.from_numpy(idx[:, k - 1])]).norm(dim=1)


def reference(bank, queries, k):
    """float64: expanded form to find candidates (k + 8), direct distances to order them."""
    b, q = bank.double(), queries.double()
    d2 = (b * b).sum(1) - 2 * q @ b.T
    idx = d2.topk(min(k + 8, b.shape[0]), dim=1, largest=False).indices
    direct = (q[:, None, :] - b[idx]).norm(dim=2)
    return direct.sort(dim=1).values[:, k - 1]


def near_duplicates(seed=0):
    g = torch.Generator().manual_seed(seed)
    z = torch.relu(torch.randn(600, 16, generator=g) * 2)
    centres = z[:3]
    z = torch.cat([z, centres.repeat_interleave(50, dim=0) + 1e-4 * torch.randn(150, 16, generator=g)])
    inside = centres.repeat_interleave(10, dim=0) + 3e-5 * torch.randn(30, 16, generator=g)
    return z, torch.cat([inside, z[:5]])


def rel(a, b):
    a, b = a.double(), b.double()
    return float(((a - b).abs() / b.abs().clamp(min=1e-300)).max())


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--n-train", type=int, default=50000)
    p.add_argument("--dim", type=int, default=512)
    p.add_argument("--n-test", type=int, default=20000)
    p.add_argument("--k", type=int, nargs="+", default=[1, 50])
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--repeat", type=int, default=2)
    p.add_argument("--blas-threshold", type=int, default=None, help="faiss.cvar.distance_compute_blas_threshold")
    args = p.parse_args(argv)
    import faiss

    if args.blas_threshold is not None:
        faiss.cvar.distance_compute_blas_threshold = args.blas_threshold

    torch.set_num_threads(args.threads)
    faiss.omp_set_num_threads(args.threads)
    d = make_data(args.n_train, args.dim, args.n_test, 10, 0, "cpu")
    bank = torch.nn.functional.normalize(d["z"], dim=1).contiguous()
    queries = torch.nn.functional.normalize(d["z_test"], dim=1).contiguous()
    dup_bank, dup_q = near_duplicates()
    print(f"torch {torch.__version__}, faiss {faiss.__version__}, threads {args.threads}; "
          f"N_train={args.n_train}, D={args.dim}, N_test={args.n_test}")
    methods = {
        "torch": lambda b, q, k: kth_nearest_distance(q, b, k),
        "faiss": lambda b, q, k: faiss_search(b, q, k),
        "faiss+direct": lambda b, q, k: faiss_search(b, q, k, direct=True),
    }
    print("| k | method | wall_s | cpu_s | max_rel_err | batch | near_dup |")
    print("|---:|---|---:|---:|---:|---:|---:|")
    for k in args.k:
        ref = reference(bank, queries[:2000], k)
        ref_dup = reference(dup_bank, dup_q, min(k, 20))
        best = {name: [float("inf"), float("inf")] for name in methods}
        scores = {}
        for r in range(args.repeat):
            order = list(methods) if r % 2 == 0 else list(reversed(methods))
            for name in order:
                t0, c0 = time.perf_counter(), time.process_time()
                scores[name] = methods[name](bank, queries, k)
                best[name] = [min(best[name][0], time.perf_counter() - t0), min(best[name][1], time.process_time() - c0)]
        index = faiss_index(bank)
        single_fns = {"torch": methods["torch"],
                      "faiss": lambda b, q, k: faiss_search(b, q, k, index=index),
                      "faiss+direct": lambda b, q, k: faiss_search(b, q, k, direct=True, index=index)}
        for name, fn in methods.items():
            single = torch.cat([single_fns[name](bank, queries[i : i + 1], k) for i in range(100)])
            dup = fn(dup_bank, dup_q, min(k, 20))
            print(f"| {k} | {name} | {best[name][0]:.2f} | {best[name][1]:.2f} | {rel(scores[name][:2000], ref):.1e} "
                  f"| {rel(single, scores[name][:100]):.1e} | {rel(dup, ref_dup):.1e} |", flush=True)


if __name__ == "__main__":
    main()
