"""IP2P Load CLIP Scorer, IP2P Edit Score and IP2P Pick Best: measuring edits as the paper does, in the graph."""

from __future__ import annotations

import comfy.model_management as mm
import torch
from comfy_api.latest import io

from ..pipeline_core.errors import InputError
from ..pipeline_core.grid import split_labels
from ..pipeline_core.scoring import CLIP_CACHE, DEFAULT_THRESHOLD, ClipScorer, ScoredEdits, pick_best, score_edits
from ..pipeline_core.scoring.metrics import report
from ..pipeline_core.scoring.pick import ranking_report
from . import clip_paths
from .types import CATEGORY, ClipScorerType, ConditioningType, ScoresType


class IP2PClipScorerLoader(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="IP2PClipScorerLoader",
            display_name="IP2P Load CLIP Scorer",
            category=CATEGORY,
            description=(
                "Loads a CLIP (image and text towers) to score edits the way the InstructPix2Pix paper does: "
                "how much of the input an edit kept, and whether it changed in the direction the text asks. "
                "Reads transformers CLIP folders from models/clip (or models/text_encoders) and models/ip2p_clip, "
                "or the pack's embedded toy CLIP for the shapes world. Nothing is downloaded unless you type a "
                "hub_id."
            ),
            inputs=[
                io.Combo.Input(
                    "clip",
                    options=clip_paths.list_choices(),
                    tooltip=(
                        "A transformers CLIP folder (config.json, model.safetensors, tokenizer and "
                        "preprocessor_config.json), e.g. a copy of openai/clip-vit-large-patch14, the CLIP the "
                        "paper scores with. Single text-encoder files such as clip_l.safetensors cannot see "
                        "pictures and are not listed. The last entry, toy-clip, is shipped with the pack: it only "
                        "knows the toy model's 32x32 shapes pictures. Press R after adding folders."
                    ),
                ),
                io.String.Input(
                    "hub_id",
                    default="",
                    tooltip=(
                        "Leave empty to use 'clip'. A Hugging Face id such as openai/clip-vit-large-patch14 is "
                        "downloaded once into the Hugging Face cache (the only download of scoring); a local "
                        "folder path also works, and 'toy' is the embedded toy CLIP."
                    ),
                ),
            ],
            outputs=[
                ClipScorerType.Output(
                    display_name="scorer",
                    tooltip="The loaded CLIP; connect it to IP2P Edit Score.",
                ),
            ],
        )

    @classmethod
    def execute(cls, clip: str, hub_id: str) -> io.NodeOutput:
        return io.NodeOutput(CLIP_CACHE.get(clip_paths.resolve(clip, hub_id), mm.get_torch_device()))


class IP2PEditScore(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="IP2PEditScore",
            display_name="IP2P Edit Score",
            category=CATEGORY,
            description=(
                "Scores every edited picture against the input it was made from with CLIP: clip_image (how much "
                "was kept, 1 = unchanged), clip_direction (did the picture change the way the text asks: the "
                "paper's directional similarity when both captions are given, else measured against the "
                "instruction) and clip_text (does the result match the output caption or instruction). The "
                "labels output puts the scores under each cell of a labelled grid."
            ),
            inputs=[
                ClipScorerType.Input("scorer", tooltip="The CLIP from IP2P Load CLIP Scorer."),
                io.Image.Input(
                    "input",
                    tooltip=(
                        "The picture(s) that were edited, as given to the sampler. With several inputs, the edits "
                        "are matched in the sampler's order (all edits of input 1 first)."
                    ),
                ),
                io.Image.Input(
                    "edited",
                    tooltip="The sampler's edited pictures (a seed or guidance sweep: every picture is scored).",
                ),
                io.String.Input(
                    "instruction",
                    default="",
                    tooltip=(
                        "The instruction the edits followed, used when no captions are given. Empty: taken from the "
                        "connected conditioning."
                    ),
                ),
                io.String.Input(
                    "caption_before",
                    default="",
                    tooltip=(
                        "Optional: a caption of the input picture ('a photo of a house in summer'). With "
                        "caption_after, clip_direction is exactly the paper's metric."
                    ),
                ),
                io.String.Input(
                    "caption_after",
                    default="",
                    tooltip="Optional: a caption of the wanted result ('a photo of a house in winter').",
                ),
                ConditioningType.Input(
                    "conditioning",
                    optional=True,
                    tooltip="Optional: the IP2P Instruction output, whose instruction is used when 'instruction' "
                            "is empty.",
                ),
                io.String.Input(
                    "labels",
                    force_input=True,
                    optional=True,
                    tooltip="Optional: the sampler's labels (seed and guidance per picture), kept beside the scores.",
                ),
            ],
            outputs=[
                ScoresType.Output(display_name="scores", tooltip="All scores with their labels, for IP2P Pick Best."),
                io.Float.Output(
                    display_name="clip_direction", is_output_list=True,
                    tooltip="clip_direction per edited picture (higher = changed more the way asked; -1..1).",
                ),
                io.Float.Output(
                    display_name="clip_image", is_output_list=True,
                    tooltip="clip_image per edited picture (1 = the input unchanged; the paper's edits keep 0.75-0.9).",
                ),
                io.String.Output(display_name="report", tooltip="One line per edited picture with its three scores."),
                io.String.Output(
                    display_name="labels",
                    tooltip="The labels with each picture's scores appended: connect to IP2P Labelled Grid's labels.",
                ),
            ],
        )

    @classmethod
    def execute(cls, scorer: ClipScorer, input: torch.Tensor, edited: torch.Tensor, instruction: str,
                caption_before: str, caption_after: str, conditioning=None, labels: str | None = None
                ) -> io.NodeOutput:
        if not isinstance(scorer, ClipScorer):
            raise InputError(f"expected a CLIP from IP2P Load CLIP Scorer, got {type(scorer).__name__}")
        if not instruction.strip() and conditioning is not None:
            instruction = conditioning.instruction
        scores = score_edits(scorer, input, edited, instruction, caption_before, caption_after)
        lines = split_labels(labels, len(scores))
        scored = ScoredEdits(scores, lines)
        return io.NodeOutput(scored, [s.clip_direction for s in scores], [s.clip_image for s in scores],
                             report(scores, lines if any(lines) else None), scored.scored_labels())


class IP2PPickBest(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="IP2PPickBest",
            display_name="IP2P Pick Best",
            category=CATEGORY,
            description=(
                "Picks the best edit of a sweep by the paper's trade-off: the strongest edit in the asked "
                "direction (highest clip_direction) among those that still keep the input (clip_image at least "
                "the threshold). One pick per input picture, with its seed and guidance label and the full ranking."
            ),
            inputs=[
                io.Image.Input("edited", tooltip="The same edited pictures that IP2P Edit Score scored."),
                ScoresType.Input("scores", tooltip="The scores output of IP2P Edit Score."),
                io.Float.Input(
                    "threshold",
                    default=DEFAULT_THRESHOLD,
                    min=-1.0,
                    max=1.0,
                    step=0.01,
                    tooltip=(
                        "Least clip_image an edit must keep to be picked. Higher keeps more of the input and "
                        "prefers gentler edits; lower allows bolder ones. 0.8 suits a ViT-L/14 on photos; 0.1 "
                        "suits the toy CLIP (its space is coarse). If no edit keeps this much, the one closest to "
                        "the input is picked."
                    ),
                ),
            ],
            outputs=[
                io.Image.Output(display_name="best", tooltip="The best edit of each input picture."),
                io.String.Output(
                    display_name="label",
                    tooltip="The best edit's label (seed and guidance, to re-make it alone) and its scores.",
                ),
                io.String.Output(display_name="ranking", tooltip="Every edit, best first, with its scores."),
            ],
        )

    @classmethod
    def execute(cls, edited: torch.Tensor, scores: ScoredEdits, threshold: float) -> io.NodeOutput:
        if not isinstance(scores, ScoredEdits):
            raise InputError(f"expected the scores output of IP2P Edit Score, got {type(scores).__name__}")
        if edited.shape[0] != len(scores.scores):
            raise InputError(f"{edited.shape[0]} pictures but {len(scores.scores)} scores; connect the pictures "
                             "that IP2P Edit Score scored")
        rankings = pick_best(scores.scores, threshold)
        best = [r.best for r in rankings]
        labels = [scores.labels[i] or f"edit {i + 1}" for i in best]
        label = "\n".join(f"{labels[k]} · {scores.scores[i].label()}" for k, i in enumerate(best))
        ranking = ranking_report(rankings, scores.scores, [lab or f"edit {i + 1}" for i, lab in
                                                           enumerate(scores.labels)], threshold)
        return io.NodeOutput(edited[best], label, ranking)
