"""Diffusion-RPO pair mining at scale: neighbours for every pair of 10k, 100k and 1M synthetic pairs.

The embeddings are clustered like real ones, not uniform noise: a few
thousand topic centres (one per ~400 pairs), prompts scattered around their
topic, several pairs per prompt (Poisson, mean 4) scattered around their
prompt, 768-d, L2-normalised, stored in float16 (1M x 768 = 1.5 GB).

For each size, in a fresh subprocess (so ``ru_maxrss`` is that size's peak):

- wall time of ``nearest_other_prompts`` for all rows (k nearest pairs with
  another prompt, one per prompt: what ``MinedBatches`` reads), index
  building included; which index was used;
- recall@k against exact search: brute force over all rows for a random
  sample of queries, with the same rule (other prompts, one pair per prompt);
- the time to plan epoch 0 of ``MinedBatches`` (batch 8) and the mean
  within-batch cosine of that plan against random batches.

    python benchmarks/mining.py                                  # 10k, 40k, 100k, 1M
    python benchmarks/mining.py --sizes 10000 100000 --threads 2
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import resource
import subprocess
import sys
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))

PAIRS_PER_CLUSTER = 400
PAIRS_PER_PROMPT = 4
PROMPT_SPREAD = 0.8  # norm of a prompt's offset from its topic centre (the centre has norm 1)
PAIR_SPREAD = 0.4  # norm of a pair's offset from its prompt
GENERATE_CHUNK = 65_536


def synthetic_keys(size: int, dim: int, seed: int):
    """``(keys [size, dim] float16 L2-normalised, prompt ids [size] int64)``, generated chunk by chunk."""
    import numpy as np
    import torch

    rng = np.random.default_rng(seed)
    clusters = max(8, size // PAIRS_PER_CLUSTER)
    prompts = max(1, size // PAIRS_PER_PROMPT)
    centres = rng.standard_normal((clusters, dim)).astype(np.float32)
    centres /= np.linalg.norm(centres, axis=1, keepdims=True)
    topic = rng.integers(0, clusters, prompts)
    # Pairs sorted by prompt, so a chunk of rows needs only its own prompts' offsets.
    prompt_of = np.sort(rng.integers(0, prompts, size))
    keys = np.empty((size, dim), dtype=np.float16)
    for start in range(0, size, GENERATE_CHUNK):
        stop = min(size, start + GENERATE_CHUNK)
        chunk_rng = np.random.default_rng([seed, start])
        first, last = int(prompt_of[start]), int(prompt_of[stop - 1])
        # Offsets of a prompt are a function of (seed, prompt), so a prompt split across chunks stays one prompt.
        offsets = np.stack(
            [np.random.default_rng([seed, 7, p]).standard_normal(dim, dtype=np.float32) for p in range(first, last + 1)]
        )
        local = prompt_of[start:stop] - first
        vectors = centres[topic[prompt_of[start:stop]]]
        vectors += PROMPT_SPREAD / math.sqrt(dim) * offsets[local]
        vectors += PAIR_SPREAD / math.sqrt(dim) * chunk_rng.standard_normal((stop - start, dim), dtype=np.float32)
        vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
        keys[start:stop] = vectors
    return torch.from_numpy(keys), torch.from_numpy(prompt_of.astype(np.int64))


def exact_neighbours(keys, groups, queries, k: int):
    """Brute force: each query's k most similar pairs with another prompt, one per prompt."""
    import numpy as np
    import torch

    largest = int(np.bincount(groups).max())
    depth = (k + 1) * largest + 1  # enough candidates even if every prompt's pairs come first
    query_vectors = keys[queries].float()
    best_values = best_ids = None
    for start in range(0, keys.shape[0], 50_000):
        similarities = query_vectors @ keys[start : start + 50_000].float().T
        values, ids = similarities.topk(min(depth, similarities.shape[1]), dim=1)
        ids += start
        if best_values is not None:
            values, order = torch.cat([best_values, values], 1).topk(depth, dim=1)
            ids = torch.cat([best_ids, ids], 1).gather(1, order)
        best_values, best_ids = values, ids
    neighbours = []
    for query, candidates in zip(queries.tolist(), best_ids.tolist(), strict=True):
        seen, row = {int(groups[query])}, []
        for candidate in candidates:
            if int(groups[candidate]) not in seen:
                seen.add(int(groups[candidate]))
                row.append(candidate)
                if len(row) == k:
                    break
        neighbours.append(row)
    return neighbours


def run_size(size: int, args: argparse.Namespace) -> dict:
    """One size, in this (fresh) process."""
    import faiss
    import numpy as np
    import torch

    from alignment.mining import MinedBatches, batch_similarity, nearest_other_prompts

    torch.set_num_threads(args.threads)
    faiss.omp_set_num_threads(args.threads)
    started = time.perf_counter()
    keys, prompt_ids = synthetic_keys(size, args.dim, args.seed)
    generate_seconds = time.perf_counter() - started

    stats: dict = {}
    started = time.perf_counter()
    neighbours = nearest_other_prompts(keys, prompt_ids, args.k, stats=stats, threads=args.threads)
    neighbour_seconds = time.perf_counter() - started
    peak_after_search = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20

    groups = prompt_ids.numpy()
    queries = torch.from_numpy(
        np.random.default_rng(args.seed + 1).choice(size, min(size, args.queries), replace=False)
    )
    exact = exact_neighbours(keys, groups, queries, args.k)
    found = neighbours[queries].tolist()
    recall = float(
        np.mean([len(set(row) & set(truth)) / len(truth) for row, truth in zip(found, exact, strict=True) if truth])
    )

    import alignment.inputs  # noqa: F401  (before timing the plan, which reads its seeding from it; after the search,
    # whose peak memory it would otherwise raise: it loads diffusers)

    source = MinedBatches(neighbours, prompt_ids, seed=args.seed)
    started = time.perf_counter()
    plan = source.epoch_plan(0, args.batch)
    plan_seconds = time.perf_counter() - started
    random_plan = torch.randperm(size, generator=torch.Generator().manual_seed(args.seed))
    random_plan = random_plan[: size - size % args.batch].view(-1, args.batch).tolist()
    return {
        "pairs": size,
        "prompts": int(len(np.unique(groups))),
        "dim": args.dim,
        "k": args.k,
        "generate_seconds": round(generate_seconds, 1),
        "neighbour_seconds": round(neighbour_seconds, 1),
        "recall_at_k": round(recall, 4),
        "recall_queries": len(exact),
        "index": stats["index"],
        "build_seconds": stats["build_seconds"],
        "search_rounds": stats["rounds"],
        "peak_rss_gib_after_search": round(peak_after_search, 2),
        "peak_rss_gib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 2),
        "plan_seconds": round(plan_seconds, 1),
        "batch": args.batch,
        "similarity_mined": round(batch_similarity(keys, plan.tolist()), 4),
        "similarity_random": round(batch_similarity(keys, random_plan), 4),
    }


def index_label(index: dict) -> str:
    if index["kind"] == "exact":
        return "exact (IndexFlatIP)"
    return f"IVF{index['nlist']} {index['codes'].upper()}, nprobe {index['nprobe']}"


def format_table(rows: list[dict], k: int, batch: int) -> str:
    header = (
        f"| pairs | prompts | index | neighbours for all rows (k={k}): total (build + search) | peak memory | "
        f"recall@{k} vs exact | plan epoch 0 (batch {batch}) | within-batch cosine mined / random |\n"
        "|---|---|---|---|---|---|---|---|\n"
    )
    lines = [
        f"| {r['pairs']:,} | {r['prompts']:,} | {index_label(r['index'])} | {r['neighbour_seconds']:.1f} s "
        f"({r['build_seconds']:.0f} + {sum(step['seconds'] for step in r['search_rounds']):.0f}) | "
        f"{r['peak_rss_gib_after_search']:.2f} GiB | {r['recall_at_k']:.3f} ({r['recall_queries']} queries) | "
        f"{r['plan_seconds']:.1f} s | {r['similarity_mined']:.3f} / {r['similarity_random']:.3f} |"
        for r in rows
    ]
    return header + "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    # 40k: the exact search just below its default threshold (exact_below = 50k), the most it costs.
    parser.add_argument("--sizes", type=int, nargs="+", default=[10_000, 40_000, 100_000, 1_000_000])
    parser.add_argument("--dim", type=int, default=768)
    parser.add_argument("--k", type=int, default=10)
    parser.add_argument("--queries", type=int, default=1000, help="recall sample size")
    parser.add_argument("--batch", type=int, default=8, help="MinedBatches batch size")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--name", default="mining")
    parser.add_argument("--worker", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(run_size(args.worker, args)))
        return

    rows = []
    for size in args.sizes:
        command = [sys.executable, __file__, "--worker", str(size), *sys.argv[1:]]
        output = subprocess.run(command, check=True, capture_output=True, text=True).stdout
        rows.append(json.loads(output.strip().splitlines()[-1]))
        r = rows[-1]
        print(
            f"{size}: {r['neighbour_seconds']} s, recall {r['recall_at_k']}, peak {r['peak_rss_gib']} GiB", flush=True
        )

    k = args.k
    table = format_table(rows, k, args.batch)
    print(table)
    import torch

    from benchmarks.toy_alignment import write_results

    payload = {
        "sizes": args.sizes,
        "dim": args.dim,
        "k": k,
        "threads": args.threads,
        "data": {
            "pairs_per_cluster": PAIRS_PER_CLUSTER,
            "pairs_per_prompt": PAIRS_PER_PROMPT,
            "prompt_spread": PROMPT_SPREAD,
            "pair_spread": PAIR_SPREAD,
            "storage": "float16",
        },
        "machine": {"threads": args.threads, "platform": platform.platform(), "torch": torch.__version__},
        "results": rows,
    }
    how = (
        f": {args.dim}-d clustered synthetic keys (one topic per {PAIRS_PER_CLUSTER} pairs, "
        f"~{PAIRS_PER_PROMPT} pairs per prompt), {args.threads} threads, each size in a fresh process "
        "(peak memory = its ru_maxrss up to the end of the search, the keys included). Neighbour time includes "
        "building the index; "
        f"recall against brute force on {args.queries} random queries."
    )
    write_results(args.name, payload, "Diffusion-RPO pair mining: neighbours at scale", table, how)


if __name__ == "__main__":
    main()
