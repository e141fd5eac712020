"""Find labelled images, assign splits, fingerprint the dataset, and load images robustly.

A DATA_DIR is one of:

* class folders directly (``root/ants/*.jpg``, ``root/bees/*.jpg``): every image is ``train``;
* split folders (``train``, ``val``/``valid``/``validation``, ``test``) each holding class folders;
* a CSV manifest ``path,label[,split]`` (header optional; a header row containing ``path`` maps
  the columns by name, in any order), paths relative to the CSV's folder. One image listed twice
  (also via another spelling or a link) is refused when the rows disagree on label or split, and
  dropped with a warning when they agree.

Hidden files and folders (``.ipynb_checkpoints``, dotfiles) and ``Thumbs.db`` are ignored, files
whose ending is not an image ending are ignored, and symlink loops are not followed twice.
fxtl's own output is never data: a folder holding an fxtl artifact (a feature cache, its lock or
``.parts`` chunks, ``head.json``, ``fxtl-model.json``, ``metrics.json``, ``rows.json``) is skipped
with everything below it, as is the cache folder itself, and one warning names what was skipped.
Nothing else is dropped without a word either: images lying directly in the root or in a split
folder (outside any class folder) and files with an image ending this Pillow cannot decode
(``.heic``...) are named in a warning.
"""
from __future__ import annotations

import csv
import hashlib
import json
import os
import stat
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from .._isolate import run_isolated
from .._util import default_cache_dir
from ..errors import DataError, FxtlWarning
from .images import IMAGE_EXTENSIONS, UNDECODABLE_EXTENSIONS, EvalTransform, ImageDecodeError, Preprocessing

__all__ = ["Sample", "ImageSet", "discover", "SPLIT_ALIASES", "ImageDataset", "fingerprint",
           "walk_images", "ARTIFACT_NAMES", "is_artifact_folder"]

# Folder name (lower case) -> canonical split name.
SPLIT_ALIASES = {"train": "train", "training": "train", "val": "val", "valid": "val",
                 "validation": "val", "test": "test", "testing": "test"}
SPLITS = ("train", "val", "test")
_IGNORED_FILES = {"thumbs.db", "desktop.ini"}
# Files only fxtl writes: a folder holding one is fxtl's output (a run, a cache dir), never data.
ARTIFACT_NAMES = frozenset({"head.json", "fxtl-model.json", "metrics.json", "rows.json"})
_HDF5_SIGNATURE = b"\x89HDF\r\n\x1a\n"
# Seconds a child may take to read an HDF5 file's `format` before the file is called damaged.
_FORMAT_PROBE_SECONDS = 30.0


@dataclass(frozen=True)
class Sample:
    path: str  # relative to ImageSet.root, with forward slashes
    label: int  # index into class_names
    split: str  # train | val | test


@dataclass
class ImageSet:
    """A discovered dataset: root, class names and samples in a deterministic order."""

    root: Path
    class_names: list[str]
    samples: list[Sample]
    layout: str  # "classes" | "splits" | "manifest"
    manifest: Path | None = None
    stats: dict[str, Any] = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.samples)

    @property
    def name(self) -> str:
        return (self.manifest.stem if self.manifest else self.root.name) or "dataset"

    @property
    def splits(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for s in self.samples:
            out[s.split] = out.get(s.split, 0) + 1
        return out

    def counts(self) -> dict[str, int]:
        """Images per class (all splits)."""
        c = np.bincount([s.label for s in self.samples], minlength=len(self.class_names))
        return {name: int(n) for name, n in zip(self.class_names, c)}

    def abspath(self, sample: Sample) -> Path:
        return self.root / sample.path

    def subset(self, indices: Sequence[int]) -> "ImageSet":
        return ImageSet(root=self.root, class_names=list(self.class_names),
                        samples=[self.samples[i] for i in indices], layout=self.layout,
                        manifest=self.manifest)


def _is_hidden(name: str) -> bool:
    return name.startswith(".") or name.startswith("__") or name.lower() in _IGNORED_FILES


def _is_image(name: str) -> bool:
    return name.lower().endswith(IMAGE_EXTENSIONS)


def _loose_images(folder: Path) -> list[str]:
    """Image files directly in ``folder`` (not in a class folder below it)."""
    try:
        return sorted(e.name for e in os.scandir(folder)
                      if _is_image(e.name) and not _is_hidden(e.name) and e.is_file())
    except OSError:
        return []


def _warn_loose(folder: Path, names: list[str]) -> None:
    if names:
        warnings.warn(f"{folder}: ignored {len(names)} image(s) outside any class folder "
                      f"({', '.join(names[:3])}{', ...' if len(names) > 3 else ''}); move them "
                      f"into {folder}/<class>/ to use them", FxtlWarning, stacklevel=2)


def _warn_undecodable(files: list[Path]) -> None:
    if files:
        kinds = sorted({f.suffix.lower() for f in files})
        warnings.warn(f"ignored {len(files)} {'/'.join(kinds)} file(s) this Pillow cannot decode "
                      f"({', '.join(str(f) for f in files[:3])}{', ...' if len(files) > 3 else ''}"
                      "); convert them to JPEG or PNG", FxtlWarning, stacklevel=2)


def _is_fxtl_hdf5(path: str) -> bool:
    """True for an HDF5 file that fxtl wrote (a cache or a shard): its ``format`` says so.

    The file is read in a child process only (libhdf5 may crash on a damaged one), and only
    when it is a regular file with HDF5's signature (opening a FIFO would block)."""
    try:
        if not stat.S_ISREG(os.stat(path).st_mode):
            return False
        with open(path, "rb") as fh:
            if fh.read(8) != _HDF5_SIGNATURE:
                return False
        return run_isolated("fxtl.data.discovery:require_fxtl_format", Path(path), "format",
                            limit=_FORMAT_PROBE_SECONDS, fix="it is not read") is None
    except Exception:  # unreadable or damaged: not provably ours, and not an image either
        return False


def require_fxtl_format(path: Path, level: str = "format") -> None:
    """Raise unless the HDF5 file ``path``'s root attribute ``format`` starts with ``fxtl``
    (run in a child process by :func:`_is_fxtl_hdf5`; ``level`` is the child protocol's)."""
    import h5py  # the child's only reader; discovery itself never opens HDF5

    with h5py.File(path, "r") as f:
        fmt = f.attrs.get("format", "")
    fmt = fmt.decode("utf-8", "replace") if isinstance(fmt, bytes) else str(fmt)
    if not fmt.startswith("fxtl"):
        raise ValueError(f"format {fmt!r}")


def is_artifact_folder(dirpath: str | Path, filenames: Sequence[str] = (),
                       dirnames: Sequence[str] = ()) -> bool:
    """True if the folder directly holds an fxtl artifact (given its listing, or listed here).

    Artifacts: ``head.json``, ``fxtl-model.json``, ``metrics.json``, ``rows.json``, a feature
    cache or shard (HDF5 whose ``format`` starts with ``fxtl``), a cache's ``.lock``,
    ``.partial`` or ``.parts`` companion.
    """
    if not filenames and not dirnames:
        try:
            entries = list(os.scandir(dirpath))
        except OSError:
            return False
        filenames = [e.name for e in entries if not e.is_dir()]
        dirnames = [e.name for e in entries if e.is_dir()]
    for name in filenames:
        low = name.lower()
        if name in ARTIFACT_NAMES or low.endswith(".h5.lock") or \
                (low.endswith(".partial") and ".h5." in low):
            return True
        if low.endswith((".h5", ".hdf5")) and _is_fxtl_hdf5(os.path.join(dirpath, name)):
            return True
    return any(d.lower().endswith(".h5.parts") for d in dirnames)


def walk_images(folder: Path, *, unreadable: list[tuple[str, str]] | None = None,
                artifacts: list[Path] | None = None,
                undecodable: list[Path] | None = None) -> list[Path]:
    """Image files under ``folder`` (recursively), sorted, following symlinks without loops.

    A folder that cannot be listed (permissions) raises :class:`DataError` naming it, so its
    images are never dropped silently; with an ``unreadable`` list the folder is appended to it
    as ``(path, reason)`` and skipped instead. A folder holding fxtl artifacts
    (:func:`is_artifact_folder`) is skipped with everything below it: it is appended to
    ``artifacts`` when given, else an :class:`~fxtl.errors.FxtlWarning` names it. Files with
    an image ending this Pillow cannot decode (``UNDECODABLE_EXTENSIONS``) go to
    ``undecodable`` when given, else a warning names them.
    """
    odd: list[Path] = []
    skipped: list[Path] = []
    found: list[Path] = []
    seen: set[str] = set()

    def refuse(exc: OSError) -> None:
        where = exc.filename or folder
        if unreadable is None:
            raise DataError(f"{where}: cannot read this folder ({exc.strerror or exc}); make it "
                            "readable or move it out of the dataset") from None
        unreadable.append((str(where), f"cannot read this folder ({exc.strerror or exc})"))

    for dirpath, dirnames, filenames in os.walk(folder, followlinks=True, onerror=refuse):
        real = os.path.realpath(dirpath)
        if real in seen:  # a symlink loop, or a second link to the same folder
            dirnames[:] = []
            continue
        seen.add(real)
        if is_artifact_folder(dirpath, filenames, dirnames):
            skipped.append(Path(dirpath))
            dirnames[:] = []
            continue
        dirnames[:] = sorted(d for d in dirnames if not _is_hidden(d))
        for fn in sorted(filenames):
            if not _is_hidden(fn) and _is_image(fn):
                found.append(Path(dirpath) / fn)
            elif fn.lower().endswith(UNDECODABLE_EXTENSIONS) and not _is_hidden(fn):
                odd.append(Path(dirpath) / fn)
    if undecodable is not None:
        undecodable.extend(odd)
    else:
        _warn_undecodable(odd)
    if artifacts is not None:
        artifacts.extend(skipped)
    elif skipped:
        _warn_skipped(skipped)
    return sorted(found)


def _warn_skipped(folders: Sequence[Path]) -> None:
    names = ", ".join(str(f) for f in folders[:3]) + (f" and {len(folders) - 3} more"
                                                        if len(folders) > 3 else "")
    warnings.warn(f"skipped {len(folders)} folder(s) holding fxtl output ({names}): fxtl never "
                  "reads its own caches, heads or runs as images", FxtlWarning, stacklevel=2)


def _data_folders(folders: Sequence[Path], artifacts: list[Path],
                  undecodable: list[Path]) -> dict[Path, list[Path]]:
    """``folders`` that are data -> their images; fxtl output folders are left out.

    A folder is fxtl output when it directly holds an artifact, or holds no image and either an
    artifact folder below it or is the default cache folder (``./cache``, ``$FXTL_CACHE``).
    """
    try:
        cache_home = default_cache_dir().resolve()
    except OSError:
        cache_home = None
    out: dict[Path, list[Path]] = {}
    for folder in folders:
        below: list[Path] = []
        files = walk_images(folder, artifacts=below, undecodable=undecodable)
        if not files and (below or folder.resolve() == cache_home):
            artifacts.append(folder)
            continue
        artifacts.extend(below)
        out[folder] = files
    return out


def _subdirs(folder: Path) -> list[Path]:
    try:
        return sorted(p for p in folder.iterdir() if p.is_dir() and not _is_hidden(p.name))
    except PermissionError:
        raise DataError(f"{folder}: permission denied; make it readable") from None


def discover(data: str | Path) -> ImageSet:
    """Discover the labelled images of a DATA_DIR (or CSV manifest).

    Parameters
    ----------
    data : str or Path
        An ImageFolder root (class folders, or split folders holding class folders) or a CSV
        manifest ``path,label[,split]``.

    Returns
    -------
    ImageSet

    Raises
    ------
    DataError
        Missing folder, no images, an empty class folder, a bad manifest.
    """
    data = Path(data).expanduser()
    if not data.exists():
        raise DataError(f"{data}: no such file or folder; pass an image folder or a CSV manifest")
    if data.is_file():
        if data.suffix.lower() != ".csv":
            raise DataError(f"{data} is a file; pass a folder of class folders or a .csv manifest")
        return _from_manifest(data)
    root = data.resolve()
    artifacts: list[Path] = []
    undecodable: list[Path] = []
    subdirs = _subdirs(root)
    split_dirs = [d for d in subdirs if d.name.lower() in SPLIT_ALIASES]
    if split_dirs:
        others = [d.name for d in _data_folders(
            [d for d in subdirs if d.name.lower() not in SPLIT_ALIASES], artifacts, [])]
        if others:
            raise DataError(f"{root} mixes split folders ({', '.join(d.name for d in split_dirs)}) "
                            f"with other folders ({', '.join(others[:3])}); move those into a split")
        per_split: dict[str, dict[str, list[Path]]] = {}
        for d in split_dirs:
            split = SPLIT_ALIASES[d.name.lower()]
            if split in per_split:
                raise DataError(f"{root} has two folders for the {split} split; keep one")
            per_split[split] = {c.name: _nonempty_class(c, files) for c, files in
                                _data_folders(_subdirs(d), artifacts, undecodable).items()}
            _warn_loose(d, _loose_images(d))
            if not per_split[split]:
                raise DataError(f"{d} holds no class folders; put images in {d}/<class>/")
        class_names = sorted({c for classes in per_split.values() for c in classes})
        index = {c: i for i, c in enumerate(class_names)}
        samples = [Sample(_rel(p, root), index[c], split)
                   for split in SPLITS if split in per_split
                   for c, files in sorted(per_split[split].items()) for p in files]
        if "train" in per_split:
            missing = [c for c in class_names if c not in per_split["train"]]
            if missing:
                raise DataError(f"class {missing[0]!r} has images in another split but none in "
                                f"{root}/train{_output_in_data(artifacts)}; add training images "
                                "or remove the class")
        layout = "splits"
    else:
        classes = _data_folders(subdirs, artifacts, undecodable)
        if not classes:
            if walk_images(root, artifacts=[]):
                raise DataError(f"{root} holds images but no class folders; put them in "
                                f"{root}/<class>/ (one folder per label)")
            raise DataError(f"{root} holds no images; expected {root}/<class>/<image>.jpg")
        class_names = [d.name for d in classes]
        samples = [Sample(_rel(p, root), i, "train")
                   for i, (d, files) in enumerate(classes.items()) for p in _nonempty_class(d, files)]
        layout = "classes"
    _warn_loose(root, _loose_images(root))
    if artifacts:
        _warn_skipped(artifacts)
    _warn_undecodable(undecodable)
    if len(class_names) < 2:
        raise DataError(f"{root} has {len(class_names)} class{_output_in_data(artifacts)}; a "
                        "classifier needs at least 2 class folders")
    return ImageSet(root=root, class_names=class_names, samples=samples, layout=layout)


def _output_in_data(artifacts: Sequence[Path]) -> str:
    """A clause naming a skipped folder that holds images beside fxtl output: a class folder
    that became a cache dir (``--cache-dir DATA/train/ants``) is left out whole, images too."""
    def holds_images(folder: Path) -> bool:
        try:
            return any(_is_image(p.name) for p in folder.iterdir() if p.is_file())
        except OSError:
            return False

    mixed = [a for a in artifacts if holds_images(a)]
    if not mixed:
        return ""
    return (f" ({mixed[0]} holds images and fxtl output, a cache or a run, so it is not read as "
            "a class folder: move fxtl's files out of it and keep cache_dir outside the data)")


def _nonempty_class(folder: Path, files: list[Path]) -> list[Path]:
    if not files:
        raise DataError(f"class folder {folder} holds no images; add images or remove the folder")
    return files


def _rel(path: Path, root: Path) -> str:
    return Path(os.path.relpath(path, root)).as_posix()


_MANIFEST_COLUMNS = ("path", "label", "split")


def _manifest_rows(csv_path: Path) -> list[tuple[int, str, str, str]]:
    """``(line, path, label, split)`` per row; a header row maps columns by their names."""
    rows: list[tuple[int, str, str, str]] = []
    columns = {name: i for i, name in enumerate(_MANIFEST_COLUMNS)}  # no header: positional
    header_seen = False
    with open(csv_path, newline="", encoding="utf-8-sig") as fh:
        for lineno, row in enumerate(csv.reader(fh), start=1):
            if not row or all(not c.strip() for c in row) or row[0].lstrip().startswith("#"):
                continue
            cells = [c.strip() for c in row]
            names = [c.lower() for c in cells]
            if not header_seen and not rows and "path" in names:
                header_seen = True
                if "label" not in names:
                    raise DataError(f"{csv_path} line {lineno}: the header names no `label` "
                                    "column; name the columns path,label[,split]")
                columns = {name: names.index(name) for name in _MANIFEST_COLUMNS if name in names}
                continue

            def cell(name: str) -> str:
                i = columns.get(name)
                return cells[i] if i is not None and i < len(cells) else ""

            for needed in ("path", "label"):
                if not cell(needed):
                    raise DataError(f"{csv_path} line {lineno}: expected `path,label[,split]`, "
                                    f"got {','.join(row)!r}; every row needs a {needed}")
            split = cell("split").lower() or "train"
            if split not in SPLIT_ALIASES:
                raise DataError(f"{csv_path} line {lineno}: unknown split {cell('split')!r}; "
                                "use train, val or test")
            rows.append((lineno, cell("path"), cell("label"), SPLIT_ALIASES[split]))
    return rows


def _from_manifest(csv_path: Path) -> ImageSet:
    root = csv_path.resolve().parent
    try:
        rows = _manifest_rows(csv_path)
    except UnicodeDecodeError:
        raise DataError(f"{csv_path} is not UTF-8 text; save the manifest as UTF-8 CSV") from None
    except csv.Error as exc:
        raise DataError(f"{csv_path} is not a readable CSV ({exc}); save it as plain CSV "
                        "`path,label[,split]`") from None
    except OSError as exc:
        raise DataError(f"{csv_path}: cannot read the manifest ({exc.strerror or exc})") from None
    if not rows:
        raise DataError(f"{csv_path} lists no images; add rows `path,label[,split]`")
    train_labels = {label for _, _, label, split in rows if split == "train"}
    class_names = sorted(train_labels) if train_labels else sorted({r[2] for r in rows})
    index = {c: i for i, c in enumerate(class_names)}
    samples = []
    # The same file twice (another spelling, a link) would put one image in two splits or
    # under two labels: a conflict is refused, an exact repeat is dropped with a warning.
    first: dict[tuple[int, int], tuple[int, str, str, str]] = {}
    repeats: list[tuple[int, int]] = []
    for lineno, rel, label, split in rows:
        # The check is on the text: absolute paths and `..` that climbs above the manifest's
        # folder are refused; a symlink that the user placed inside the folder is followed,
        # exactly as in folder layouts.
        if "\0" in rel:
            raise DataError(f"{csv_path} line {lineno}: the path contains a NUL byte (a damaged or "
                            "binary file?); save the manifest as plain UTF-8 CSV")
        norm = os.path.normpath(rel)
        if os.path.isabs(rel) or norm == ".." or norm.startswith(".." + os.sep):
            raise DataError(f"{csv_path} line {lineno}: path {rel!r} escapes the manifest's folder "
                            f"{root}; use paths relative to it")
        full = root / norm
        try:
            st = full.stat()
        except OSError:
            st = None
        if st is None or not full.is_file():
            raise DataError(f"{csv_path} line {lineno}: file {rel!r} not found under {root}; "
                            "fix the path or remove the line")
        key, posix = (st.st_dev, st.st_ino), Path(norm).as_posix()
        if key in first:
            line0, path0, label0, split0 = first[key]
            if (label0, split0) != (label, split):
                same = repr(posix) if posix == path0 else f"({path0!r} and {posix!r})"
                raise DataError(f"{csv_path} lines {line0} and {lineno} list the same image {same} "
                                f"as {label0}/{split0} and {label}/{split}; keep one row per image "
                                "(an image in two splits leaks)")
            repeats.append((lineno, line0))
            continue
        first[key] = (lineno, posix, label, split)
        if label not in index:
            raise DataError(f"{csv_path} line {lineno}: label {label!r} does not occur in the "
                            "train split; fix the label or add training images for it")
        samples.append(Sample(posix, index[label], split))
    if repeats:
        listed = ", ".join(f"line {a} repeats line {b}" for a, b in repeats[:3])
        warnings.warn(f"{csv_path}: dropped {len(repeats)} duplicate row(s) ({listed}"
                      f"{', ...' if len(repeats) > 3 else ''})", FxtlWarning, stacklevel=2)
    if len(class_names) < 2:
        raise DataError(f"{csv_path} has {len(class_names)} label; a classifier needs at least 2")
    order = {s: i for i, s in enumerate(SPLITS)}
    samples.sort(key=lambda s: (order[s.split], s.label, s.path))
    return ImageSet(root=root, class_names=class_names, samples=samples, layout="manifest",
                    manifest=csv_path.resolve(), stats={"duplicate_rows_dropped": len(repeats)})


def fingerprint(images: ImageSet, **parts: Any) -> str:
    """sha256 over the file list (path, size, mtime, label, split), classes and ``parts``.

    ``parts`` carries what else shapes the result (backbone, weights hash, preprocessing, layer,
    precision). Any change gives another fingerprint, so a stale cache is never reused.
    """
    h = hashlib.sha256()
    h.update(json.dumps({"classes": images.class_names, **parts}, sort_keys=True, default=str).encode())
    for s in images.samples:
        try:
            st = os.stat(images.root / s.path)
            size, mtime = st.st_size, st.st_mtime_ns
        except OSError:
            size, mtime = -1, -1
        # surrogateescape: a file name that is not valid UTF-8 still hashes, byte for byte
        h.update(f"\0{s.path}\0{size}\0{mtime}\0{s.label}\0{s.split}".encode("utf-8", "surrogateescape"))
    return h.hexdigest()


class ImageDataset:
    """Map-style dataset: ``i -> (uint8 image tensor, i, error or "")``.

    Bad images do not raise: they yield a zero image and the reason, so one broken file never
    stops a batch; the caller records and drops them.
    """

    def __init__(self, paths: Sequence[Path | str], pre: Preprocessing, transform=None):
        self.paths = [str(p) for p in paths]
        self.pre = pre
        self.transform = transform or EvalTransform(pre)

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int):
        import torch

        try:
            x = self.transform.load(self.paths[i])
            return x, i, ""
        except ImageDecodeError as exc:
            c = self.pre.crop
            return torch.zeros(3, c, c, dtype=torch.uint8), i, str(exc)
