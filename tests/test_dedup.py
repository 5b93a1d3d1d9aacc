"""NearDuplicateIndex: keep policy, reasons, exact vs IVF (SemDeDup) agreement on planted duplicates."""
from __future__ import annotations

import numpy as np

from filters.dedup import DuplicateFilter, NearDuplicateIndex
from schemas.config import DedupConfig
from schemas.records import ImageRecord


def unit(x: np.ndarray) -> np.ndarray:
    return (x / np.linalg.norm(x, axis=-1, keepdims=True)).astype(np.float32)


def planted(n: int, dups: int, dim: int = 64, seed: int = 0):
    rng = np.random.default_rng(seed)
    base = unit(rng.normal(size=(n, dim)))
    sources = rng.choice(n, dups, replace=False)
    copies = unit(base[sources] + rng.normal(scale=0.01, size=(dups, dim)))  # cosine ~0.995
    return np.concatenate([base, copies]), sources


def test_keep_policy_highest_score_then_smallest_uid():
    e = unit(np.array([[1.0, 0, 0], [1.0, 0.001, 0], [1.0, 0, 0.001], [0, 1.0, 0]]))
    index = NearDuplicateIndex(DedupConfig(eps=0.01))
    reasons = index.fit(["b", "a", "c", "d"], e, np.array([0.3, 0.3, 0.9, 0.5]), [None, None, None, None])
    assert reasons == {"a": "near_duplicate_of:c", "b": "near_duplicate_of:c"}  # c has the best score
    reasons = index.fit(["b", "a", "c", "d"], e, np.array([0.3, 0.3, 0.1, 0.5]), [None] * 4)
    assert reasons == {"b": "near_duplicate_of:a", "c": "near_duplicate_of:a"}  # tie on score: smallest uid


def test_exact_duplicates_by_hash_name_the_survivor():
    e = unit(np.eye(3, dtype=np.float32))
    reasons = NearDuplicateIndex(DedupConfig()).fit(["x", "y", "z"], e, np.array([0.1, 0.5, 0.2]), ["h1", "h1", "h2"])
    assert reasons == {"x": "exact_duplicate_of:y"}


def test_distinct_images_survive():
    e, _ = planted(500, 0)
    assert NearDuplicateIndex(DedupConfig(eps=0.01)).fit([f"u{i}" for i in range(500)], e, np.zeros(500), [None] * 500) == {}


def test_exact_and_ivf_agree_on_planted_duplicates():
    e, sources = planted(6000, 120)
    uids = [f"u{i:05d}" for i in range(len(e))]
    scores = np.zeros(len(e))
    exact = NearDuplicateIndex(DedupConfig(eps=0.01, exact_search_max=100_000)).fit(uids, e, scores, [None] * len(e))
    ivf = NearDuplicateIndex(DedupConfig(eps=0.01, exact_search_max=1000)).fit(uids, e, scores, [None] * len(e))
    planted_pairs = {frozenset((uids[s], uids[6000 + k])) for k, s in enumerate(sources)}
    found = {frozenset((u, r.split(":")[1])) for u, r in exact.items()}
    assert found == planted_pairs  # exact search finds exactly the planted pairs
    assert len(set(ivf.items()) & set(exact.items())) / len(exact) >= 0.95


def test_duplicate_filter_applies_the_fit_per_batch():
    batch = [ImageRecord(uid=u, url="http://x", caption="c") for u in ("a", "b", "c")]
    result = DuplicateFilter({"b": "near_duplicate_of:a"})(batch)
    assert [r.uid for r in result.kept] == ["a", "c"]
    assert result.dropped[0].reason == "near_duplicate_of:a" and result.dropped[0].stage == "dedup"


def test_fit_reads_float32_bytes_embeddings_from_arrow_slices():
    """dedup_embedding travels as float32 bytes; an Arrow slice (as Ray hands over) starts mid-buffer."""
    import pyarrow as pa

    from pipelines.batches import RECORD_SCHEMA
    from pipelines.stage_fits import fit_dedup
    from schemas.config import PipelineConfig

    config = PipelineConfig.model_validate({"dedup": {"embedding": "clip_and_patch_tokens", "eps": 0.01}})
    rng = np.random.default_rng(0)
    e = rng.normal(size=(6, 40)).astype(np.float32)
    e /= np.linalg.norm(e, axis=1, keepdims=True)
    e[4] = e[2]
    table = pa.Table.from_pylist([{"uid": f"u{i}", "dedup_embedding": e[i].tobytes(), "clip_score": 0.5 - i / 100}
                                  for i in range(6)], schema=RECORD_SCHEMA)
    assert fit_dedup(config, table) == {"u4": "near_duplicate_of:u2"}
    assert fit_dedup(config, table.slice(1, 4)) == {"u4": "near_duplicate_of:u2"}
    assert fit_dedup(config, table.slice(3, 3)) == {} and fit_dedup(config, table.slice(0, 0)) == {}


def test_the_clustered_path_finds_the_same_copies_however_few_rows_it_gathers_at_once(monkeypatch):
    """The PCA sample, the projection and the verification gather at most GATHER_BYTES of full embeddings at a
    time (3,328-d embeddings made 32,768-row blocks 436 MB each): blocks of a few rows give the same verdicts."""
    import filters.dedup as dedup

    e, _ = planted(3000, 60)
    uids = [f"u{i:05d}" for i in range(len(e))]
    scores = np.random.default_rng(3).random(len(e))
    config = DedupConfig(eps=0.01, exact_search_max=500)
    whole = NearDuplicateIndex(config).fit(uids, e, scores, [None] * len(e))
    monkeypatch.setattr(dedup, "GATHER_BYTES", 4 * e.shape[1] * 7)  # 7 rows at a time
    assert dedup.gather_rows(e.shape[1]) == 7
    assert NearDuplicateIndex(config).fit(uids, e, scores, [None] * len(e)) == whole and len(whole) >= 55
