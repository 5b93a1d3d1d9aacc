"""Zero-shot object tags from a CLIP image embedding: the vocabulary's prompt embeddings, and the categories
whose cosine with the image passes a threshold (the `objects` stage's fallback where no annotation exists,
and the grounding eval's tagging check)."""
from __future__ import annotations

import numpy as np

from schemas.config import ClipConfig
from schemas.records import ObjectAnnotation


class ClipObjectTagger:
    """Zero-shot tags from an image embedding: categories whose prompt cosine passes a threshold."""

    def __init__(self, clip: ClipConfig, vocabulary: list[str], threshold: float, max_tags: int):
        from filters.clip_scorer import ClipScorer

        self.vocabulary, self.threshold, self.max_tags = vocabulary, threshold, max_tags
        scorer = ClipScorer(clip)
        self.text = scorer.embed_texts([f"a photo of a {name}." for name in vocabulary])  # [V, D], normalized

    def scores(self, embeddings: np.ndarray) -> np.ndarray:
        return embeddings @ self.text.T  # [N, V] cosine

    def tag(self, embedding: list[float]) -> list[ObjectAnnotation]:
        sims = self.scores(np.asarray(embedding, dtype=np.float32)[None])[0]
        best = [i for i in np.argsort(-sims)[: self.max_tags] if sims[i] >= self.threshold]
        return [ObjectAnnotation(category=self.vocabulary[i], box=None, score=float(np.clip(sims[i], 0, 1)),
                                 source="clip_zero_shot") for i in best]
