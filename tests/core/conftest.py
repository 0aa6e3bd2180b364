"""Fixtures of the core tier: the pack's model cache and the tiny models (one per family) loaded through it, in fp32."""

import pytest

from ip2p_nodes.pipeline_core import ModelCache, ModelSource, encode_instruction


@pytest.fixture
def cache() -> ModelCache:
    return ModelCache()


@pytest.fixture
def fp32_model(cache, tiny_folder):
    return cache.get(cache.key_for(ModelSource("diffusers", str(tiny_folder)), "fp32", "cpu"))


@pytest.fixture
def sdxl_model(cache, sdxl_folder):
    return cache.get(cache.key_for(ModelSource("diffusers", str(sdxl_folder)), "fp32", "cpu"))


@pytest.fixture
def cosxl_model(cache, cosxl_folder):
    return cache.get(cache.key_for(ModelSource("diffusers", str(cosxl_folder)), "fp32", "cpu"))


@pytest.fixture(params=["sd15", "sdxl", "cosxl"])
def family_model(request):
    """The tiny fp32 model of each family in turn (SD1.5, SDXL-IP2P, CosXL Edit), for behaviour every family keeps."""
    return request.getfixturevalue({"sd15": "fp32_model", "sdxl": "sdxl_model", "cosxl": "cosxl_model"}[request.param])


@pytest.fixture
def family_cond(family_model):
    return encode_instruction(family_model, "make it winter")


@pytest.fixture
def no_model_load(monkeypatch):
    """Loading any model fails the test: the error under test must come before it."""

    def refuse(self, key):
        raise AssertionError(f"{key.describe()} was loaded before the arguments were checked")

    monkeypatch.setattr(ModelCache, "get", refuse)
