"""Turning a version's output tensor into an answer, and comparing primary and shadow answers."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from services.shared.errors import FailedPrecondition


@dataclass(frozen=True)
class ClassScore:
    index: int
    label: str
    score: float


def as_matrix(array: np.ndarray, what: str) -> np.ndarray:
    """[batch, n] float32; an output of another rank is a registration mistake, not the caller's."""
    if array.ndim != 2:
        raise FailedPrecondition(f"{what}: expected a [batch, n] output, got shape {list(array.shape)}")
    return array.astype(np.float32, copy=False)


def l2_normalise(vectors: np.ndarray) -> np.ndarray:
    norms = np.linalg.norm(vectors, axis=1, keepdims=True)
    return vectors / np.maximum(norms, 1e-12)


def softmax(logits: np.ndarray) -> np.ndarray:
    shifted = logits - logits.max(axis=1, keepdims=True)
    exp = np.exp(shifted)
    return exp / exp.sum(axis=1, keepdims=True)


def top_k(probabilities: np.ndarray, k: int, labels: tuple[str, ...]) -> list[list[ClassScore]]:
    k = max(1, min(k, probabilities.shape[1]))
    # argpartition then sort just the k winners: O(n) per row instead of a full sort of 1000 classes.
    best = np.argpartition(-probabilities, k - 1, axis=1)[:, :k]
    results = []
    for row, candidates in zip(probabilities, best):
        ordered = candidates[np.argsort(-row[candidates], kind="stable")]
        results.append([ClassScore(int(i), labels[i] if i < len(labels) else "", float(row[i])) for i in ordered])
    return results


def cosine_sum(a: np.ndarray, b: np.ndarray) -> float:
    """Sum over items of the cosine similarity between matching rows."""
    if a.shape != b.shape:
        return 0.0
    return float(np.sum(l2_normalise(a) * l2_normalise(b)))


def cosines(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Per-item cosine similarity between matching rows (empty when the shapes differ)."""
    if a.shape != b.shape:
        return np.zeros(0, np.float32)
    return np.sum(l2_normalise(a) * l2_normalise(b), axis=1)


def top5_overlap_sum(a: np.ndarray, b: np.ndarray) -> float:
    """Sum over items of |top-5(a) ∩ top-5(b)| / 5 (0 when the rows are narrower than 5 or shapes differ)."""
    if a.shape != b.shape or a.ndim != 2 or a.shape[1] < 5:
        return 0.0
    ta, tb = np.argpartition(-a, 4, axis=1)[:, :5], np.argpartition(-b, 4, axis=1)[:, :5]
    return float(sum(len(set(x) & set(y)) for x, y in zip(ta.tolist(), tb.tolist())) / 5)


def top1_agreed(a: np.ndarray, b: np.ndarray) -> int:
    if a.shape != b.shape:
        return 0
    return int(np.sum(np.argmax(a, axis=1) == np.argmax(b, axis=1)))
