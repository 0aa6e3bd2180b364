"""The whole suite: shared fixtures, thread count, log capture, and the tiers run cheapest first.

Tiers are folders: ``core/`` (no ComfyUI), ``comfyui/`` (a ComfyUI checkout in ``COMFYUI_DIR``), ``browser/``
(that and headless Chromium). Test modules have no ``__init__.py``, so their file names are unique across tiers.
"""

import logging
from pathlib import Path

import pytest
import torch

pytest_plugins = ["support.fixtures"]

TIERS = ("core", "comfyui", "browser")

torch.set_num_threads(max(1, min(2, torch.get_num_threads())))


def pytest_collection_modifyitems(items):
    """Core first, the browser last: a failure in a cheap tier shows before the slow ones start."""
    here = Path(__file__).parent

    def tier(item) -> int:
        try:
            folder = item.path.relative_to(here).parts[0]
        except ValueError:
            return len(TIERS)
        return TIERS.index(folder) if folder in TIERS else len(TIERS)

    items.sort(key=tier)  # stable: the order inside a tier stays as collected


@pytest.fixture(autouse=True)
def _pack_logs(caplog):
    caplog.set_level(logging.INFO, logger="ip2p_nodes")
