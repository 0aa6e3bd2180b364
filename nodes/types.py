"""The pack's socket types, declared once so every node links the same ones."""

from comfy_api.latest import io

CATEGORY = "InstructPix2Pix"

ModelType = io.Custom("IP2P_MODEL")
"""A loaded InstructPix2Pix model: the ``pipeline_core.ModelKey`` of an entry in ``MODEL_CACHE``."""

ConditioningType = io.Custom("IP2P_CONDITIONING")
"""Encoded instruction + negative prompt: a ``pipeline_core.Conditioning`` tied to the model that made it."""

SeedPlanType = io.Custom("IP2P_SEED_PLAN")
"""Which (seed, text guidance, image guidance) items the sampler produces: a ``pipeline_core.SeedPlan``."""

ClipScorerType = io.Custom("IP2P_CLIP_SCORER")
"""A CLIP loaded for scoring edits: a ``pipeline_core.scoring.ClipScorer``."""

ScoresType = io.Custom("IP2P_EDIT_SCORES")
"""CLIP scores of a batch of edits with their labels: a ``pipeline_core.scoring.ScoredEdits``."""
