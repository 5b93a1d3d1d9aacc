"""`NearDuplicateIndex`: exact duplicates by content hash, near-duplicates by cosine >= 1 - eps.

Small inputs: exact FAISS range search. Large inputs: the SemDeDup scheme (NeMo Curator) — k-means the
embeddings, then compare pairs only inside each cluster — in a form that does 1M images on 2 CPU cores:
- Clustering and pair search run in a 32-d PCA projection. A projection only shrinks distances, so every
  pair within the threshold (squared L2 2 * eps between unit vectors) is still within it there; the
  candidates are then checked against the full embeddings, so only true near-duplicates come out.
- A point close to the bisector between its centroid and one of the next two is also compared with that
  cluster: a pair split by a bisector has one end within half the pair's distance of it. This recovers
  the pairs plain SemDeDup loses at cluster borders.
FAISS GPU k-means is used when faiss-gpu sees a GPU. The survivor of each group is deterministic:
highest CLIP score, then smallest uid; every other copy is dropped naming the uid it duplicates.
`fit` is the global half; `DuplicateFilter` applies its verdicts per batch.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from schemas.config import DedupConfig
from filters.record_filter import RecordFilter
from schemas.records import ImageRecord

# Candidate search only (verified in full): on 512-d CLIP-like data 32 dims let through ~4 false
# candidates per true pair, at a quarter of the flops of 128.
PROJECTED_DIM = 32
# Next-nearest clusters a border point is also compared with: 1 loses ~0.6% of pairs at 1M, 2 ~0.1%.
BORDER_PROBES = 2
BLOCK = 32_768  # rows per assignment block: a [BLOCK, k] float32 score matrix
# Bytes of full embeddings gathered at once (PCA sample, projection and verification blocks): bounded in bytes, not
# rows, since D runs from 512 to 3,328 (clip_and_patch_tokens); 32,768 rows of those were 436 MB per gather.
GATHER_BYTES = 64 * 2**20


def gather_rows(dim: int) -> int:
    """Rows of `dim` float32 values in GATHER_BYTES."""
    return max(1, GATHER_BYTES // (4 * dim))


def load_faiss():
    try:
        import faiss
    except ImportError as err:  # pragma: no cover - faiss-cpu is a dependency
        raise ImportError("near-duplicate removal needs FAISS: pip install faiss-cpu (or faiss-gpu)") from err
    return faiss


def faiss_uses_gpu(faiss) -> bool:
    return hasattr(faiss, "StandardGpuResources") and faiss.get_num_gpus() > 0


def flat_index(x: np.ndarray):
    """An exact inner-product FAISS index holding x [N, D] float32; on the GPU when faiss-gpu sees one."""
    faiss = load_faiss()
    index = faiss.IndexFlatIP(x.shape[1])
    if faiss_uses_gpu(faiss):
        index = faiss.index_cpu_to_gpu(faiss.StandardGpuResources(), 0, index)
    index.add(x)
    return index


@dataclass
class NearDuplicateIndex:
    config: DedupConfig

    def fit(self, uids: list[str], embeddings: np.ndarray, scores: np.ndarray, hashes: list[str | None]) -> dict[str, str]:
        """uid -> reason (`exact_duplicate_of:<uid>` / `near_duplicate_of:<uid>`) for every copy to drop."""
        order = _rank(uids, scores)  # survivors first
        reasons: dict[str, str] = {}
        first_with_hash: dict[str, int] = {}
        for i in order.tolist():
            if hashes[i] is None:
                continue
            if hashes[i] in first_with_hash:
                reasons[uids[i]] = f"exact_duplicate_of:{uids[first_with_hash[hashes[i]]]}"
            else:
                first_with_hash[hashes[i]] = i
        remaining = order[[uids[i] not in reasons for i in order.tolist()]] if reasons else order
        if len(remaining) < 2:
            return reasons
        pairs = self.similar_pairs(embeddings, remaining)  # positions in `remaining`, i < j means i ranks higher
        removed = np.zeros(len(remaining), bool)
        for i, j in pairs:  # sorted by i: a survivor removes the lower-ranked copies it has not lost itself
            if not removed[i] and not removed[j]:
                removed[j] = True
                reasons[uids[remaining[j]]] = f"near_duplicate_of:{uids[remaining[i]]}"
        return reasons

    def similar_pairs(self, embeddings: np.ndarray, rows: np.ndarray | None = None) -> list[tuple[int, int]]:
        """All (i, j), i < j, with cosine(x_i, x_j) >= 1 - eps in x = embeddings[rows], sorted; rows in rank
        order. Large inputs never copy x whole (2 GB at 1M x 512): each step gathers the rows it needs."""
        rows = np.arange(len(embeddings)) if rows is None else np.asarray(rows, dtype=np.int64)
        if len(rows) <= self.config.exact_search_max:
            return self._exact_pairs(np.ascontiguousarray(embeddings[rows], dtype=np.float32))
        return self._clustered_pairs(embeddings, rows)

    def _exact_pairs(self, x: np.ndarray) -> list[tuple[int, int]]:
        index = flat_index(x)
        lims, _, neighbours = index.range_search(x, 1.0 - self.config.eps)
        pairs = {(i, int(j)) for i in range(len(x)) for j in neighbours[lims[i]:lims[i + 1]] if j > i}
        return sorted(pairs)

    def _clustered_pairs(self, embeddings: np.ndarray, rows: np.ndarray) -> list[tuple[int, int]]:
        faiss = load_faiss()
        radius = 2.0 * self.config.eps * 1.01  # squared L2 at cosine 1 - eps; 1% slack for float32 (verified below)
        z = _project(faiss, embeddings, rows, min(PROJECTED_DIM, embeddings.shape[1]))  # [n, d_z]
        k = self.config.num_clusters or max(1, int(math.sqrt(len(rows))))
        kmeans = faiss.Kmeans(z.shape[1], k, niter=10, seed=1234, gpu=faiss_uses_gpu(faiss),
                              max_points_per_centroid=64)  # fit on a sample: enough to place centroids
        kmeans.train(z)
        nearest, border, border_cluster = _assign(z, kmeans.centroids, half_width=math.sqrt(radius) / 2)
        keys = _candidates(z, nearest, border, border_cluster, k, radius)  # i * n + j, i < j, sorted
        i, j = np.divmod(keys, len(rows))
        close = np.zeros(len(keys), bool)
        step = gather_rows(embeddings.shape[1]) // 2  # a and b
        for s in range(0, len(keys), step):
            a = np.asarray(embeddings[rows[i[s:s + step]]], dtype=np.float32)
            b = np.asarray(embeddings[rows[j[s:s + step]]], dtype=np.float32)
            close[s:s + step] = np.einsum("nd,nd->n", a, b) >= 1.0 - self.config.eps
        return list(zip(i[close].tolist(), j[close].tolist()))


def _project(faiss, embeddings: np.ndarray, rows: np.ndarray, dim: int) -> np.ndarray:
    """[n, dim] PCA projection of embeddings[rows], computed block by block. Any orthonormal projection
    is safe; PCA only keeps the candidates few, and a sample of 5k-20k rows is enough to find its top directions."""
    def block(positions: np.ndarray) -> np.ndarray:
        return np.ascontiguousarray(embeddings[rows[positions]], dtype=np.float32)

    if dim == embeddings.shape[1]:
        return block(np.arange(len(rows)))
    pca = faiss.PCAMatrix(embeddings.shape[1], dim)
    step = gather_rows(embeddings.shape[1])
    # At least D rows (FAISS then trains on the D x D covariance), at most 20k, in about GATHER_BYTES.
    size = min(len(rows), 20_000, max(step, embeddings.shape[1]))
    sample = np.random.default_rng(1234).choice(len(rows), size, replace=False)
    pca.train(block(np.sort(sample)))
    z = np.empty((len(rows), dim), np.float32)
    for s in range(0, len(rows), step):
        z[s:s + step] = pca.apply(block(np.arange(s, min(s + step, len(rows)))))
    return z


def _assign(z: np.ndarray, centroids: np.ndarray, half_width: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Nearest centroid of each point, and (point, cluster) border entries: clusters among the next
    BORDER_PROBES whose bisector with the nearest one is within `half_width` of the point."""
    half_sq = -0.5 * np.einsum("kd,kd->k", centroids, centroids)
    gaps = np.sqrt(np.maximum(0.0, -2.0 * (half_sq[:, None] + half_sq[None, :]) - 2.0 * centroids @ centroids.T))
    nearest = np.empty(len(z), np.int64)
    border, border_cluster = [np.empty(0, np.int64)], [np.empty(0, np.int64)]
    for s in range(0, len(z), BLOCK):
        scores = z[s:s + BLOCK] @ centroids.T  # [B, k]
        scores += half_sq  # larger is nearer: |z - c|^2 = |z|^2 - 2 * score
        row = np.arange(len(scores))
        best = scores.argmax(1)
        top = scores[row, best]
        nearest[s:s + len(scores)] = best
        scores[row, best] = -np.inf
        for _ in range(min(BORDER_PROBES, len(centroids) - 1)):
            other = scores.argmax(1)
            # distance from the point to the bisector of (best, other) is (top - score) / |c_best - c_other|
            hit = np.flatnonzero(top - scores[row, other] <= half_width * gaps[best, other])
            border.append(s + hit)
            border_cluster.append(other[hit])
            scores[row, other] = -np.inf
    return nearest, np.concatenate(border), np.concatenate(border_cluster)


def _candidates(z: np.ndarray, nearest: np.ndarray, border: np.ndarray, border_cluster: np.ndarray,
                k: int, radius: float) -> np.ndarray:
    """Sorted unique keys i * n + j (i < j) of pairs within squared distance `radius` of each other,
    comparing each cluster's members with themselves and with the border points assigned to it."""
    n = len(z)
    half_sq = -0.5 * np.einsum("nd,nd->n", z, z)[:, None]
    ones = np.ones((n, 1), np.float32)
    query = np.hstack([z, half_sq, ones])  # query . member = z_q . z_m - |z_q|^2/2 - |z_m|^2/2 = -|z_q - z_m|^2/2
    member = np.hstack([z, ones, half_sq])
    threshold = -0.5 * radius
    members = np.argsort(nearest, kind="stable")
    bounds = np.searchsorted(nearest[members], np.arange(k + 1))
    extra = np.argsort(border_cluster, kind="stable")
    extra_bounds = np.searchsorted(border_cluster[extra], np.arange(k + 1))
    found = [np.empty(0, np.int64)]
    for c in range(k):
        own = members[bounds[c]:bounds[c + 1]]
        queries = np.concatenate([own, border[extra[extra_bounds[c]:extra_bounds[c + 1]]]])
        if len(own) == 0 or len(queries) < 2:
            continue
        sims = query[queries] @ member[own].T  # [n_own + n_border, n_own]
        np.fill_diagonal(sims[:len(own)], -np.inf)  # a member is not its own duplicate
        hit_rows = np.flatnonzero(sims.max(1) >= threshold)  # rare: one cheap pass before nonzero
        a, b = np.nonzero(sims[hit_rows] >= threshold)
        q, m = queries[hit_rows[a]], own[b]
        found.append(np.minimum(q, m) * n + np.maximum(q, m))
    return np.unique(np.concatenate(found))


def _rank(uids: list[str], scores) -> np.ndarray:
    """Row indices best first: highest CLIP score (missing or NaN last), then smallest uid."""
    key = np.asarray(scores, dtype=np.float64)
    key = np.where(np.isnan(key), -np.inf, key)
    return np.lexsort((np.asarray(uids), -key))


class DuplicateFilter(RecordFilter):
    """The per-batch half: drop the uids the fit named, with its reason."""

    name = "dedup"
    columns = ("dedup_embedding",)

    def __init__(self, reasons: dict[str, str]):
        self.reasons = reasons

    def check(self, record: ImageRecord) -> tuple[str | None, ImageRecord]:
        return self.reasons.get(record.uid), without_dedup_embedding(record)


def without_dedup_embedding(record: ImageRecord) -> ImageRecord:
    """The record without the embedding only dedup (and the eval guard) compare: kept records do not carry it on."""
    return record if record.dedup_embedding is None else record.model_copy(update={"dedup_embedding": None})
