"""The provenance record names the code and the exact model file a result came from."""

from __future__ import annotations

import hashlib
import re

from bbct.golden.provenance import model_sha256, provenance


def test_provenance_names_model_and_code(tmp_path):
    m = tmp_path / "m.onnx"
    m.write_bytes(b"not really a model, only bytes to hash")
    rec = provenance(m)
    assert rec["model_sha256"] == hashlib.sha256(m.read_bytes()).hexdigest()
    assert re.fullmatch(r"\d+\.\d+\.\d+", rec["bbct_version"])
    assert rec["bbct_commit"] is None or re.fullmatch(r"[0-9a-f]{40}(-dirty)?", rec["bbct_commit"])
    assert rec["libraries"]["numpy"]
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ", rec["created_utc"])


def test_sha_follows_the_file_content(tmp_path):
    m = tmp_path / "m.onnx"
    m.write_bytes(b"a")
    first = model_sha256(m)
    m.write_bytes(b"bb")  # new size: the cache key changes with the file
    assert model_sha256(m) != first
    assert "model" not in provenance()
