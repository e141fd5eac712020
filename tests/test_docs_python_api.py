"""docs/python-api.md runs as written: its ```python blocks, in order, in one namespace, in a
fresh folder (the blocks generate their own images and assert what they show)."""
from __future__ import annotations

import re
from pathlib import Path

DOC = Path(__file__).resolve().parent.parent / "docs" / "python-api.md"


def _blocks(text: str) -> list[str]:
    return re.findall(r"^```python\n(.*?)^```", text, flags=re.S | re.M)


def test_the_walk_through_runs(tmp_path, monkeypatch):
    blocks = _blocks(DOC.read_text(encoding="utf-8"))
    assert len(blocks) >= 6
    monkeypatch.chdir(tmp_path)
    namespace: dict = {"__name__": "python_api_walkthrough"}
    for i, code in enumerate(blocks):
        exec(compile(code, f"{DOC.name} block {i + 1}", "exec"), namespace)
    assert (tmp_path / "model.onnx").is_file() and (tmp_path / "cache" / "runs").is_dir()
