"""A calibrated keypoint confidence: Platt scaling of the official score.

The official score (mean max-softmax over an answer's digits) ranks answers well but sits in
a narrow band (for the demo model 99% of scores lie between 0.50 and 0.68), so thresholds
users bring from other tools filter nothing. ``fit_platt`` fits ``sigmoid(slope * score +
intercept)`` to whether each keypoint is correct (within PCK@0.1 of the truth) by maximum
likelihood (Newton's method on the two parameters: a convex problem), on a rendered split
the model never trained on; the result is stored with the model
(``locllm_sdk.manifest.ConfidenceCalibration``) and reported on the val split.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
from locllm_sdk.evaluation import match_predictions
from locllm_sdk.manifest import ConfidenceCalibration


def correctness(gt: dict, preds: list[dict], alpha: float = 0.1) -> tuple[np.ndarray, np.ndarray]:
    """(score, correct) for every visible ground-truth joint that has a prediction: correct
    when within ``alpha`` x max(box w, h) of the truth (PCK's definition)."""
    m = match_predictions(gt, preds)
    scores = np.full(m["vis"].shape, np.nan)
    for row, j in enumerate(m["pred_index"]):
        if j >= 0:
            scores[row] = np.asarray(preds[j]["keypoints"], float).reshape(-1, 3)[:, 2]
    dist = np.linalg.norm(m["pred_xy"] - m["gt_xy"], axis=-1)
    valid = (m["vis"] > 0) & np.isfinite(scores)
    correct = dist <= alpha * m["norm"][:, None]
    return scores[valid], correct[valid].astype(np.float64)


def fit_platt(scores: Sequence[float], correct: Sequence[float], iterations: int = 100) -> tuple[float, float]:
    """Maximum-likelihood (slope, intercept) of P(correct) = sigmoid(slope * score + intercept)."""
    s = np.asarray(scores, np.float64)
    y = np.asarray(correct, np.float64)
    if s.size < 2 or y.min() == y.max():
        raise ValueError("calibration needs both correct and wrong keypoints")
    x = np.stack([s, np.ones_like(s)], 1)
    w = np.array([0.0, float(np.log(y.mean() / (1 - y.mean())))])
    for _ in range(iterations):
        p = 1.0 / (1.0 + np.exp(-(x @ w)))
        grad = x.T @ (p - y)
        hess = (x * (p * (1 - p))[:, None]).T @ x + 1e-9 * np.eye(2)
        step = np.linalg.solve(hess, grad)
        w -= step
        if np.abs(step).max() < 1e-10:
            break
    return float(w[0]), float(w[1])


def expected_calibration_error(prob: np.ndarray, correct: np.ndarray, bins: int = 10) -> float:
    """ECE over equal-width probability bins: sum_b |bin| / n * |mean(correct) - mean(prob)|."""
    prob, correct = np.asarray(prob, float), np.asarray(correct, float)
    edges = np.linspace(0, 1, bins + 1)
    idx = np.clip(np.digitize(prob, edges[1:-1]), 0, bins - 1)
    total = 0.0
    for b in range(bins):
        sel = idx == b
        if sel.any():
            total += sel.mean() * abs(correct[sel].mean() - prob[sel].mean())
    return float(total)


def auroc(score: np.ndarray, correct: np.ndarray) -> float:
    """Area under the ROC curve of ``score`` separating correct from wrong (ties count half)."""
    score, correct = np.asarray(score, float), np.asarray(correct, bool)
    pos, neg = score[correct], score[~correct]
    if not len(pos) or not len(neg):
        return float("nan")
    order = np.argsort(np.concatenate([pos, neg]), kind="mergesort")
    ranks = np.empty(len(order))
    allv = np.concatenate([pos, neg])[order]
    # average ranks over ties
    i = 0
    while i < len(allv):
        j = i
        while j + 1 < len(allv) and allv[j + 1] == allv[i]:
            j += 1
        ranks[order[i : j + 1]] = (i + j) / 2 + 1
        i = j + 1
    r_pos = ranks[: len(pos)].sum()
    return float((r_pos - len(pos) * (len(pos) + 1) / 2) / (len(pos) * len(neg)))


def report(prob_or_score: np.ndarray, correct: np.ndarray) -> dict:
    """ECE, Brier score, AUROC and the score's spread (1st / 99th percentile)."""
    p = np.asarray(prob_or_score, float)
    return {
        "keypoints": int(len(p)),
        "accuracy": float(np.mean(correct)),
        "ece": expected_calibration_error(np.clip(p, 0, 1), correct),
        "brier": float(np.mean((np.clip(p, 0, 1) - correct) ** 2)),
        "auroc": auroc(p, correct),
        "p01": float(np.percentile(p, 1)),
        "p99": float(np.percentile(p, 99)),
    }


def calibration_of(scores: np.ndarray, correct: np.ndarray, fitted_on: str) -> ConfidenceCalibration:
    slope, intercept = fit_platt(scores, correct)
    return ConfidenceCalibration(slope, intercept, "PCK@0.1", fitted_on)


def name_of(gt_json: str | Path, images: int) -> str:
    """How the card names the data a calibration was fitted on."""
    return f"{Path(gt_json).name} ({images} images)"
