"""Metrics shared by every path (heads and fine-tunes), so they compare like for like, with the
uncertainty that a finite test set leaves on them.

Every run folder (``<cache-dir>/runs/<run-name>/``) holds a ``metrics.json`` with at least:

=====================  ===============================================================
``kind``               ``"head"`` or ``"finetune"``
``model``              head name (``logreg``, ``svm``...) or ``finetune:<trainable>``
``backbone``           backbone name; ``dataset`` (name), ``dataset_fingerprint``
``split``              the split the scores are on (``test``, ``val`` or ``holdout``)
``accuracy``           fraction in [0, 1]; also ``balanced_accuracy``, ``macro_f1``
``accuracy_ci95``      [lo, hi]: Wilson score interval of the accuracy (95%)
``macro_f1_ci95``      [lo, hi]: percentile bootstrap over the evaluated images (95%, seeded)
``ci``                 how the intervals were made (method, resamples, seed)
``per_class``          {class: {precision, recall, f1, support}}
``confusion_matrix``   list of lists, rows = true class, columns = predicted
``class_names``        list of str
``fit_seconds``        training wall time (for heads: the head only; ``extract_seconds`` apart)
``trainable_params``   number of trained parameters
``inference_images_per_second``  end-to-end prediction speed when measured
=====================  ===============================================================

Beside it, ``predictions.csv`` (:func:`write_predictions`) holds one line per evaluated image
(``path``, ``split``, ``label``, ``predicted``): what :func:`mcnemar_exact` needs to test two
runs on the same images.
"""
from __future__ import annotations

import csv
import math
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from .._util import csv_cell, csv_text, read_json

__all__ = ["classification_metrics", "plot_confusion", "format_metrics", "wilson_interval",
           "bootstrap_macro_f1", "mcnemar_exact", "write_predictions", "read_predictions",
           "PREDICTIONS_FILE", "Z95", "BOOTSTRAP_RESAMPLES"]

Z95 = 1.959963984540054  # two-sided 95% normal quantile
BOOTSTRAP_RESAMPLES = 1000
PREDICTIONS_FILE = "predictions.csv"


def wilson_interval(successes: int, n: int, *, z: float = Z95) -> tuple[float, float]:
    """Wilson score interval of a proportion ``successes / n`` (95% for the default ``z``).

    Unlike the normal approximation it stays inside [0, 1] and is honest at 0 or n successes;
    with no trials it is the whole of [0, 1].

    Examples
    --------
    >>> [round(v, 4) for v in wilson_interval(8, 10)]
    [0.4902, 0.9433]
    """
    if n < 0 or not 0 <= successes <= n:
        raise ValueError(f"need 0 <= successes <= n, got successes={successes}, n={n}")
    if n == 0:
        return 0.0, 1.0
    p = successes / n
    denom = 1.0 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    # At 0 or n successes the bounds are exactly 0 or 1 (rounding would leave 1 - 1e-16).
    lo = 0.0 if successes == 0 else max(0.0, centre - half)
    hi = 1.0 if successes == n else min(1.0, centre + half)
    return lo, hi


def _macro_f1_rows(t: np.ndarray, p: np.ndarray, n_classes: int) -> np.ndarray:
    """Macro-F1 of each row of ``t``/``p`` (one resample per row), over the classes present in
    that row's truth, as :func:`classification_metrics` computes it."""
    total = np.zeros(t.shape[0])
    present = np.zeros(t.shape[0])
    for c in range(n_classes):
        truth, pred = t == c, p == c
        support, predicted = truth.sum(1), pred.sum(1)
        tp = (truth & pred).sum(1)
        denom = support + predicted
        f1 = np.divide(2.0 * tp, denom, out=np.zeros(t.shape[0]), where=denom > 0)
        has = support > 0
        total += np.where(has, f1, 0.0)
        present += has
    return np.divide(total, present, out=np.zeros(t.shape[0]), where=present > 0)


def bootstrap_macro_f1(y_true: Sequence[int], y_pred: Sequence[int], *, n_classes: int | None = None,
                       resamples: int = BOOTSTRAP_RESAMPLES, seed: int = 0,
                       level: float = 0.95) -> tuple[float, float]:
    """Percentile bootstrap interval of the macro-F1, resampling the evaluated images.

    Seeded with its own generator (``numpy.random.default_rng(seed)``): the same predictions
    give the same interval, and no global random state is touched.

    Examples
    --------
    >>> lo, hi = bootstrap_macro_f1([0, 0, 1, 1] * 10, [0, 1, 1, 1] * 10, seed=0)
    >>> lo < 0.73 < hi, (lo, hi) == bootstrap_macro_f1([0, 0, 1, 1] * 10, [0, 1, 1, 1] * 10, seed=0)
    (True, True)
    """
    t = np.asarray(y_true, dtype=np.int64)
    p = np.asarray(y_pred, dtype=np.int64)
    if not len(t):
        return 0.0, 1.0
    k = int(n_classes if n_classes is not None else max(t.max(), p.max()) + 1)
    rng = np.random.default_rng(seed)
    scores = []
    chunk = max(1, 2_000_000 // len(t))  # bounded memory: resamples x images booleans per class
    for start in range(0, resamples, chunk):
        idx = rng.integers(0, len(t), size=(min(chunk, resamples - start), len(t)))
        scores.append(_macro_f1_rows(t[idx], p[idx], k))
    s = np.concatenate(scores)
    alpha = (1.0 - level) / 2.0
    return float(np.quantile(s, alpha)), float(np.quantile(s, 1.0 - alpha))


def mcnemar_exact(a_correct: Sequence[bool], b_correct: Sequence[bool]) -> dict[str, Any]:
    """Exact (binomial) two-sided McNemar test of two classifiers on the same images.

    Only the discordant images count: ``b`` = right for A only, ``c`` = right for B only;
    under "equally accurate" ``b ~ Binomial(b + c, 1/2)``, and
    ``p = min(1, 2 * P(X <= min(b, c)))``.

    Examples
    --------
    >>> r = mcnemar_exact([1, 1, 1, 1, 1, 1, 0, 1], [1, 0, 0, 0, 0, 0, 1, 1])
    >>> r["a_only_correct"], r["b_only_correct"], r["p_value"]
    (5, 1, 0.21875)
    """
    from scipy.stats import binom

    a = np.asarray(a_correct, dtype=bool)
    b = np.asarray(b_correct, dtype=bool)
    if a.shape != b.shape:
        raise ValueError(f"a_correct and b_correct must be aligned, got {a.shape} and {b.shape}")
    a_only, b_only = int((a & ~b).sum()), int((~a & b).sum())
    discordant = a_only + b_only
    p = 1.0 if discordant == 0 else min(1.0, 2.0 * float(binom.cdf(min(a_only, b_only),
                                                                     discordant, 0.5)))
    return {"n": int(a.size), "a_only_correct": a_only, "b_only_correct": b_only,
            "p_value": p, "test": "mcnemar-exact"}


def classification_metrics(y_true: Sequence[int], y_pred: Sequence[int],
                           class_names: Sequence[str], *, seed: int = 0,
                           resamples: int = BOOTSTRAP_RESAMPLES) -> dict[str, Any]:
    """Accuracy, balanced accuracy, macro-F1 (each point estimate with a 95% interval),
    per-class precision/recall/F1 and the confusion matrix.

    Parameters
    ----------
    y_true, y_pred : sequence of int
        Class indices into ``class_names``, one per evaluated image.
    class_names : sequence of str
    seed : int
        Seeds the macro-F1 bootstrap (its own generator).
    resamples : int
        Bootstrap resamples of the macro-F1 interval.

    Examples
    --------
    >>> m = classification_metrics([0, 1, 1], [0, 1, 0], ["a", "b"])
    >>> round(m["accuracy"], 3), m["confusion_matrix"]
    (0.667, [[1, 0], [1, 1]])
    >>> [round(v, 3) for v in m["accuracy_ci95"]]
    [0.208, 0.939]
    """
    from sklearn.metrics import (accuracy_score, balanced_accuracy_score, confusion_matrix,
                                 f1_score, precision_recall_fscore_support)

    y_true = np.asarray(y_true, dtype=np.int64)
    y_pred = np.asarray(y_pred, dtype=np.int64)
    labels = np.arange(len(class_names))
    p, r, f, s = precision_recall_fscore_support(y_true, y_pred, labels=labels, zero_division=0)
    present = labels[np.isin(labels, y_true)]
    correct = int((y_true == y_pred).sum())
    return {
        "accuracy": float(accuracy_score(y_true, y_pred)) if len(y_true) else 0.0,
        "accuracy_ci95": list(wilson_interval(correct, len(y_true))),
        "balanced_accuracy": float(balanced_accuracy_score(y_true, y_pred)) if len(y_true) else 0.0,
        "macro_f1": float(f1_score(y_true, y_pred, labels=present, average="macro", zero_division=0)),
        "macro_f1_ci95": list(bootstrap_macro_f1(y_true, y_pred, n_classes=len(class_names),
                                                 resamples=resamples, seed=seed)),
        "ci": {"level": 0.95, "accuracy": "wilson",
               "macro_f1": f"percentile bootstrap over images ({resamples} resamples, seed {seed})"},
        "n": int(len(y_true)),
        "per_class": {str(c): {"precision": float(p[i]), "recall": float(r[i]), "f1": float(f[i]),
                               "support": int(s[i])} for i, c in enumerate(class_names)},
        "confusion_matrix": confusion_matrix(y_true, y_pred, labels=labels).tolist(),
        "class_names": [str(c) for c in class_names],
    }


def write_predictions(run_dir: str | Path, *, paths: Sequence[str], y_true: Sequence[int],
                      y_pred: Sequence[int], class_names: Sequence[str], split: str,
                      rows: Sequence[int] | None = None,
                      probability: Sequence[float] | None = None) -> Path:
    """Write ``<run_dir>/predictions.csv``: one line per evaluated image (``path``, ``split``,
    ``label``, ``predicted``), so that two runs can be tested on the same images.

    ``rows`` (the images' row numbers in a feature cache) and ``probability`` (of the predicted
    class) add the columns ``row`` and ``probability`` when given.

    ``paths`` must be relative to the dataset root (as in a feature cache's ``/paths`` and in
    ``rows.json``): that is what lines up a head's and a fine-tune's predictions.

    Text cells that a spreadsheet would run as a formula (starting with ``=``, ``+``, ``-``,
    ``@``, a tab or a carriage return; and ``'``, so that reading back is exact) are written
    with a leading ``'`` (:func:`fxtl._util.csv_cell`); :func:`read_predictions` removes it.

    Examples
    --------
    >>> import tempfile
    >>> d = tempfile.mkdtemp()
    >>> _ = write_predictions(d, paths=["a/1.png", "b/2.png"], y_true=[0, 1], y_pred=[0, 0],
    ...                       class_names=["a", "b"], split="test")
    >>> read_predictions(d)
    {'a/1.png': (0, 0), 'b/2.png': (1, 0)}
    """
    import io

    from .._util import atomic_write_bytes

    extra = {name: col for name, col in (("row", rows), ("probability", probability))
             if col is not None}
    if not all(len(c) == len(paths) for c in (y_true, y_pred, *extra.values())):
        raise ValueError(f"paths, y_true, y_pred{''.join(', ' + k for k in extra)} must be "
                         f"aligned, got lengths {[len(paths), len(y_true), len(y_pred)]}")
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(["path", "split", "label", "predicted", *extra])
    for i, (path, t, p) in enumerate(zip(paths, y_true, y_pred)):
        cells = [int(extra["row"][i])] if "row" in extra else []
        if "probability" in extra:
            cells.append(f"{float(extra['probability'][i]):.6f}")
        w.writerow([csv_cell(path), csv_cell(split), csv_cell(class_names[int(t)]),
                    csv_cell(class_names[int(p)]), *cells])
    out = Path(run_dir) / PREDICTIONS_FILE
    atomic_write_bytes(out, buf.getvalue().encode())
    return out


def read_predictions(run_dir: str | Path) -> dict[str, tuple[int, int]] | None:
    """``{path: (true index, predicted index)}`` from a run's ``predictions.csv``.

    Class names are mapped through the run's ``metrics.json`` ``class_names`` when present
    (else by first appearance, which keeps equality of labels). ``None`` when the run has no
    readable predictions file (runs made before fxtl wrote one for fine-tunes).
    """
    run_dir = Path(run_dir)
    path = run_dir / PREDICTIONS_FILE
    if not path.is_file():
        return None
    index: dict[str, int] = {}
    try:
        names = read_json(run_dir / "metrics.json").get("class_names") or []
        index = {str(c): i for i, c in enumerate(names)}
    except (OSError, ValueError, AttributeError):
        pass
    out: dict[str, tuple[int, int]] = {}
    try:
        with open(path, newline="") as fh:
            for row in csv.DictReader(fh):
                t, p = row.get("label"), row.get("predicted")
                if row.get("path") is None or t is None or p is None:
                    return None
                t, p = csv_text(t), csv_text(p)
                for name in (t, p):
                    index.setdefault(name, len(index))
                out[csv_text(row["path"])] = (index[t], index[p])
    except (OSError, csv.Error, UnicodeDecodeError):
        return None
    return out


def plot_confusion(cm: Sequence[Sequence[int]], class_names: Sequence[str], path: Path, *,
                   title: str = "") -> Path:
    """Write the confusion matrix as a PNG (rows: true class, columns: predicted).

    Drawn with Pillow, not matplotlib: a cell grid, its counts and the class names render in
    milliseconds (matplotlib took about a second for 18 classes, once per head).

    Examples
    --------
    >>> import tempfile, pathlib
    >>> out = plot_confusion([[5, 1], [0, 4]], ["ant", "bee"], pathlib.Path(tempfile.mkdtemp()) / "c.png")
    >>> out.read_bytes()[1:4]
    b'PNG'
    """
    from PIL import Image, ImageDraw

    from .._util import atomic_path

    cm = np.asarray(cm, dtype=np.int64)
    k = len(class_names)
    names = [str(n) if len(str(n)) <= 24 else str(n)[:23] + "\u2026" for n in class_names]
    cell = int(max(22, min(110, 640 // max(k, 1))))
    small, big = _font(max(10, min(15, cell // 3))), _font(13)
    label = max((small.getlength(n) for n in names), default=0) + 10
    upright = label <= cell  # column names fit under their cells; else they are turned
    pad, title_h = 34, 30 if title else 8
    left, top = int(label + pad), title_h + 6
    width = max(left + k * cell + 12, int(big.getlength(title)) + 20 if title else 0)
    height = top + k * cell + (22 if upright else int(label)) + pad
    img = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(img)
    if title:
        draw.text((width / 2, 6), title, fill="black", font=big, anchor="ma")
    hi = int(cm.max()) if cm.size else 0
    light, dark = np.array([247, 251, 255]), np.array([8, 48, 107])  # matplotlib's Blues ends
    for i in range(k):
        for j in range(k):
            v = int(cm[i, j])
            f = v / hi if hi else 0.0
            x0, y0 = left + j * cell, top + i * cell
            draw.rectangle([x0, y0, x0 + cell, y0 + cell],
                           fill=tuple(int(c) for c in light + f * (dark - light)), outline=(220, 220, 220))
            if k <= 30:
                draw.text((x0 + cell / 2, y0 + cell / 2), str(v), font=small, anchor="mm",
                          fill="white" if v > hi / 2 else "black")
    for i, n in enumerate(names):  # true classes, right-aligned beside their rows
        draw.text((left - 6, top + i * cell + cell / 2), n, font=small, anchor="rm", fill="black")
    # predicted classes: under their columns, or each on its own strip turned to read upwards
    strip_w = int(label) + 4
    for j, n in enumerate(names):
        if upright:
            draw.text((left + j * cell + cell / 2, top + k * cell + 6), n, font=small, anchor="ma",
                      fill="black")
            continue
        strip = Image.new("RGB", (strip_w, cell), "white")
        ImageDraw.Draw(strip).text((strip_w - 4, cell / 2), n, font=small, anchor="rm", fill="black")
        img.paste(strip.rotate(90, expand=True), (left + j * cell, top + k * cell + 4))
    draw.text((left + k * cell / 2, height - 6), "predicted", font=big, anchor="md", fill="black")
    ylab = Image.new("RGB", (k * cell, 18), "white")
    ImageDraw.Draw(ylab).text((k * cell / 2, 9), "true", font=big, anchor="mm", fill="black")
    img.paste(ylab.rotate(90, expand=True), (4, top))
    with atomic_path(Path(path), suffix=".png") as tmp:
        img.save(tmp, format="PNG")
    return Path(path)


def _font(size: int):
    """Pillow's scalable default font (FreeType), else its fixed bitmap font."""
    from PIL import ImageFont

    try:
        return ImageFont.load_default(size=size)
    except (TypeError, OSError):  # Pillow < 10.1 or no FreeType
        return ImageFont.load_default()


def format_metrics(m: dict[str, Any]) -> str:
    """A short human summary: accuracy and macro-F1 with their 95% intervals, balanced accuracy
    and per-class precision/recall/F1."""
    def ci(key: str) -> str:
        v = m.get(key)
        return f" [{v[0]:.3f}, {v[1]:.3f}]" if isinstance(v, (list, tuple)) and len(v) == 2 else ""

    lines = [f"accuracy {m['accuracy']:.4f}{ci('accuracy_ci95')}  balanced "
             f"{m['balanced_accuracy']:.4f}  macro-F1 {m['macro_f1']:.4f}{ci('macro_f1_ci95')}  "
             f"(n={m.get('n', '?')}; 95% intervals)"]
    for c, v in m.get("per_class", {}).items():
        lines.append(f"  {c:<20} precision {v['precision']:.3f}  recall {v['recall']:.3f}  "
                     f"f1 {v['f1']:.3f}  support {v['support']}")
    return "\n".join(lines)
