"""IP2P Seed Batch: several seeds, optionally crossed with guidance values, for one sampler run."""

from __future__ import annotations

from comfy_api.latest import io

from ..pipeline_core import make_plan
from ..pipeline_core.editing.seeds import MAX_SEED, SEED_MODES, parse_values
from .types import CATEGORY, SeedPlanType

MAX_COUNT = 64


class IP2PSeedPlan(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="IP2PSeedPlan",
            display_name="IP2P Seed Batch",
            category=CATEGORY,
            description=(
                "Makes several variations in one run: N seeds (fixed, counting up, or random), optionally crossed "
                "with lists of text and image guidance values to compare settings side by side. Each picture "
                "depends only on its own seed and values, so any one can be re-made alone later."
            ),
            # Two random plans in one graph must not be merged into one by ComfyUI's cache.
            not_idempotent=True,
            inputs=[
                io.Int.Input(
                    "seed",
                    default=0,
                    min=0,
                    max=MAX_SEED,
                    control_after_generate=True,
                    tooltip=(
                        "First seed (fixed, increment). Ignored in random mode, where the drawn seeds are "
                        "reported."
                    ),
                ),
                io.Int.Input(
                    "count",
                    default=4,
                    min=1,
                    max=MAX_COUNT,
                    tooltip=(
                        "How many seeds. Outputs = count x text values x image values per input image; each "
                        "costs a full sampling run."
                    ),
                ),
                io.Combo.Input(
                    "mode",
                    options=list(SEED_MODES),
                    default="increment",
                    tooltip=(
                        "increment: seed, seed+1, ... (re-make item k with seed+k). fixed: the same seed every "
                        "time, to compare guidance values only. random: new seeds on every queue, listed in "
                        "'report' so a good one can be pinned."
                    ),
                ),
                io.String.Input(
                    "text_guidance_values",
                    default="",
                    tooltip=(
                        "Optional comma-separated text guidance values, e.g. '5, 7.5, 10' (useful 3..12). Each "
                        "seed is run with each value; empty uses the sampler's text_guidance."
                    ),
                ),
                io.String.Input(
                    "image_guidance_values",
                    default="",
                    tooltip=(
                        "Optional comma-separated image guidance values, e.g. '1.2, 1.5, 2' (useful 1..2.5: higher "
                        "keeps more of the input). Empty uses the sampler's image_guidance."
                    ),
                ),
            ],
            outputs=[
                SeedPlanType.Output(
                    display_name="plan",
                    tooltip="Connect to the sampler's 'plan' input; it replaces the sampler's seed and guidance.",
                ),
                io.String.Output(
                    display_name="report",
                    tooltip=(
                        "One line per planned picture: its seed and guidance values (the drawn seeds in random "
                        "mode)."
                    ),
                ),
            ],
        )

    @classmethod
    def fingerprint_inputs(cls, mode: str = "increment", **kwargs):
        # NaN never equals itself, so ComfyUI re-runs a random plan on every queue instead of reusing it.
        return float("nan") if mode == "random" else mode

    @classmethod
    def execute(
        cls, seed: int, count: int, mode: str, text_guidance_values: str, image_guidance_values: str
    ) -> io.NodeOutput:
        plan = make_plan(
            seed,
            count,
            mode,
            parse_values(text_guidance_values, "text_guidance_values"),
            parse_values(image_guidance_values, "image_guidance_values"),
        )
        return io.NodeOutput(plan, plan.describe())
