"""Images in memory -> embeddings, from Python: :func:`embed`, :class:`Embedder` and the
scikit-learn transformer :class:`ImageEmbedder`.

The same preprocessing, inference graph (BatchNorm folded), precision, batch size and batch loop
as ``fxtl extract``, so a row computed here equals the cache's row for the same file. Images may
be paths, folders, PIL images or uint8 arrays; in-memory pixels are converted to RGB exactly as
decoded files are (grayscale, palette, RGBA composited on white, 16-bit).

The network is built once per :class:`Embedder` and reused by every call on it: keep the object
to embed again without rebuilding (``fxtl.embed`` builds one per call unless given one).

Examples
--------
>>> import fxtl                                                      # doctest: +SKIP
>>> emb = fxtl.Embedder("lite0")                                     # doctest: +SKIP
>>> emb(["bee.jpg", "ant.jpg"]).shape                                # doctest: +SKIP
(2, 1280)
>>> from sklearn.pipeline import make_pipeline                       # doctest: +SKIP
>>> from sklearn.linear_model import LogisticRegression              # doctest: +SKIP
>>> clf = make_pipeline(fxtl.ImageEmbedder(), LogisticRegression())  # doctest: +SKIP
>>> clf.fit(paths, labels).predict(["bee.jpg"])                      # doctest: +SKIP
array(['bees'], dtype='<U4')
"""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterable, Sequence

import numpy as np
from PIL import Image
from sklearn.base import BaseEstimator, TransformerMixin

from ._util import progress_bar
from .backbones.registry import DEFAULT_BACKBONE, load_backbone
from .data.discovery import walk_images
from .data.images import EvalTransform, ImageDecodeError, Preprocessing, to_rgb
from .errors import DataError, ParameterError
from .features.embedding import default_batch_size, default_workers, make_loader
from .runtime import autocast, resolve_device, resolve_precision

if TYPE_CHECKING:
    from .backbones.registry import Backbone

__all__ = ["embed", "Embedder", "ImageEmbedder", "image_items", "run_batches", "ON_ERROR"]

# What a call does with an image that cannot be decoded: refuse the call, or give it a NaN row.
ON_ERROR = ("raise", "nan")


# ----------------------------------------------------------------------------- inputs
def image_items(images: Any, *, param: str = "images") -> tuple[list[str | Image.Image], list[str]]:
    """``images`` as a flat list of items (file paths or RGB PIL images) and a name for each.

    Accepts a path (file or folder, walked recursively in sorted order), a sequence of paths,
    PIL images or uint8 arrays (``H x W x 3``, ``H x W`` grayscale, ``H x W x 4`` RGBA), or a
    4-D uint8 array (a batch, ``N x H x W x C``). Names are the paths, or ``images[i]``.

    Raises
    ------
    ParameterError
        A missing path, a folder without images, or an array that is not uint8 pixels, naming
        ``param`` and the position of the item.
    """
    if isinstance(images, (str, os.PathLike, Image.Image)):
        images = [images]
    elif isinstance(images, np.ndarray):
        if images.dtype.kind in "UO" and images.ndim == 1:  # paths (scikit-learn may pass these)
            images = images.tolist()
        elif images.ndim == 4:
            images = list(images)
        elif images.ndim in (2, 3):
            images = [images]
        else:
            raise ParameterError(param, f"{param} is a {images.ndim}-d array; pass one image "
                                 "(H x W x 3 uint8) or a batch (N x H x W x 3)")
    elif not isinstance(images, Iterable):
        raise ParameterError(param, f"{param} must be a path, a folder, a PIL image, a uint8 array "
                             f"or a list of them, not {type(images).__name__}")
    items: list[str | Image.Image] = []
    names: list[str] = []
    for i, obj in enumerate(images):
        if isinstance(obj, (str, os.PathLike)):
            p = Path(obj)
            if p.is_dir():
                found = walk_images(p)
                if not found:
                    raise ParameterError(param, f"{p}: folder holds no image files; pass a folder "
                                         "of images or image files")
                items.extend(str(f) for f in found)
                names.extend(str(f) for f in found)
            elif p.is_file():
                items.append(str(p))
                names.append(str(p))
            else:
                raise ParameterError(param, f"{p}: no such file or folder; pass existing image "
                                     f"files or folders in {param}")
        elif isinstance(obj, Image.Image):
            items.append(to_rgb(obj))
            names.append(f"{param}[{i}]")
        elif isinstance(obj, np.ndarray):
            items.append(_array_image(obj, f"{param}[{i}]", param))
            names.append(f"{param}[{i}]")
        else:
            raise ParameterError(param, f"{param}[{i}] is a {type(obj).__name__}; pass paths, PIL "
                                 "images or uint8 arrays (H x W x 3)")
    return items, names


def _array_image(a: np.ndarray, where: str, param: str) -> Image.Image:
    """uint8 pixels -> RGB PIL image (grayscale and RGBA converted as their files would be)."""
    if a.dtype != np.uint8:
        hint = (" (scale 0..1 floats with (x * 255).round().astype(np.uint8))"
                if a.dtype.kind == "f" else "")
        raise ParameterError(param, f"{where} is a {a.dtype} array; pass uint8 pixels 0..255{hint}")
    if a.ndim == 3 and a.shape[2] == 1:
        a = a[:, :, 0]
    if a.ndim == 2:
        return to_rgb(Image.fromarray(np.ascontiguousarray(a), "L"))
    if a.ndim == 3 and a.shape[2] in (3, 4):
        mode = "RGB" if a.shape[2] == 3 else "RGBA"
        return to_rgb(Image.fromarray(np.ascontiguousarray(a), mode))
    raise ParameterError(param, f"{where} has shape {a.shape}; an image is H x W x 3 (RGB), "
                         "H x W x 4 (RGBA) or H x W (grayscale)")


class ItemDataset:
    """Map-style dataset over items: ``i -> (uint8 image tensor, i, error or "")``, like
    :class:`~fxtl.data.discovery.ImageDataset` (the same decoder and transform for paths)."""

    def __init__(self, items: Sequence[str | Image.Image], pre: Preprocessing):
        self.items, self.pre = list(items), pre
        self.transform = EvalTransform(pre)

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int):
        import torch

        item = self.items[i]
        try:
            x = self.transform.load(item) if isinstance(item, str) else self.transform(item)
            return x, i, ""
        except ImageDecodeError as exc:
            c = self.pre.crop
            return torch.zeros(3, c, c, dtype=torch.uint8), i, str(exc)


def run_batches(items: Sequence[str | Image.Image], pre: Preprocessing, fn: Callable[[Any], np.ndarray],
                *, width: int, device: str, batch_size: int, workers: int, names: Sequence[str],
                on_error: str = "raise", progress: bool = False, desc: str = "embed",
                context: Callable[[], Any] | None = None, dtype: Any = np.float32) -> np.ndarray:
    """``fn`` over batches of decoded uint8 images ``[B, 3, H, W]``: one row of ``width`` per item.

    The batch loop of ``extract`` (:func:`fxtl.features.embedding.embed_paths`): the same loader
    (a decode thread pool on CPU, workers on CUDA), batch boundaries and ``context`` (inference
    mode and autocast). An undecodable image raises :class:`DataError` naming it, or with
    ``on_error="nan"`` gets a row of NaN.
    """
    import torch

    _check_on_error(on_error)
    out = np.empty((len(items), width), dtype=dtype)
    if not items:
        return out
    n_batches = (len(items) + batch_size - 1) // batch_size
    loader = make_loader(ItemDataset(items, pre), batch_size=batch_size,
                         workers=min(workers, n_batches), device=device)
    bar = progress_bar(len(items), desc, progress)
    try:
        with (context() if context else torch.inference_mode()):
            for x, idx, errs in loader:
                for i, e in zip(idx.tolist(), errs):
                    if e and on_error == "raise":
                        raise DataError(f"{names[i]}: {e}; remove it, or pass on_error='nan' to "
                                        "get a row of NaN for it")
                rows = idx.numpy()
                out[rows] = fn(x)
                bad = [i for i, e in zip(rows.tolist(), errs) if e]
                out[bad] = np.nan
                bar.update(len(rows))
    finally:
        bar.close()
    return out


def _check_on_error(on_error: str) -> None:
    if on_error not in ON_ERROR:
        raise ParameterError("on_error", f"on_error must be one of {', '.join(ON_ERROR)}, "
                             f"got {on_error!r}")


def _check_count(name: str, value: int | None, least: int) -> None:
    if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < least):
        raise ParameterError(name, f"{name} must be an integer >= {least}, got {value!r}")


# ----------------------------------------------------------------------------- Embedder
class Embedder:
    """A frozen backbone, built once, that turns images into feature rows.

    Parameters
    ----------
    backbone : str
        A backbone name (``lite0``, a torchvision name, ``timm:<name>``, ``ARCH=PATH``) or a
        fine-tuned run folder, as for ``fxtl extract``.
    layer : str, optional
        Module whose globally pooled output is the feature (default: the penultimate features).
    batch_size : int, optional
        Images per forward pass (default: ``extract``'s for the device and precision).
    device : {"auto", "cpu", "cuda"}
    precision : {"auto", "fp32", "bf16", "fp16"}
    workers : int, optional
        Decoding processes (default: ``extract``'s; none on CPU, where a thread pool decodes).
    trust : bool
        Load a fine-tuned run whose manifest records no weights hash (runs you made yourself).

    Attributes
    ----------
    network : Backbone -- the built network (on ``device``, inference graph)
    feature_dim : int
    preprocessing : Preprocessing
    provenance : dict -- backbone, weights_sha256, preprocessing, layer, graph, precision
    images_computed : int -- images run through the network by this object so far

    Examples
    --------
    >>> emb = Embedder("lite0", precision="fp32")   # doctest: +SKIP
    >>> emb("data/bees").shape                      # doctest: +SKIP
    (121, 1280)
    """

    def __init__(self, backbone: str = DEFAULT_BACKBONE, *, layer: str | None = None,
                 batch_size: int | None = None, device: str = "auto", precision: str = "auto",
                 workers: int | None = None, trust: bool = False):
        if not isinstance(backbone, (str, os.PathLike)):
            raise ParameterError("backbone", f"backbone must be a name or a run folder, not "
                                 f"{type(backbone).__name__}")
        _check_count("batch_size", batch_size, 1)
        _check_count("workers", workers, 0)
        dev = resolve_device(device)
        prec = resolve_precision(precision, dev)
        net = load_backbone(str(backbone), layer=layer, inference=True, trust=trust)
        self._setup(net, device=dev, precision=prec, batch_size=batch_size, workers=workers)

    @classmethod
    def from_network(cls, network: "Backbone", *, device: str = "auto", precision: str = "auto",
                     batch_size: int | None = None, workers: int | None = None) -> "Embedder":
        """Wrap a network already built (by :func:`fxtl.load_backbone` or a loaded run)."""
        _check_count("batch_size", batch_size, 1)
        _check_count("workers", workers, 0)
        self = cls.__new__(cls)
        dev = resolve_device(device)
        self._setup(network, device=dev, precision=resolve_precision(precision, dev),
                    batch_size=batch_size, workers=workers)
        return self

    def _setup(self, net, *, device: str, precision: str, batch_size: int | None,
               workers: int | None) -> None:
        import torch

        self.device, self.precision = device, precision
        self.batch_size = batch_size or default_batch_size(device, precision)
        self.workers = default_workers(device) if workers is None else workers
        self.network = net.to(device=device, memory_format=torch.channels_last).eval()
        self.images_computed = 0

    @property
    def feature_dim(self) -> int:
        return int(self.network.feature_dim)

    @property
    def preprocessing(self) -> Preprocessing:
        return self.network.preprocessing

    @property
    def provenance(self) -> dict[str, Any]:
        return {**self.network.provenance, "precision": self.precision}

    def __repr__(self) -> str:
        return (f"Embedder(backbone={self.network.spec.name!r}, layer={self.network.layer!r}, "
                f"device={self.device!r}, precision={self.precision!r}, dim={self.feature_dim})")

    def _context(self):
        import contextlib

        import torch

        stack = contextlib.ExitStack()
        stack.enter_context(torch.inference_mode())
        stack.enter_context(autocast(self.device, self.precision))
        return stack

    def _to_device(self, x):
        import torch

        return x.to(self.device, non_blocking=True).contiguous(memory_format=torch.channels_last)

    def run(self, items: Sequence[str | Image.Image], names: Sequence[str], *,
            outputs: str = "features", on_error: str = "raise", progress: bool = False,
            desc: str = "embed") -> np.ndarray:
        """Items (from :func:`image_items`) -> features, or the network's own class
        probabilities (``outputs="probabilities"``, a fine-tuned run's softmax)."""
        _check_on_error(on_error)
        net = self.network
        if outputs == "features":
            width, dtype = self.feature_dim, np.float32

            def fn(x):
                return net(self._to_device(x)).float().cpu().numpy()
        elif outputs == "probabilities":
            width = int(getattr(net.model.get_submodule(net.classifier_name), "out_features"))
            dtype = np.float64

            def fn(x):  # softmax in float64, as `fxtl predict` computes it
                _, logits = net.forward_with_logits(self._to_device(x))
                z = logits.float().cpu().numpy().astype(np.float64)
                e = np.exp(z - z.max(axis=1, keepdims=True))
                return e / e.sum(axis=1, keepdims=True)
        else:
            raise ParameterError("outputs", f"outputs must be 'features' or 'probabilities', "
                                 f"got {outputs!r}")
        out = run_batches(items, net.preprocessing, fn, width=width, device=self.device,
                          batch_size=self.batch_size, workers=self.workers, names=names,
                          on_error=on_error, progress=progress, desc=desc, context=self._context,
                          dtype=dtype)
        self.images_computed += len(items)
        return out

    def __call__(self, images: Any, *, on_error: str = "raise", progress: bool = False) -> np.ndarray:
        """Embed ``images``: float32 ``(n, feature_dim)``, one row per image in input order
        (a folder contributes its images in sorted path order).

        Parameters
        ----------
        images : path, folder, PIL image, uint8 array, or a sequence of them
        on_error : {"raise", "nan"}
            An image that cannot be decoded: raise :class:`~fxtl.errors.DataError` naming it,
            or give it a row of NaN.
        progress : bool
            A progress bar on stderr.
        """
        _check_on_error(on_error)
        items, names = image_items(images)
        return self.run(items, names, on_error=on_error, progress=progress)


def embed(images: Any, backbone: "str | Embedder" = DEFAULT_BACKBONE, *, layer: str | None = None,
          batch_size: int | None = None, device: str = "auto", precision: str = "auto",
          progress: bool = False) -> np.ndarray:
    """Embed images with a frozen backbone: the numbers ``fxtl extract`` would cache.

    Parameters
    ----------
    images : path, folder, PIL image, uint8 array, or a sequence of them
        Folders are walked recursively (sorted); arrays are ``H x W x 3`` uint8 (grayscale
        ``H x W`` and RGBA ``H x W x 4`` are converted like their files), or a 4-D batch.
    backbone : str or Embedder
        A backbone name or fine-tuned run folder (the network is built for this call), or an
        :class:`Embedder` to reuse, which builds nothing (then the other options must be left
        at their defaults: they are the Embedder's).
    layer, batch_size, device, precision
        As for :func:`fxtl.extract`.
    progress : bool
        A progress bar on stderr.

    Returns
    -------
    ndarray of float32, shape (n_images, feature_dim)
        One row per image, in input order; an empty list gives shape ``(0, feature_dim)``.

    Raises
    ------
    ParameterError
        A missing path, a non-uint8 array, a bad option.
    DataError
        An image that cannot be decoded (named).

    Examples
    --------
    >>> X = embed("data/hymenoptera/val")                      # doctest: +SKIP
    >>> X.shape                                                # doctest: +SKIP
    (153, 1280)
    >>> emb = Embedder("lite0")                                # doctest: +SKIP
    >>> embed(["bee.jpg"], emb).shape                          # doctest: +SKIP
    (1, 1280)
    """
    if isinstance(backbone, Embedder):
        given = {k: v for k, v in (("layer", layer), ("batch_size", batch_size)) if v is not None}
        given.update({k: v for k, v in (("device", device), ("precision", precision)) if v != "auto"})
        if given:
            name = next(iter(given))
            raise ParameterError(name, f"{name} cannot be set when backbone is an Embedder (it "
                                 f"has its own); build the Embedder with {name}={given[name]!r}")
        return backbone(images, progress=progress)
    items, names = image_items(images)  # bad input is refused before the network is built
    emb = Embedder(backbone, layer=layer, batch_size=batch_size, device=device, precision=precision)
    return emb.run(items, names, progress=progress)


# ----------------------------------------------------------------------------- scikit-learn
def _item_key(item: str | Image.Image) -> tuple:
    """What a row depends on besides the network: the file (path, size, mtime) or the pixels."""
    if isinstance(item, str):
        st = os.stat(item)
        return ("file", os.path.realpath(item), st.st_size, st.st_mtime_ns)
    return ("pixels", item.size, hashlib.sha256(item.tobytes()).hexdigest())


class _Shared:
    """What clones of one :class:`ImageEmbedder` share: the built network per configuration and
    the rows already computed, keyed by provenance and image (so a clone given other parameters
    never reads another configuration's rows)."""

    def __init__(self):
        self.embedders: dict[tuple, Embedder] = {}
        self.rows: dict[str, dict[tuple, np.ndarray]] = {}
        self.images_computed = 0

    def __getstate__(self):  # a pickled copy (a joblib worker) rebuilds its own network
        return {"embedders": {}, "rows": self.rows, "images_computed": self.images_computed}

    def __setstate__(self, state):
        self.__dict__.update(state)


class ImageEmbedder(TransformerMixin, BaseEstimator):
    """A scikit-learn transformer from images to backbone features.

    ``fit`` learns nothing (returns ``self``); ``transform(images)`` returns the float32 rows
    :func:`embed` returns. Put it first in a Pipeline to cross-validate a head on image paths.

    Rows are remembered per image (file path, size and modification time, or the pixels) and
    per provenance (backbone, weights hash, layer, preprocessing, precision), in memory, and the
    memory is shared with every clone (``sklearn.base.clone``), so ``GridSearchCV`` or
    ``cross_val_score`` over a head runs the backbone once per image, not once per candidate
    and fold. ``clear_cache()`` forgets them; ``cache=False`` turns it off.

    Parameters
    ----------
    backbone : str
    layer : str, optional
    batch_size : int, optional
    device : {"auto", "cpu", "cuda"}
    precision : {"auto", "fp32", "bf16", "fp16"}
    cache : bool
        Remember computed rows (shared across clones).

    Attributes
    ----------
    images_computed : int -- images this object and its clones ran through the network

    Examples
    --------
    >>> from sklearn.model_selection import cross_val_score                   # doctest: +SKIP
    >>> from sklearn.pipeline import make_pipeline                            # doctest: +SKIP
    >>> from sklearn.linear_model import LogisticRegression                   # doctest: +SKIP
    >>> pipe = make_pipeline(ImageEmbedder(), LogisticRegression(max_iter=1000))  # doctest: +SKIP
    >>> cross_val_score(pipe, paths, labels, cv=3).mean()                     # doctest: +SKIP
    0.94
    """

    def __init__(self, backbone: str = DEFAULT_BACKBONE, *, layer: str | None = None,
                 batch_size: int | None = None, device: str = "auto", precision: str = "auto",
                 cache: bool = True):
        self.backbone = backbone
        self.layer = layer
        self.batch_size = batch_size
        self.device = device
        self.precision = precision
        self.cache = cache

    @property
    def _shared(self) -> _Shared:
        shared = self.__dict__.get("_shared_state")
        if shared is None:
            shared = self.__dict__["_shared_state"] = _Shared()
        return shared

    def __sklearn_clone__(self):
        new = super().__sklearn_clone__()
        new.__dict__["_shared_state"] = self._shared
        return new

    def __sklearn_is_fitted__(self) -> bool:
        return True  # stateless: nothing is learned by fit

    @property
    def images_computed(self) -> int:
        return self._shared.images_computed

    def clear_cache(self) -> None:
        """Forget the remembered rows (of this object and its clones)."""
        self._shared.rows.clear()

    def _embedder(self) -> Embedder:
        key = (str(self.backbone), self.layer, self.batch_size, self.device, self.precision)
        emb = self._shared.embedders.get(key)
        if emb is None:
            emb = self._shared.embedders[key] = Embedder(
                self.backbone, layer=self.layer, batch_size=self.batch_size, device=self.device,
                precision=self.precision)
        return emb

    def fit(self, X: Any = None, y: Any = None) -> "ImageEmbedder":
        """Nothing to learn; returns ``self``."""
        return self

    def transform(self, X: Any) -> np.ndarray:
        """Images -> float32 ``(n, feature_dim)`` rows (see :func:`embed` for what ``X`` may be)."""
        items, names = image_items(X, param="X")
        emb = self._embedder()
        if not self.cache:
            self._shared.images_computed += len(items)
            return emb.run(items, names)
        memo = self._shared.rows.setdefault(json.dumps(emb.provenance, sort_keys=True, default=str), {})
        keys = [_item_key(it) for it in items]
        todo = [i for i, k in enumerate(keys) if k not in memo]
        todo = list({keys[i]: i for i in reversed(todo)}.values())[::-1]  # each image once
        if todo:
            rows = emb.run([items[i] for i in todo], [names[i] for i in todo])
            self._shared.images_computed += len(todo)
            for i, row in zip(todo, rows):
                memo[keys[i]] = row
        out = np.empty((len(items), emb.feature_dim), dtype=np.float32)
        for i, k in enumerate(keys):
            out[i] = memo[k]
        return out

    def fit_transform(self, X: Any, y: Any = None, **fit_params: Any) -> np.ndarray:
        return self.fit(X, y).transform(X)

    def get_feature_names_out(self, input_features: Any = None) -> np.ndarray:
        """``imageembedder0 ... imageembedder{dim-1}`` (scikit-learn's naming for new features)."""
        return np.asarray([f"imageembedder{i}" for i in range(self._embedder().feature_dim)],
                          dtype=object)

    def __sklearn_tags__(self):
        tags = super().__sklearn_tags__()
        tags.requires_fit = False
        tags.input_tags.two_d_array = False  # images (paths, PIL, arrays), not a numeric table
        tags.input_tags.string = True
        tags.transformer_tags.preserves_dtype = []
        return tags

