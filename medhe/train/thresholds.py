"""The decision threshold: chosen on the early-stopping split by a rule fixed in advance, then folded
into the output layer so that every decision (plaintext, encrypted, clinic) is the argmax.

Why fold instead of carrying a threshold: the encrypted path, the client spec, the clinic page and
throughput mode all decide by argmax of the decrypted logits; shifting the output bias by the cut
moves that argmax to the chosen threshold, with nothing new on the wire, and the shown
probability stays consistent with the shown diagnosis (above 0.5 when the positive class is
named; an exact tie, probability 0.5, names the first class). The card records the cut, so the model's probability before the fold can be recovered.
"""

from __future__ import annotations

import numpy as np

from medhe.errors import ConfigError

THRESHOLD_RULES = ("youden", "argmax")
# Resamples of the held-out split whose Youden cuts are medianed: one cut from a few hundred images
# moves with single images (121 normals in PneumoniaMNIST's stop split: one is 0.8% specificity).
BOOTSTRAP_RESAMPLES = 200


def youden_cut(labels, scores, prefer: float = 0.0) -> float:
    """The cut on `scores` (class 1 at or above it) that maximises Youden's J = sensitivity +
    specificity - 1, i.e. minimises balanced error whatever the class mix.

    Candidate cuts lie midway between neighbouring scores (and one beyond each end), so a cut never
    sits on a held-out value; among equally good candidates, the one nearest `prefer` wins (0 on a
    logit difference is the untouched argmax rule), so a flat optimum moves the rule little. The
    cut is a midpoint even when `prefer` itself would do as well.
    """
    from medhe.train.metrics import _as_binary_labels  # sklearn: not at CLI start-up

    labels = _as_binary_labels(labels)
    scores = np.asarray(scores, dtype=np.float64).reshape(-1)
    if scores.shape[0] != labels.shape[0] or not np.isfinite(scores).all():
        raise ConfigError(f"need {labels.shape[0]} finite scores, got {scores.shape[0]}")
    if len(np.unique(labels)) != 2:
        raise ConfigError("choosing a decision threshold needs both classes in the held-out labels")
    values = np.unique(scores)  # ascending; cut between values[i - 1] and values[i] admits values[i:]
    cuts = np.concatenate([[values[0] - 1.0], (values[:-1] + values[1:]) / 2.0, [values[-1] + 1.0]])
    positives, negatives = scores[labels == 1], scores[labels == 0]
    tpr = (positives[None, :] >= cuts[:, None]).mean(axis=1)
    fpr = (negatives[None, :] >= cuts[:, None]).mean(axis=1)
    j = tpr - fpr
    best = cuts[np.isclose(j, j.max(), rtol=0.0, atol=1e-12)]
    return float(best[np.argmin(np.abs(best - prefer))])


def fold_decision_cut(model, cut: float) -> None:
    """Shift the last Linear layer's two biases by +cut/2 (class 0) and -cut/2 (class 1), so that
    logit_1' - logit_0' = logit_1 - logit_0 - cut for the same input: the argmax names class 1
    when the difference exceeds the cut."""
    import torch
    from torch import nn

    last = model.layers[-1]
    if not isinstance(last, nn.Linear) or last.out_features != 2 or last.bias is None:
        raise ConfigError("a decision threshold can be folded only into a 2-class output layer with a bias")
    with torch.no_grad():
        last.bias[0] += cut / 2.0
        last.bias[1] -= cut / 2.0


def bootstrap_youden_cut(labels, scores, resamples: int = BOOTSTRAP_RESAMPLES, seed: int = 0,
                         prefer: float = 0.0) -> float:
    """Median of youden_cut over stratified bootstrap resamples of (labels, scores): the same rule
    with the variance of a single small sample taken out."""
    labels = np.asarray(labels).reshape(-1)
    scores = np.asarray(scores, dtype=np.float64).reshape(-1)
    youden_cut(labels, scores, prefer)  # validates once, with its messages
    rng = np.random.default_rng(seed)
    by_class = [np.flatnonzero(labels == c) for c in (0, 1)]
    cuts = []
    for _ in range(resamples):
        pick = np.concatenate([rng.choice(members, members.size, replace=True) for members in by_class])
        cuts.append(youden_cut(labels[pick], scores[pick], prefer))
    return float(np.median(cuts))
