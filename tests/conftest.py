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
    config.addinivalue_line("markers", "slow: takes more than a few seconds (every distributed test is slow); "
                                       "`pytest -m \"not slow\"` is the fast loop")


def pytest_collection_modifyitems(config, items):
    # Every multi-process job is slow: `-m "not slow"` leaves them all out without a second mark to keep.
    for item in items:
        if item.get_closest_marker("distributed") is not None and item.get_closest_marker("slow") is None:
            item.add_marker(pytest.mark.slow)
