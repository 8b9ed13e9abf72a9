"""Diffusion-RPO's sharded mining at scale: peak memory and wall time of mine_shard_groups at 10K and 100K pairs.

Each size runs in its own process. The embeddings are synthetic (unit vectors
of CLIP ViT-L/14's width, 768, drawn per shard from its name; several pairs
per prompt as in Pick-a-Pic), generated when a shard is loaded, so what is
measured is the mining itself: one group of ``--group-shards`` shards in
memory at a time, the mined shards written and then dropped (a real run
uploads them to the artifact store). Growth = peak RSS - RSS after imports.
It rises over the first few groups (the allocator keeps what the first groups
freed; RSS after each group levels off from the third group on) and is flat
after that: compare 40K with 100K, not 10K (one and a quarter groups) with 100K.

    python benchmarks/rpo_mining_scale.py            # writes benchmarks/results/rpo_mining_scale.md
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import shutil
import subprocess
import sys
import tempfile
import time
import zlib
from datetime import UTC, datetime
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
WIDTH = 768
PAIRS_PER_PROMPT = 4


def _rss_mb() -> float:
    with open("/proc/self/statm") as handle:
        return int(handle.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def _pair_ids(name: str, rows: int) -> list[str]:
    return [f"{name}/{i}" for i in range(rows)]


def _synthetic_embeddings(uri: str):
    import torch
    import torch.nn.functional as F

    from alignment.mining import PairEmbeddings

    name, rows = uri.rsplit(":", 1)
    rows = int(rows)
    generator = torch.Generator().manual_seed(zlib.crc32(name.encode()))
    prompts = torch.randn(rows // PAIRS_PER_PROMPT + 1, WIDTH, generator=generator)
    text = F.normalize(prompts.repeat_interleave(PAIRS_PER_PROMPT, 0)[:rows], dim=1)
    images = [F.normalize(text + 0.5 * torch.randn(rows, WIDTH, generator=generator), dim=1) for _ in range(2)]
    return PairEmbeddings(
        pair_ids=_pair_ids(name, rows), prompts=[f"{name} prompt {i // PAIRS_PER_PROMPT}" for i in range(rows)],
        text=text, image_w=images[0], image_l=images[1], embedder="synthetic",
    )  # fmt: skip


def measure(pairs: int, rows_per_shard: int, group_shards: int, batch_size: int) -> dict:
    from alignment.mining import MiningConfig
    from alignment.shard_mining import mine_shard_groups
    from alignment.shards import LatentShard, ShardManifest

    names = [f"train-{i:05d}" for i in range(pairs // rows_per_shard)]
    shards = [
        LatentShard(name=n, key=n, source_fingerprint=n, pairs=rows_per_shard, prompts=rows_per_shard, uri=n)
        for n in names
    ]
    manifest = ShardManifest(arch="sdxl", resolution=32, shards=shards)
    embedded = [{"name": n, "key": n, "uri": f"{n}:{rows_per_shard}"} for n in names]
    baseline = _rss_mb()
    out = Path(tempfile.mkdtemp(prefix="rpo_mining_scale_"))

    def drop(directory: Path) -> str:
        shutil.rmtree(directory)
        return str(directory)

    start = time.perf_counter()
    try:
        mined = mine_shard_groups(
            manifest, embedded, MiningConfig(similarity="joint", neighbours=32), group_shards=group_shards,
            out_dir=out, batch_size=batch_size, load=_synthetic_embeddings,
            pair_ids_of=lambda latent: _pair_ids(latent.name, latent.pairs), publish=drop,
        )  # fmt: skip
    finally:
        shutil.rmtree(out, ignore_errors=True)
    wall = time.perf_counter() - start
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    summary = mined["summary"]
    return {
        "pairs": pairs, "shards": len(names), "groups": summary["num_groups"], "wall_s": round(wall, 1),
        "baseline_mb": round(baseline, 1), "peak_mb": round(peak, 1), "growth_mb": round(peak - baseline, 1),
        "similarity_mined": round(summary["similarity_mined"], 4), "similarity_random": round(summary["similarity_random"], 4),
    }  # fmt: skip


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pairs", type=int, nargs="+", default=[10_000, 40_000, 100_000])
    parser.add_argument("--rows-per-shard", type=int, default=2000)
    parser.add_argument("--group-shards", type=int, default=4)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--out", type=Path, default=REPO_ROOT / "benchmarks" / "results" / "rpo_mining_scale.md")
    parser.add_argument("--child", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        print(json.dumps(measure(args.child, args.rows_per_shard, args.group_shards, args.batch_size)))
        return
    rows = []
    for pairs in args.pairs:
        command = [sys.executable, __file__, "--child", str(pairs), "--rows-per-shard", str(args.rows_per_shard),
                   "--group-shards", str(args.group_shards), "--batch-size", str(args.batch_size)]  # fmt: skip
        output = subprocess.run(command, check=True, capture_output=True, text=True, cwd=REPO_ROOT).stdout
        rows.append(json.loads(output.strip().splitlines()[-1]))
        print(f"{pairs} pairs: growth {rows[-1]['growth_mb']} MB, {rows[-1]['wall_s']} s")
    load = os.getloadavg()
    lines = [
        "# Diffusion-RPO's sharded mining at scale (mine_shard_groups), each size in its own process",
        "",
        f"Measured {datetime.now(UTC):%Y-%m-%d %H:%M} UTC on {platform.machine()}, {os.cpu_count()} cores (load average "
        f"at the end {load[0]:.1f}). Synthetic unit embeddings of width {WIDTH}, {PAIRS_PER_PROMPT} pairs per prompt, "
        f"{args.rows_per_shard} pairs per shard, mining groups of {args.group_shards} shards, joint similarity, 32 "
        "neighbours, exact search within a group. Growth = peak RSS - RSS after imports.",
        "",
        "| pairs | shards | groups | wall s | baseline RSS MB | peak RSS MB | growth MB | within-batch similarity mined / random |",
        "|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['pairs']} | {r['shards']} | {r['groups']} | {r['wall_s']} | {r['baseline_mb']} | {r['peak_mb']} | "
            f"{r['growth_mb']} | {r['similarity_mined']} / {r['similarity_random']} |"
        )
    for before, after in zip(rows, rows[1:], strict=False):
        ratio = after["growth_mb"] / max(before["growth_mb"], 1e-9)
        lines.append(f"\nGrowth at {after['pairs']} pairs over growth at {before['pairs']} pairs: {ratio:.2f}x.")
    args.out.write_text("\n".join(lines) + "\n")
    print(f"table: {args.out.relative_to(REPO_ROOT)}")


if __name__ == "__main__":
    main()
