"""`ReferenceIndex`: which records are copies of an eval (reference) image; `EvalOverlapFilter` drops them.

A record is a copy when its downloaded bytes hash to a reference's (exact copy), or when its embedding is
within cosine 1 - eps of a reference's: the embedding dedup compares (`filters/dedup.py`), computed for the
references by the same CLIP stage code, searched with the same FAISS code (an exact inner-product index;
on the GPU when faiss-gpu sees one). The reason names the nearest reference: `eval_overlap:<reference id>`.
`match` is the global half; `EvalOverlapFilter` applies its verdicts per batch.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from filters.dedup import BLOCK, flat_index, without_dedup_embedding
from filters.record_filter import RecordFilter
from schemas.records import ImageRecord

REASON = "eval_overlap"


@dataclass
class ReferenceIndex:
    ids: list[str]
    sha256: list[str]
    embeddings: np.ndarray  # [R, D] float32, L2-normalized, one row per id
    eps: float

    def match(self, uids: list[str], hashes: list[str | None], embeddings: np.ndarray) -> dict[str, str]:
        """uid -> `eval_overlap:<reference id>` for every record that copies a reference; embeddings [N, D]."""
        reasons: dict[str, str] = {}
        by_hash = {digest: ref for digest, ref in zip(self.sha256, self.ids)}
        for uid, digest in zip(uids, hashes):
            if digest in by_hash:
                reasons[uid] = f"{REASON}:{by_hash[digest]}"
        if not self.ids or not len(embeddings):
            return reasons
        if embeddings.shape[1] != self.embeddings.shape[1]:
            raise ValueError(f"record embeddings have {embeddings.shape[1]} dimensions and the references' "
                             f"{self.embeddings.shape[1]}: they must come from the same CLIP stage settings")
        index = flat_index(np.ascontiguousarray(self.embeddings, dtype=np.float32))
        for start in range(0, len(embeddings), BLOCK):
            block = np.ascontiguousarray(embeddings[start:start + BLOCK], dtype=np.float32)
            similarity, nearest = index.search(block, 1)  # [B, 1] each
            for offset in np.flatnonzero(similarity[:, 0] >= 1.0 - self.eps).tolist():
                reasons.setdefault(uids[start + offset], f"{REASON}:{self.ids[int(nearest[offset, 0])]}")
        return reasons


class EvalOverlapFilter(RecordFilter):
    """The per-batch half: drop the uids `ReferenceIndex.match` named, with its reason. With no dedup after it,
    the dedup embedding computed for the guard is cleared from the records it keeps (dedup clears it otherwise)."""

    name = "eval_guard"
    columns = ("dedup_embedding",)

    def __init__(self, reasons: dict[str, str], clear_embedding: bool = False):
        self.reasons, self.clear_embedding = reasons, clear_embedding

    def check(self, record: ImageRecord) -> tuple[str | None, ImageRecord]:
        return self.reasons.get(record.uid), without_dedup_embedding(record) if self.clear_embedding else record
