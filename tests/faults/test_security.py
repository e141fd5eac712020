"""Security: nothing fxtl loads can run code unless the user says --trust, and no path given in a
manifest reaches outside the dataset.

* A source scan (AST) of fxtl/: every torch.load and torch.hub download passes
  weights_only=True; pickle is never used; joblib.load only inside heads.load_head; numpy never
  unpickles; archive extraction (none today) would have to use tarfile's "data" filter.
* Files made to run code when unpickled are refused without running it: a head without a
  matching sidecar, a backbone weights file. (A fine-tune checkpoint: test_finetune_faults.py.)
* Manifest paths: absolute or climbing out with .. are refused; symlinks the user placed inside
  the dataset are followed, as in folder layouts; symlink loops never hang a walk.
"""
from __future__ import annotations

import ast
import json
import os
import pickle
from pathlib import Path

import pytest
from click.testing import CliRunner

from fxtl.cli import cli
from fxtl.data.discovery import discover
from fxtl.errors import DataError

from .. import _images as img
from ._cli import ROOT, RunsCode, assert_one_line_error, run_fxtl

# ----------------------------------------------------------------------------- source scan
# Calls that unpickle. Anything here outside its allowed place is a finding.
_NEVER = {"pickle.load", "pickle.loads", "pickle.Unpickler", "cloudpickle.load", "cloudpickle.loads",
          "dill.load", "dill.loads", "marshal.load", "marshal.loads", "shelve.open",
          "pandas.read_pickle"}
_ONLY_IN = {"joblib.load": ("heads/persistence.py", "_load_joblib")}
_NEED_WEIGHTS_ONLY = ("torch.load", "torch.hub.load_state_dict_from_url", ".get_state_dict")


def _aliases(tree: ast.AST) -> dict[str, str]:
    """Local name -> what it was imported as (``np`` -> ``numpy``, ``tl`` -> ``torch.load``)."""
    names: dict[str, str] = {}
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for a in node.names:
                names[a.asname or a.name.split(".")[0]] = a.name if a.asname else a.name.split(".")[0]
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            for a in node.names:
                names[a.asname or a.name] = f"{node.module}.{a.name}"
    return names


def _dotted(func: ast.AST) -> str:
    if isinstance(func, ast.Name):
        return func.id
    if isinstance(func, ast.Attribute):
        return f"{_dotted(func.value)}.{func.attr}"
    return "?"


def _kw_is(call: ast.Call, name: str, value) -> bool:
    return any(k.arg == name and isinstance(k.value, ast.Constant) and k.value.value == value
               for k in call.keywords)


def scan_source(source: str, filename: str) -> tuple[list[str], int]:
    """Findings in one module, and how many model-loading calls it checked."""
    tree = ast.parse(source, filename)
    aliases = _aliases(tree)
    uses_tar = any(v.split(".")[0] == "tarfile" for v in aliases.values())
    parents = {child: node for node in ast.walk(tree) for child in ast.iter_child_nodes(node)}
    findings, checked = [], 0
    for call in (n for n in ast.walk(tree) if isinstance(n, ast.Call)):
        raw = _dotted(call.func)
        head, _, rest = raw.partition(".")
        name = aliases.get(head, head) + (f".{rest}" if rest else "")
        where = f"{filename}:{call.lineno} {raw}(...)"
        if name == "numpy.load" or name.endswith(".numpy.load"):
            if not any(k.arg == "allow_pickle" for k in call.keywords) or _kw_is(call, "allow_pickle", False):
                continue
            findings.append(f"{where} may unpickle (allow_pickle)")
        elif any(name == n or (n.startswith(".") and name.endswith(n)) for n in _NEED_WEIGHTS_ONLY):
            checked += 1
            if not _kw_is(call, "weights_only", True):
                findings.append(f"{where} without weights_only=True")
        elif name in _NEVER:
            findings.append(f"{where} unpickles")
        elif name in _ONLY_IN:
            module, function = _ONLY_IN[name]
            node, inside = call, None
            while node in parents and inside is None:
                node = parents[node]
                inside = node.name if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) else None
            if not filename.endswith(module) or inside != function:
                findings.append(f"{where} outside {module}:{function}")
        elif name == "shutil.unpack_archive" or (uses_tar and raw.endswith((".extractall", ".extract"))):
            if not _kw_is(call, "filter", "data"):
                findings.append(f"{where} without filter='data' (members could escape the folder)")
    return findings, checked


def test_scanner_finds_each_kind_of_unsafe_load():
    bad = """
import torch, pickle, tarfile, shutil
import numpy as np
import joblib as jl
from torch import load as tload
torch.load("a")
torch.load("a", weights_only=False)
tload("a")
torch.hub.load_state_dict_from_url("u")
weights.get_state_dict(progress=False)
pickle.loads(b"")
jl.load("h")
np.load("x", allow_pickle=True)
tarfile.open("t").extractall("d")
shutil.unpack_archive("a.zip", "d")
"""
    findings, checked = scan_source(bad, "fxtl/other.py")
    assert [int(f.split(":")[1].split()[0]) for f in findings] == list(range(6, 16)), findings
    assert checked == 5
    good = """
import torch, joblib, tarfile
import numpy as np
torch.load("a", map_location="cpu", weights_only=True)
np.load("x")
tarfile.open("t").extractall("d", filter="data")
def _load_joblib(p):
    return joblib.load(p)
"""
    assert scan_source(good, "fxtl/heads/persistence.py") == ([], 1)
    assert scan_source(good, "fxtl/predict.py")[0] == ["fxtl/predict.py:8 joblib.load(...) outside heads/persistence.py:_load_joblib"]


def test_fxtl_never_loads_pickles_unsafely():
    findings, checked = [], 0
    for path in sorted((ROOT / "fxtl").rglob("*.py")):
        f, c = scan_source(path.read_text(), str(path.relative_to(ROOT)))
        findings += f
        checked += c
    assert findings == []
    assert checked >= 4  # backbones (weights, download), finetune (checkpoint, best model)


# ----------------------------------------------------------------------------- code in files
def _evil_head(run: Path, marker: Path, sidecar: str | None) -> Path:
    run.mkdir()
    (run / "head.joblib").write_bytes(pickle.dumps({"format": "fxtl-head", "pipeline": RunsCode(marker)}))
    if sidecar is not None:
        (run / "head.json").write_text(sidecar)
    return run


@pytest.mark.parametrize("sidecar", [
    None,         # no sidecar at all
    "genuine",    # the sidecar of a real head
    "{not json",  # a damaged sidecar
])
def test_head_that_would_run_code_is_refused_without_running_it(tmp_path, genuine, sidecar):
    """A pickle is never loaded without --trust, whatever its sidecar says (a usage error)."""
    run, cache = genuine
    marker = tmp_path / "pwned"
    text = (run / "head.json").read_text() if sidecar == "genuine" else sidecar
    evil = _evil_head(tmp_path / "evil", marker, text)
    r = CliRunner().invoke(cli, ["predict", str(evil), str(cache)])
    assert r.exit_code == 2 and "Traceback" not in r.output
    assert "'--trust'" in r.output and "pickle" in r.output and "run code" in r.output
    assert not marker.exists()


def test_trust_really_loads_the_pickle(tmp_path, genuine):
    """What the docs warn about: --trust unpickles the file, so its code runs (here: harmless)."""
    _, cache = genuine
    marker = tmp_path / "pwned"
    evil = _evil_head(tmp_path / "evil", marker, None)
    r = CliRunner().invoke(cli, ["predict", str(evil), str(cache), "--trust"])
    assert marker.exists()
    assert_one_line_error(r.exit_code, r.stderr, str(evil / "head.joblib"), "not an fxtl head")


def test_weights_file_that_would_run_code_is_refused(tmp_path):
    import torch

    marker = tmp_path / "pwned"
    weights = tmp_path / "evil.pth"
    torch.save({"conv1.weight": RunsCode(marker)}, weights)
    data = tmp_path / "data"
    for cls in ("a", "b"):
        (data / cls).mkdir(parents=True)
        img.photo((16, 16)).save(data / cls / "1.png")
    r = CliRunner().invoke(cli, ["extract", str(data), "--backbone", f"resnet18={weights}",
                                 "--cache-dir", str(tmp_path / "cache")])
    assert_one_line_error(r.exit_code, r.stderr, str(weights), "cannot load weights")
    assert not marker.exists()


# ----------------------------------------------------------------------------- manifest paths
@pytest.fixture()
def rooted(tmp_path):
    """data/imgs/{1,2}.png, data/set.csv, and outside/pic.png next to data/."""
    root = tmp_path / "data"
    (root / "imgs").mkdir(parents=True)
    (tmp_path / "outside").mkdir()
    for p in (root / "imgs" / "1.png", root / "imgs" / "2.png", tmp_path / "outside" / "pic.png"):
        img.photo((16, 16)).save(p)
    return root


@pytest.mark.parametrize("path", [
    "../outside/pic.png", "imgs/../../outside/pic.png", "./imgs/./../../outside/pic.png",
    "{outside}/pic.png",     # absolute, outside
    "{root}/imgs/2.png",     # absolute, even inside: a manifest's paths are relative
])
def test_manifest_paths_cannot_escape_the_root(rooted, path):
    path = path.format(root=rooted, outside=rooted.parent / "outside")
    m = rooted / "set.csv"
    m.write_text(f"imgs/1.png,cat\n{path},dog\n")
    with pytest.raises(DataError, match="line 2: path .* escapes the manifest's folder") as exc:
        discover(m)
    assert str(m) in str(exc.value)


def test_manifest_paths_are_normalised_and_symlinks_inside_are_followed(rooted):
    """Decision: a symlink the user placed in their own dataset is followed (as in folder
    layouts); the check is on the manifest's text, which must stay below its folder."""
    os.symlink(rooted.parent / "outside", rooted / "linked")
    m = rooted / "set.csv"
    m.write_text("./imgs/1.png,cat\nimgs/../imgs/2.png,cat,val\nlinked/pic.png,dog\n")
    s = discover(m)
    assert [x.path for x in s.samples] == ["imgs/1.png", "linked/pic.png", "imgs/2.png"]
    assert s.abspath(s.samples[1]) == rooted / "linked" / "pic.png"  # read through the user's link


_WALK = r"""
import json, sys
from fxtl.data.discovery import discover
from fxtl.prediction import collect_images
root = sys.argv[1]
s = discover(root)
images, _, errors = collect_images([root])
print(json.dumps({"classes": s.class_names, "discovered": [x.path for x in s.samples],
                  "collected": [str(p) for p in images], "errors": errors}))
"""


def test_symlink_loops_do_not_hang_discovery_or_predict(tmp_path):
    """Two loops in one folder make a plain os.walk(followlinks=True) visit 2**40 paths."""
    root = tmp_path / "data"
    for rel in ("a/1.png", "b/2.png", "b/sub/3.png"):
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        img.photo((16, 16)).save(root / rel)
    os.symlink(root / "a", root / "a" / "self1")
    os.symlink(root / "a", root / "a" / "self2")
    os.symlink(root / "b", root / "b" / "sub" / "back")
    os.symlink(root / "b" / "sub", root / "b" / "sub" / "again")
    proc = run_fxtl(root, code=_WALK, timeout=60)  # a hang fails here, it does not stall CI
    assert proc.returncode == 0, proc.stderr[-2000:]
    got = json.loads(proc.stdout)
    assert got["classes"] == ["a", "b"]
    assert got["discovered"] == ["a/1.png", "b/2.png", "b/sub/3.png"]
    assert got["collected"] == [str(root / p) for p in ("a/1.png", "b/2.png", "b/sub/3.png")]
    assert got["errors"] == []


def test_no_archive_is_ever_unpacked():
    """Datasets are folders or manifests; fxtl unpacks no archive, so no archive member can land
    outside a folder. If that changes, the scan above insists on tarfile's "data" filter."""
    imports = set()
    for path in (ROOT / "fxtl").rglob("*.py"):
        imports |= {v.split(".")[0] for v in _aliases(ast.parse(path.read_text())).values()}
    assert not imports & {"tarfile", "zipfile"}, imports
