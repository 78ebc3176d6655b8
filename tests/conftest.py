"""Shared fixtures: tiny random BERT exports and the real MiniLM prepared once per session."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest
from hypothesis import HealthCheck, settings

# Properties are about bits, not time: a shared or loaded machine must not fail a test on
# hypothesis's per-example deadline (an explicit @settings still sets its own example count).
settings.register_profile("bbct", deadline=None, suppress_health_check=[HealthCheck.too_slow])
settings.load_profile("bbct")

sys.path.insert(0, str(Path(__file__).parent))

from bert_exports import export_tiny  # noqa: E402


@pytest.fixture(scope="session")
def export_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("exports")


@pytest.fixture(scope="session")
def tiny_bert_onnx(export_dir) -> Path:
    """A tiny random BertForSequenceClassification (TorchScript export, opset 17)."""
    return export_tiny(export_dir)


@pytest.fixture(scope="session")
def real_home(tmp_path_factory) -> Path:
    """A BBCT_HOME with the real RT data and MiniLM encoder: the user's cache when it is
    prepared, else prepared here (data + encoder export, ~15 s; no fine-tuning)."""
    from bbct.golden.paths import bbct_home
    from bbct.golden.prepare import is_prepared, prepare

    if is_prepared(bbct_home(), ("data", "encoder")):
        return bbct_home()
    home = tmp_path_factory.mktemp("bbct_home")
    prepare(home, finetune=False, progress=False)
    return home


def pytest_configure(config):
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
