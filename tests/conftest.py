import os

import pytest

from bpt_ds.tiny import build_tiny_backbone


@pytest.fixture(scope="session")
def tiny_backbone_path(tmp_path_factory):
    """The tiny backbone, built once per session; set BPT_DS_CACHE to reuse it across sessions."""
    cache = os.environ.get("BPT_DS_CACHE") or tmp_path_factory.getbasetemp() / "cache"
    return build_tiny_backbone(cache, progress=False)


def pytest_configure(config):
    config.addinivalue_line("markers", "distributed: launches real multi-process jobs with the deepspeed launcher")
