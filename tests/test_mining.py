"""Diffusion-RPO pair mining: embeddings artifact, similarity vectors, neighbour search, mined batches.

Small synthetic data throughout (the IVF path is forced with a low
``exact_below``); the one real model is the committed toy reward model on a
dozen toy pairs. No network, no downloads.
"""

from __future__ import annotations

import hashlib
import io
import math
from collections import Counter

import numpy as np
import pandas as pd
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from pydantic import ValidationError

from alignment import mining
from alignment.mining import (
    MinedBatches,
    MiningConfig,
    NeighbourIndex,
    PairEmbeddings,
    batch_similarity,
    embed_pairs,
    mining_keys,
    nearest_other_prompts,
    pair_vectors,
    plan_summary,
    prompt_ids,
)

# ----------------------------------------------------------------------------- helpers


def unit(rows: torch.Tensor) -> torch.Tensor:
    return F.normalize(rows.float(), dim=-1)


def make_embeddings(n: int = 12, dim: int = 8, prompts: list[str] | None = None, seed: int = 0) -> PairEmbeddings:
    generator = torch.Generator().manual_seed(seed)
    prompts = prompts or [f"prompt {i % 4}" for i in range(n)]
    return PairEmbeddings(
        pair_ids=[f"r{i}" for i in range(n)],
        prompts=prompts,
        text=unit(torch.randn(n, dim, generator=generator)),
        image_w=unit(torch.randn(n, dim, generator=generator)),
        image_l=unit(torch.randn(n, dim, generator=generator)),
        embedder="fake test",
    )


def clustered(
    num_prompts: int, pairs_per_prompt: int, dim: int, clusters: int, seed: int = 0
) -> tuple[torch.Tensor, list[str]]:
    """Pair keys around prompts around cluster centres; pairs of a prompt are distinct vectors."""
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((clusters, dim))
    prompt_vectors = centres[rng.integers(0, clusters, num_prompts)] + 0.5 * rng.standard_normal((num_prompts, dim))
    group = np.repeat(np.arange(num_prompts), pairs_per_prompt)
    keys = prompt_vectors[group] + 0.3 * rng.standard_normal((len(group), dim))
    order = rng.permutation(len(group))  # pairs of a prompt are not adjacent
    return unit(torch.tensor(keys[order])), [f"prompt {g}" for g in group[order]]


def brute_force(keys: torch.Tensor, prompts: list[str], k: int, one_per_prompt: bool = True) -> list[list[int]]:
    similarities = keys.float() @ keys.float().T
    largest = max(Counter(prompts).values())
    candidates = similarities.topk(min(len(prompts), (k + 1) * largest + 1), dim=1).indices.tolist()
    result = []
    for i in range(len(prompts)):
        seen, row = {prompts[i]}, []
        for j in candidates[i]:
            if prompts[j] == prompts[i] or (one_per_prompt and prompts[j] in seen):
                continue
            seen.add(prompts[j])
            row.append(j)
            if len(row) == k:
                break
        result.append(row + [-1] * (k - len(row)))
    return result


def png(colour: tuple[int, int, int], size: int = 8) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (size, size), colour).save(buffer, format="PNG")
    return buffer.getvalue()


class FakeEmbedder:
    """Text: a hash-seeded vector per caption; image: its mean colour, padded. Counts what it embeds."""

    name = "fake"
    batch_size = 3

    def __init__(self, dim: int = 6, nan_caption: str | None = None) -> None:
        self.dim = dim
        self.nan_caption = nan_caption
        self.texts: list[str] = []
        self.images = 0
        self.metadata = {"source": "unit-test"}

    def text_embeddings(self, prompts: list[str]) -> torch.Tensor:
        self.texts += prompts
        rows = []
        for prompt in prompts:
            seed = int(hashlib.sha256(prompt.encode()).hexdigest()[:8], 16)
            row = torch.randn(self.dim, generator=torch.Generator().manual_seed(seed))
            rows.append(torch.full((self.dim,), float("nan")) if prompt == self.nan_caption else row)
        return unit(torch.stack(rows))

    def image_embeddings(self, images: list[Image.Image]) -> torch.Tensor:
        self.images += len(images)
        means = torch.from_numpy(np.stack([np.asarray(image, dtype=np.float32).mean(axis=(0, 1)) for image in images]))
        return unit(torch.cat([means + 1.0, torch.ones(len(images), self.dim - 3)], dim=1))


def fake_pairs() -> pd.DataFrame:
    colours = [(200, 10, 10), (10, 200, 10), (10, 10, 200), (90, 90, 90), (250, 250, 0)]
    captions = ["a red cat", "a green dog", "a red cat", "a blue bird", "a green dog", "a red cat", "a tree"]
    return pd.DataFrame(
        {
            "row_id": [f"row{i}" for i in range(len(captions))],
            "caption": captions,
            "image_w": [png(colours[i % 5]) for i in range(len(captions))],
            "image_l": [png(colours[(i + 2) % 5]) for i in range(len(captions))],
        }
    )


# ----------------------------------------------------------------------------- PairEmbeddings


def test_pair_embeddings_round_trip(tmp_path):
    embeddings = make_embeddings()
    target = embeddings.save(tmp_path / "emb")
    loaded = PairEmbeddings.load(target)
    assert loaded.pair_ids == embeddings.pair_ids and loaded.prompts == embeddings.prompts
    assert loaded.embedder == "fake test" and len(loaded) == 12
    for name, tensor in embeddings.tensors().items():
        assert torch.equal(getattr(loaded, name), tensor)
    assert loaded.fingerprint() == embeddings.fingerprint()
    loaded._fingerprint = None  # recomputed from the content, not only read back
    assert loaded.fingerprint() == embeddings.fingerprint()
    assert make_embeddings(seed=1).fingerprint() != embeddings.fingerprint()
    assert embeddings.summary()["prompts"] == 4


def test_pair_embeddings_save_is_atomic(tmp_path, monkeypatch):
    target = tmp_path / "emb"
    first = make_embeddings(seed=0)
    first.save(target)
    second = make_embeddings(seed=1)
    second.save(target)  # replacing a previous save is fine
    assert PairEmbeddings.load(target).fingerprint() == second.fingerprint()

    def broken_save(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(mining, "save_file", broken_save)
    with pytest.raises(OSError, match="disk full"):
        make_embeddings(seed=2).save(target)
    with pytest.raises(OSError, match="disk full"):
        first.save(tmp_path / "fresh")
    # The previous save is intact, nothing half-written exists, no staging directory is left behind.
    assert PairEmbeddings.load(target).fingerprint() == second.fingerprint()
    assert not (tmp_path / "fresh").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["emb"]


def test_pair_embeddings_refuses_to_replace_foreign_files(tmp_path):
    (tmp_path / "emb").mkdir()
    (tmp_path / "emb" / "notes.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="notes.txt"):
        make_embeddings().save(tmp_path / "emb")
    assert (tmp_path / "emb" / "notes.txt").read_text() == "mine"


def test_pair_embeddings_load_names_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="pair_embeddings.json"):
        PairEmbeddings.load(tmp_path)


def test_pair_embeddings_validation_names_the_pair():
    good = make_embeddings()
    text = good.text.clone()
    text[5, 2] = float("nan")
    with pytest.raises(ValueError, match="text: pair 'r5' has a non-finite"):
        PairEmbeddings(good.pair_ids, good.prompts, text, good.image_w, good.image_l, "x")
    with pytest.raises(ValueError, match="image_w: pair 'r0' has an embedding of norm 2"):
        PairEmbeddings(good.pair_ids, good.prompts, good.text, good.image_w * 2, good.image_l, "x")
    with pytest.raises(ValueError, match=r"image_l must be \[N=12, D\]"):
        PairEmbeddings(good.pair_ids, good.prompts, good.text, good.image_w, good.image_l[:5], "x")
    with pytest.raises(ValueError, match="'r0' occurs more than once"):
        PairEmbeddings(["r0"] * 12, good.prompts, good.text, good.image_w, good.image_l, "x")
    with pytest.raises(ValueError, match="float32"):
        PairEmbeddings(good.pair_ids, good.prompts, good.text.double(), good.image_w, good.image_l, "x")


# ----------------------------------------------------------------------------- embed_pairs


def test_embed_pairs_with_a_fake_embedder():
    pairs = fake_pairs()
    embedder = FakeEmbedder()
    embeddings = embed_pairs(pairs, embedder, show_progress=False)
    assert embeddings.pair_ids == list(pairs["row_id"]) and embeddings.prompts == list(pairs["caption"])
    assert sorted(embedder.texts) == sorted(set(pairs["caption"]))  # each distinct caption once
    assert embedder.images == 2 * len(pairs)
    assert embeddings.text.shape == embeddings.image_w.shape == (7, 6)
    assert torch.equal(embeddings.text[0], embeddings.text[2]) and torch.equal(embeddings.text[0], embeddings.text[5])
    assert not torch.equal(embeddings.image_w[0], embeddings.image_l[0])
    assert torch.equal(embeddings.image_w[0], embeddings.image_w[5])  # the same colour
    assert embeddings.embedder == "fake unit-test"


@pytest.mark.parametrize(
    ("change", "error", "message"),
    [
        (lambda frame: frame.iloc[:0], ValueError, "empty"),
        (lambda frame: frame.drop(columns=["image_l"]), ValueError, r"missing column\(s\) \['image_l'\]"),
        (lambda frame: frame.assign(row_id=["a"] * len(frame)), ValueError, "row_id 'a' occurs more than once"),
        (
            lambda frame: frame.assign(caption=[None] + list(frame["caption"][1:])),
            ValueError,
            "row row0, column caption",
        ),
    ],
)
def test_embed_pairs_rejects_bad_frames(change, error, message):
    with pytest.raises(error, match=message):
        embed_pairs(change(fake_pairs()), FakeEmbedder(), show_progress=False)


def test_embed_pairs_names_the_row_of_a_bad_embedding():
    with pytest.raises(ValueError, match="row row3, column caption: non-finite text embedding of 'a blue bird'"):
        embed_pairs(fake_pairs(), FakeEmbedder(nan_caption="a blue bird"), show_progress=False)

    class NanImages(FakeEmbedder):
        def image_embeddings(self, images):
            out = super().image_embeddings(images)
            out[len(images) // 2 + 1] = float("nan")  # second loser of the batch
            return out

    with pytest.raises(ValueError, match="row row1, column image_l: non-finite image embedding"):
        embed_pairs(fake_pairs(), NanImages(), show_progress=False)
    with pytest.raises(TypeError, match="no text_embeddings"):
        embed_pairs(fake_pairs(), object(), show_progress=False)


def test_embed_pairs_with_the_toy_reward_model():
    from alignment.data import load_preference_frame, prepare_pairs
    from alignment.toyworld.reward_model import DEFAULT_REWARD_MODEL_DIR, ToyRewardScorer

    pairs, _ = prepare_pairs(load_preference_frame(DEFAULT_REWARD_MODEL_DIR.parent / "preferences", max_rows=12))
    embeddings = embed_pairs(pairs, ToyRewardScorer.load(), show_progress=False)
    assert len(embeddings) == len(pairs) > 0
    assert embeddings.embedder == "toy_reward data/toyworld/reward_model"
    for tensor in embeddings.tensors().values():
        assert torch.allclose(tensor.norm(dim=1), torch.ones(len(pairs)), atol=1e-4)
    # In the reward model's space the prompt is closer to the image it prefers, on average.
    margin = (embeddings.text * (embeddings.image_w - embeddings.image_l)).sum(dim=1)
    assert float(margin.mean()) > 0


# ----------------------------------------------------------------------------- vectors and keys


@pytest.mark.parametrize("similarity", ["text", "image", "joint"])
@pytest.mark.parametrize("joint", ["concat", "mean"])
def test_pair_vectors_and_keys_are_normalised(similarity, joint):
    embeddings = make_embeddings(n=10, dim=8)
    winners, losers = pair_vectors(embeddings, similarity, joint=joint)
    keys = mining_keys(embeddings, similarity, joint=joint)
    width = 16 if similarity == "joint" and joint == "concat" else 8
    for tensor in (winners, losers, keys):
        assert tensor.shape == (10, width) and tensor.dtype == torch.float32
        assert torch.allclose(tensor.norm(dim=1), torch.ones(10), atol=1e-5)
    assert mining_keys(embeddings, similarity, joint=joint, dtype=torch.float16).dtype == torch.float16


def test_vector_definitions():
    e = make_embeddings(n=6, dim=8)
    winners, losers = pair_vectors(e, "text")
    assert torch.equal(winners, e.text) and torch.equal(losers, e.text)
    winners, losers = pair_vectors(e, "image")
    assert torch.equal(winners, e.image_w) and torch.equal(losers, e.image_l)
    # joint (concat): the cosine is the mean of the text cosine and the image cosine.
    winners, losers = pair_vectors(e, "joint")
    expected = 0.5 * (e.text @ e.text.T + e.image_w @ e.image_l.T)
    assert torch.allclose(winners @ losers.T, expected, atol=1e-5)
    assert torch.allclose(mining_keys(e, "image"), unit(e.image_w + e.image_l))
    assert torch.allclose(mining_keys(e, "joint"), unit(torch.cat([e.text, unit(e.image_w + e.image_l)], 1)))
    with pytest.raises(ValueError, match="similarity must be one of"):
        pair_vectors(e, "audio")
    with pytest.raises(ValueError, match="joint must be one of"):
        mining_keys(e, "joint", joint="max")


# ----------------------------------------------------------------------------- neighbours


@pytest.mark.parametrize("one_per_prompt", [True, False])
def test_exact_neighbours_match_brute_force(one_per_prompt):
    keys, prompts = clustered(num_prompts=60, pairs_per_prompt=3, dim=16, clusters=6)
    stats: dict = {}
    found = nearest_other_prompts(keys, prompts, 7, one_per_prompt=one_per_prompt, stats=stats)
    assert stats["index"]["kind"] == "exact"
    assert found.dtype == torch.int64 and found.shape == (180, 7)
    assert found.tolist() == brute_force(keys, prompts, 7, one_per_prompt)


def test_neighbours_exclude_the_same_prompt_and_pad():
    # Text keys: every pair of a prompt has the same key, which would otherwise be its nearest neighbours.
    prompts = ["a", "a", "a", "b", "b", "c"]
    base = unit(torch.tensor([[1.0, 0.0, 0.0], [0.9, 0.3, 0.0], [0.2, 0.5, 1.0]]))
    keys = base[[0, 0, 0, 1, 1, 2]]
    found = nearest_other_prompts(keys, prompts, 4)
    assert found[:3].tolist() == [[3, 5, -1, -1]] * 3  # b (its first pair) then c; only two other prompts
    assert found[3].tolist() == found[4].tolist() == [0, 5, -1, -1]
    assert found[5].tolist() == [3, 0, -1, -1]
    every = nearest_other_prompts(keys, prompts, 4, one_per_prompt=False)
    assert every[0].tolist() == [3, 4, 5, -1]
    assert every[5].tolist() == [3, 4, 0, 1]
    # Prompt ids work like prompts.
    assert torch.equal(nearest_other_prompts(keys, prompt_ids(prompts), 4), found)


def test_ivf_neighbours_have_high_recall_on_clustered_data():
    keys, prompts = clustered(num_prompts=1500, pairs_per_prompt=4, dim=32, clusters=40, seed=1)
    truth = brute_force(keys, prompts, 10)
    stats: dict = {}
    found = nearest_other_prompts(keys, prompts, 10, exact_below=1000, stats=stats)  # 6000 rows: IVF
    assert stats["index"]["kind"] == "ivf_sq8" and stats["index"]["nprobe"] == 4
    recall = np.mean([len(set(a) & set(b)) / 10 for a, b in zip(found.tolist(), truth, strict=True)])
    assert recall >= 0.9
    groups = np.array(prompts)
    for row, neighbours in enumerate(found.tolist()):
        named = [groups[j] for j in neighbours if j >= 0]
        assert groups[row] not in named and len(set(named)) == len(named)
    again = nearest_other_prompts(keys, prompts, 10, exact_below=1000)
    assert torch.equal(again, found)  # a seeded build searches the same way


def test_neighbour_index_search_and_memory_mapping(tmp_path):
    keys, _ = clustered(num_prompts=600, pairs_per_prompt=2, dim=16, clusters=12, seed=2)
    queries = keys[:50] + 0.01
    exact = NeighbourIndex().build(keys)
    similarities, ids = exact.search(queries, 5)
    assert similarities.shape == ids.shape == (50, 5) and ids.dtype == torch.int64
    assert torch.equal(ids, ids_exact(keys, queries, 5))
    assert torch.all(similarities[:, :-1] >= similarities[:, 1:])
    # More neighbours than rows: -1 / -inf padding.
    small = NeighbourIndex().build(keys[:3])
    similarities, ids = small.search(keys[:2], 5)
    assert (ids[:, 3:] == -1).all() and torch.isinf(similarities[:, 3:]).all()

    ivf = NeighbourIndex(exact_below=100, nlist=16, nprobe=16).build(keys)  # every list probed: exact ranking
    assert ivf.describe()["kind"] == "ivf_sq8"
    _, ivf_ids = ivf.search(queries, 5)
    truth = ids_exact(keys, queries, 5).tolist()
    assert np.mean([len(set(a) & set(b)) / 5 for a, b in zip(ivf_ids.tolist(), truth, strict=True)]) > 0.95
    mapped = NeighbourIndex(exact_below=100, nlist=16, nprobe=16, on_disk=tmp_path / "index.faiss").build(keys)
    assert mapped.describe()["kind"] == "ivf_sq8_mmap" and (tmp_path / "index.faiss").is_file()
    assert torch.equal(mapped.search(queries, 5)[1], ivf_ids)
    flat_mapped = NeighbourIndex(on_disk=tmp_path / "flat.faiss").build(keys)
    assert torch.equal(flat_mapped.search(queries, 5)[1], exact.search(queries, 5)[1])


def ids_exact(keys: torch.Tensor, queries: torch.Tensor, k: int) -> torch.Tensor:
    return (queries @ keys.T).topk(k, dim=1).indices


def test_big_batch_search_matches_per_query_search():
    keys, prompts = clustered(num_prompts=1200, pairs_per_prompt=4, dim=16, clusters=30, seed=3)
    index = NeighbourIndex(exact_below=100, nlist=40, nprobe=3).build(keys)
    assert len(keys) >= mining.BIG_BATCH_MIN_QUERIES  # search_indexed goes list by list
    batch_similarities, batch_ids = index.search_indexed(6)
    query_similarities, query_ids = index.search(keys[:100], 6)  # 100 queries: one by one
    assert torch.allclose(batch_similarities[:100], query_similarities, atol=1e-4)
    assert (batch_ids[:100] == query_ids).float().mean() > 0.98


@pytest.mark.parametrize(
    ("keys", "prompts", "k", "message"),
    [
        (torch.ones(5), ["a"] * 5, 2, r"non-empty \[N, D\]"),
        (torch.ones(0, 4), [], 2, r"non-empty \[N, D\]"),
        (unit(torch.ones(4, 3)), ["a", "b", "c", "d"], 0, "k must be >= 1"),
        (unit(torch.ones(4, 3)), ["a", "b", "c"], 2, "3 prompts for 4 pairs"),
        (torch.tensor([[1.0, 0], [float("nan"), 0]]), ["a", "b"], 1, "row 1 is not finite"),
        ([[1.0, 0.0]], ["a"], 1, "torch tensor or a numpy array"),
    ],
)
def test_nearest_other_prompts_rejects_bad_input(keys, prompts, k, message):
    with pytest.raises((ValueError, TypeError), match=message):
        nearest_other_prompts(keys, prompts, k)


def test_neighbour_index_rejects_bad_options_and_queries():
    with pytest.raises(ValueError, match="codes must be one of"):
        NeighbourIndex(codes="pq")
    with pytest.raises(ValueError, match="nprobe must be >= 1"):
        NeighbourIndex(nprobe=0)
    index = NeighbourIndex().build(unit(torch.randn(10, 4)))
    with pytest.raises(ValueError, match="queries have 3 dimensions, the index 4"):
        index.search(torch.randn(2, 3), 1)
    with pytest.raises(ValueError, match="k must be >= 1"):
        index.search(torch.randn(2, 4), 0)
    with pytest.raises(RuntimeError, match="before build"):
        NeighbourIndex().search(torch.randn(2, 4), 1)


# ----------------------------------------------------------------------------- batches


def epoch(source: MinedBatches, index: int, size: int) -> list[list[int]]:
    per_epoch = source.batches_per_epoch(size)
    return [source.global_batch(index * per_epoch + b, size) for b in range(per_epoch)]


@pytest.mark.parametrize(("num_prompts", "per_prompt", "size"), [(20, 3, 7), (9, 4, 4), (5, 4, 8), (3, 1, 5)])
def test_mined_batches_use_every_pair_once_per_epoch(num_prompts, per_prompt, size):
    keys, prompts = clustered(num_prompts=num_prompts, pairs_per_prompt=per_prompt, dim=8, clusters=3)
    n = len(prompts)
    source = MinedBatches(nearest_other_prompts(keys, prompts, 3), tuple(prompts), seed=5)
    for e in range(2):
        batches = epoch(source, e, size)
        assert len(batches) == math.ceil(n / size) and all(len(b) == size for b in batches)
        body = [pair for batch in batches[:-1] for pair in batch]
        last = batches[-1]
        fresh = n - len(body)
        assert sorted(body + last[:fresh]) == list(range(n))  # every pair exactly once
        assert set(last[fresh:]) <= set(body) or n < size  # the top-up repeats pairs of this epoch
        if size <= num_prompts:
            # Distinct prompts within a batch wherever the epoch's remaining pairs allow it.
            distinct = [len({prompts[p] for p in b}) == len(b) for b in batches[:-1]]
            assert np.mean(distinct) >= 0.8


def test_mined_batches_prefer_distinct_prompts_and_neighbours():
    keys, prompts = clustered(num_prompts=40, pairs_per_prompt=2, dim=16, clusters=4, seed=4)
    neighbours = nearest_other_prompts(keys, prompts, 6)
    source = MinedBatches(neighbours, tuple(prompts), seed=0)
    batches = epoch(source, 0, 4)
    assert all(len({prompts[p] for p in batch}) == 4 for batch in batches[:-1])
    # The first batch is its seed and the seed's nearest neighbours (nothing is used yet).
    first = batches[0]
    assert first[1:] == neighbours[first[0]].tolist()[:3]


def test_mined_batches_are_deterministic_and_vary_with_seed_and_epoch():
    keys, prompts = clustered(num_prompts=50, pairs_per_prompt=2, dim=8, clusters=5)
    neighbours = nearest_other_prompts(keys, prompts, 4)
    a = MinedBatches(neighbours, tuple(prompts), seed=1)
    b = MinedBatches(neighbours.clone(), list(prompts), seed=1)
    assert epoch(a, 0, 6) == epoch(b, 0, 6) and epoch(a, 3, 6) == epoch(b, 3, 6)
    assert epoch(a, 0, 6) != epoch(a, 1, 6)
    assert epoch(a, 0, 6) != epoch(MinedBatches(neighbours, tuple(prompts), seed=2), 0, 6)
    # Epoch plans are cached per (epoch, size) and recomputed identically after eviction.
    for e in range(5):
        epoch(a, e, 6)
    assert epoch(a, 0, 6) == epoch(b, 0, 6)
    assert torch.equal(MinedBatches(neighbours, prompt_ids(prompts), seed=1).neighbours, a.neighbours)
    assert epoch(MinedBatches(neighbours, prompt_ids(prompts), seed=1), 0, 6) == epoch(a, 0, 6)


def test_mined_batches_are_more_similar_than_random():
    keys, prompts = clustered(num_prompts=300, pairs_per_prompt=2, dim=16, clusters=10, seed=6)
    source = MinedBatches(nearest_other_prompts(keys, prompts, 8), tuple(prompts), seed=0)
    summary = plan_summary(keys, source, 8, seed=0)
    assert summary["batches"] == 75 and summary["pairs"] == 600 and summary["prompts"] == 300
    assert summary["similarity_mined"] > summary["similarity_random"] + 0.2
    assert summary["distinct_prompt_share_mined"] >= 0.99


def test_mined_batches_reject_bad_input():
    with pytest.raises(ValueError, match=r"\[N, k\]"):
        MinedBatches(torch.zeros(4, dtype=torch.int64), ("a",) * 4)
    with pytest.raises(ValueError, match="integer pair indices"):
        MinedBatches(torch.zeros(4, 2), ("a",) * 4)
    with pytest.raises(ValueError, match=r"in \[0, 4\) or -1"):
        MinedBatches(torch.full((4, 2), 4), ("a",) * 4)
    with pytest.raises(ValueError, match="3 prompts for 4 pairs"):
        MinedBatches(torch.zeros(4, 2, dtype=torch.int64), ("a",) * 3)
    source = MinedBatches(torch.full((4, 2), -1), ("a", "b", "c", "d"))
    with pytest.raises(ValueError, match="batch size must be >= 1"):
        source.global_batch(0, 0)
    with pytest.raises(ValueError, match="micro_index must be >= 0"):
        source.global_batch(-1, 2)
    assert sorted(source.global_batch(0, 4)) == [0, 1, 2, 3]  # no neighbours at all: random fill


def test_batch_similarity():
    keys = torch.eye(4)
    assert batch_similarity(keys, [[0, 1], [2, 3]]) == 0.0
    same = unit(torch.ones(4, 3))
    assert batch_similarity(same, [[0, 1, 2], [3]]) == pytest.approx(1.0)
    assert math.isnan(batch_similarity(same, [[0], [1]]))
    mixed = unit(torch.tensor([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0]]))
    assert batch_similarity(mixed, [[0, 1, 2]]) == pytest.approx(1 / 3)
    with pytest.raises(ValueError, match="outside"):
        batch_similarity(keys, [[0, 9]])


# ----------------------------------------------------------------------------- config


def test_mining_config():
    config = MiningConfig()
    assert (config.similarity, config.neighbours, config.exact_below) == ("text", 32, 20_000)
    assert config.joint == "concat" and config.one_per_prompt
    NeighbourIndex(**config.index_options())  # every index option is one the index takes
    with pytest.raises(ValidationError):
        MiningConfig(neighbours=0)
    with pytest.raises(ValidationError):
        MiningConfig(similarity="audio")
    with pytest.raises(ValidationError):
        MiningConfig(temperature=0.5)  # extra fields are refused (the temperature belongs to the loss)
    keys, prompts = clustered(num_prompts=30, pairs_per_prompt=2, dim=8, clusters=3)
    options = MiningConfig(exact_below=10, nprobe=2).index_options()
    assert nearest_other_prompts(keys, prompts, 3, **options).shape == (60, 3)


def test_prompt_ids_number_prompts_by_first_appearance():
    assert prompt_ids(["b", "a", "b", "c"]).tolist() == [0, 1, 0, 2]
    assert prompt_ids(torch.tensor([7, 3, 7])).tolist() == [0, 1, 0]
    with pytest.raises(TypeError, match="single string"):
        prompt_ids("abc")
    assert Counter(prompt_ids(["x"] * 3).tolist()) == {0: 3}
