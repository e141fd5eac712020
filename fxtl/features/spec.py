"""The feature cache's format, as data: every element, its encoding and version, and the limits.

``docs/cache-format.md`` is the specification; this module is its registry, the one place the
writer (:mod:`~fxtl.features.store`), the checker (:mod:`~fxtl.features.cache_check`) and the
crash guard (:mod:`~fxtl.features.cache_guard`) take names, versions and limits from (as
anndata's ``_io.specs.registry`` is for its format). It imports nothing of fxtl's.
"""
from __future__ import annotations

from dataclasses import dataclass

__all__ = ["FORMAT", "FORMAT_VERSION", "READABLE_VERSIONS", "SPLITS", "LAYERS_GROUP", "LAYER_POOLING",
           "REQUIRED_ATTRS", "JSON_ATTRS", "STRING_ATTRS", "PROVENANCE_KEYS", "ROW_DATASETS",
           "Element", "ELEMENTS", "element", "CHUNK_BYTES", "MAX_EXPANSION", "EXPANSION_SLACK_BYTES", "PROBE_READ_ALL_BYTES"]

FORMAT = "fxtl-features"
FORMAT_VERSION = 3
# Every version fxtl reads (docs/cache-format.md, "Versioning").
READABLE_VERSIONS = (1, 2, 3)
SPLITS = ("train", "val", "test")
# The group holding further layers' features, one [N, D_layer] dataset per layer, and how each
# was reduced to one vector per image (docs/cache-format.md, "Layers").
LAYERS_GROUP = "layers"
LAYER_POOLING = "global-average"

# Root attributes every cache carries (docs/cache-format.md, "Root attributes").
REQUIRED_ATTRS = ("format", "format_version", "class_names", "backbone", "weights_sha256",
                  "preprocessing", "precision", "layer", "fingerprint", "created",
                  "fxtl_version", "complete")
# Attributes holding JSON text, decoded by the reader.
JSON_ATTRS = ("preprocessing", "versions", "timings")
# Required attributes that are one string each.
STRING_ATTRS = ("backbone", "weights_sha256", "precision", "layer", "fingerprint")
# What an artifact made from a cache records about where its features came from.
PROVENANCE_KEYS = ("backbone", "weights_sha256", "preprocessing", "precision", "layer", "layers", "graph",
                   "fingerprint", "data_fingerprint", "fxtl_version", "versions", "dataset_root",
                   "created")
# Datasets with one row per image, in this order.
ROW_DATASETS = ("features", "labels", "paths", "split")


@dataclass(frozen=True)
class Element:
    """One stored element: where it is, what it is (``encoding-type``) and at which version."""

    path: str
    encoding_type: str
    encoding_version: str
    required: bool = True


# Every element a version-3 writer stamps (docs/cache-format.md, "Datasets", "Layers").
ELEMENTS = (
    Element("/features", "dense-array", "1"),
    Element("/labels", "dense-array", "1"),
    Element("/paths", "string-array", "2"),
    Element("/split", "string-array", "2"),
    Element("/errors", "errors-table", "2", required=False),
    Element("/errors/path", "string-array", "2", required=False),
    Element("/errors/reason", "string-array", "2", required=False),
    Element("/layers", "layer-set", "1", required=False),
    Element("/layers/<name>", "dense-array", "1", required=False),  # one per layer
)
_BY_PATH = {e.path: e for e in ELEMENTS}


def element(path: str) -> Element:
    """The registry's entry for the element at ``path`` (``"/features"``, ``"/layers/blocks.4"``);
    KeyError if none."""
    if path.startswith("/layers/"):
        return _BY_PATH["/layers/<name>"]
    return _BY_PATH[path]

# Rows per HDF5 chunk of /features are chosen so that one chunk is about 1 MiB.
CHUNK_BYTES = 1 << 20
# A dataset may declare at most this many times the bytes the file stores for it (plus the slack
# below): HDF5 returns a fill value for storage a file never wrote, so a few kilobytes can
# declare gigabytes. fxtl writes no compression, so its own files declare exactly what they store.
MAX_EXPANSION = 32
EXPANSION_SLACK_BYTES = 1 << 20
# The crash guard's child reads every value of /features up to this many declared bytes; above,
# the chunk index and the first and last blocks (a bigger read would not fit its time limit).
PROBE_READ_ALL_BYTES = 512 << 20
