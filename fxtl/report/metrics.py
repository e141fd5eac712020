"""Metrics and plots shared by every path (heads and fine-tunes), so they compare like for like.

Every run folder (``<cache-dir>/runs/<run-name>/``) holds a ``metrics.json`` with at least:

================  ===================================================================
``kind``          ``"head"`` or ``"finetune"``
``model``         head name (``logreg``, ``svm``...) or ``finetune:<trainable>``
``backbone``      backbone name; ``dataset`` (name), ``dataset_fingerprint``
``split``         the split the scores are on (``test``, ``val`` or ``holdout``)
``accuracy``      fraction in [0, 1]; also ``balanced_accuracy``, ``macro_f1``
``per_class``     {class: {precision, recall, f1, support}}
``confusion_matrix``  list of lists, rows = true class, columns = predicted
``class_names``   list of str
``fit_seconds``   training wall time (for heads: the head only; ``extract_seconds`` apart)
``trainable_params``  number of trained parameters
``inference_images_per_second``  end-to-end prediction speed when measured
================  ===================================================================
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

import numpy as np

__all__ = ["classification_metrics", "plot_confusion", "format_metrics"]


def classification_metrics(y_true: Sequence[int], y_pred: Sequence[int],
                           class_names: Sequence[str]) -> dict[str, Any]:
    """Accuracy, balanced accuracy, macro-F1, per-class precision/recall/F1 and the confusion matrix.

    Examples
    --------
    >>> m = classification_metrics([0, 1, 1], [0, 1, 0], ["a", "b"])
    >>> round(m["accuracy"], 3), m["confusion_matrix"]
    (0.667, [[1, 0], [1, 1]])
    """
    from sklearn.metrics import (accuracy_score, balanced_accuracy_score, confusion_matrix,
                                 f1_score, precision_recall_fscore_support)

    y_true = np.asarray(y_true, dtype=np.int64)
    y_pred = np.asarray(y_pred, dtype=np.int64)
    labels = np.arange(len(class_names))
    p, r, f, s = precision_recall_fscore_support(y_true, y_pred, labels=labels, zero_division=0)
    present = labels[np.isin(labels, y_true)]
    return {
        "accuracy": float(accuracy_score(y_true, y_pred)),
        "balanced_accuracy": float(balanced_accuracy_score(y_true, y_pred)) if len(y_true) else 0.0,
        "macro_f1": float(f1_score(y_true, y_pred, labels=present, average="macro", zero_division=0)),
        "n": int(len(y_true)),
        "per_class": {str(c): {"precision": float(p[i]), "recall": float(r[i]), "f1": float(f[i]),
                               "support": int(s[i])} for i, c in enumerate(class_names)},
        "confusion_matrix": confusion_matrix(y_true, y_pred, labels=labels).tolist(),
        "class_names": [str(c) for c in class_names],
    }


def plot_confusion(cm: Sequence[Sequence[int]], class_names: Sequence[str], path: Path, *,
                   title: str = "") -> Path:
    """Write the confusion matrix as a PNG (rows: true class, columns: predicted)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from .._util import atomic_path

    cm = np.asarray(cm)
    k = len(class_names)
    size = max(3.5, min(0.5 * k + 2, 14))
    fig, ax = plt.subplots(figsize=(size, size))
    ax.imshow(cm, cmap="Blues")
    ax.set_xticks(range(k), class_names, rotation=45 if k > 4 else 0, ha="right" if k > 4 else "center")
    ax.set_yticks(range(k), class_names)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    if title:
        ax.set_title(title)
    if k <= 30:
        hi = cm.max() if cm.size else 0
        for i in range(k):
            for j in range(k):
                ax.text(j, i, str(cm[i, j]), ha="center", va="center",
                        color="white" if cm[i, j] > hi / 2 else "black", fontsize=8)
    fig.tight_layout()
    with atomic_path(Path(path), suffix=".png") as tmp:
        fig.savefig(tmp, dpi=100, format="png")
    plt.close(fig)
    return Path(path)


def format_metrics(m: dict[str, Any]) -> str:
    """A short human summary: accuracy, balanced accuracy, macro-F1 and per-class recall."""
    lines = [f"accuracy {m['accuracy']:.4f}  balanced {m['balanced_accuracy']:.4f}  "
             f"macro-F1 {m['macro_f1']:.4f}  (n={m.get('n', '?')})"]
    for c, v in m.get("per_class", {}).items():
        lines.append(f"  {c:<20} precision {v['precision']:.3f}  recall {v['recall']:.3f}  "
                     f"f1 {v['f1']:.3f}  support {v['support']}")
    return "\n".join(lines)
