#!/usr/bin/env python3
"""NumPy/BLAS brute-force baseline for `pairuni bench retrieval`.

Same sizes and the same kind of synthetic data (clustered unit rows, queries = noisy copies of database rows);
the data differ bit for bit from the Rust benchmark's (different RNG) but not in cost. Measures the cosine
score matrix in row blocks (as the Rust side does, so memory stays bounded) plus the per-row top-1 with the
threshold, i.e. the part that `exact_candidates_s` measures.

    /work/pyvenv/bin/python scripts/bench_retrieval_numpy.py --n 50000 --dim 2048
"""
import argparse
import json
import os
import time

import numpy as np


def unit_rows(rng, n, dim):
    v = rng.standard_normal((n, dim), dtype=np.float32)
    v /= np.linalg.norm(v, axis=1, keepdims=True)
    return v


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=50000)
    ap.add_argument("--queries", type=int, default=None)
    ap.add_argument("--dim", type=int, default=2048)
    ap.add_argument("--cluster-size", type=int, default=50)
    ap.add_argument("--delta", type=float, default=0.6)
    ap.add_argument("--block-floats", type=int, default=16 << 20)
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args()
    nq = a.queries or a.n
    rng = np.random.default_rng(a.seed)
    centres = unit_rows(rng, max(1, -(-a.n // a.cluster_size)), a.dim)
    db = centres[rng.integers(0, len(centres), a.n)] + 0.8 * unit_rows(rng, a.n, a.dim)
    db /= np.linalg.norm(db, axis=1, keepdims=True)
    q = db[rng.integers(0, a.n, nq)] + 0.6 * unit_rows(rng, nq, a.dim)
    q /= np.linalg.norm(q, axis=1, keepdims=True)
    rows = max(1, min(nq, a.block_floats // a.n))
    t = time.perf_counter()
    best = np.empty(nq, dtype=np.int64)
    for s in range(0, nq, rows):
        sc = q[s : s + rows] @ db.T
        j = sc.argmax(axis=1)
        ok = sc[np.arange(len(j)), j] >= a.delta
        best[s : s + rows] = np.where(ok, j, -1)
    dt = time.perf_counter() - t
    print(
        json.dumps(
            {
                "n": a.n,
                "queries": nq,
                "dim": a.dim,
                "numpy": np.__version__,
                "threads_env": {k: os.environ.get(k) for k in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS")},
                "seconds": dt,
                "gflops": 2.0 * a.n * nq * a.dim / dt / 1e9,
                "matched": int((best >= 0).sum()),
            },
            indent=2,
        )
    )


if __name__ == "__main__":
    main()
