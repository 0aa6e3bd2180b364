"""Fixtures of the core tier: the pack's model cache and the tiny model loaded through it, in fp32."""

import pytest

from ip2p_nodes.pipeline_core import ModelCache, ModelSource


@pytest.fixture
def cache() -> ModelCache:
    return ModelCache()


@pytest.fixture
def fp32_model(cache, tiny_folder):
    return cache.get(cache.key_for(ModelSource("diffusers", str(tiny_folder)), "fp32", "cpu"))
