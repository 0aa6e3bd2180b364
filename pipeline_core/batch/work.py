"""One row edited, picture file in, PNG bytes out: the code every engine's workers run.

Each task is edited by its own :func:`..editing.edit.edit` call with a one-item plan. Batching rows together would
be faster on a GPU, but a row's picture would then depend on which rows shared its batch (batched kernels round
differently, ~1e-5), and a resumed or redistributed job must give the same bytes as an uninterrupted one. Within
the row the guidance passes are still batched, as in every edit.

Everything here is picklable plain data, so Ray can ship a :class:`JobSpec` to its actors and tasks to them.
"""

from __future__ import annotations

import io
import logging
from dataclasses import asdict, dataclass

import numpy as np

from ..editing.settings import EditSettings
from ..errors import IP2PError
from ..models.loading import ModelSource
from ..models.lora import LoraRef

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class JobSpec:
    """What every worker needs to edit any row of a job: the model and the job-wide settings, all checked."""

    source: ModelSource
    precision: str  # resolved: fp32 / fp16 / bf16
    device: str
    settings: EditSettings
    guidance: tuple[float | None, float | None]  # the command line's; None: the model family's default
    negative: str = ""
    loras: tuple[LoraRef, ...] = ()


@dataclass(frozen=True)
class Task:
    """One row to edit, as sent to a worker (paths as text: workers may run on other machines)."""

    number: int
    key: str
    image: str
    instruction: str
    seed: int
    mask: str | None = None
    text_guidance: float | None = None  # the row's own; None: the job's
    image_guidance: float | None = None

    def to_json(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class Outcome:
    """What a worker hands back: the picture as PNG bytes and the guidance it used, or why the row failed."""

    number: int
    key: str
    png: bytes | None = None
    text_guidance: float | None = None
    image_guidance: float | None = None
    error: str | None = None


def load_model(spec: JobSpec, cache=None):
    """The job's model (with its LoRA stack) from ``cache`` (the pack's shared one by default)."""
    from ..models.cache import MODEL_CACHE

    cache = MODEL_CACHE if cache is None else cache
    return cache.get(cache.key_for(spec.source, spec.precision, spec.device, spec.loras))


def png_bytes(image) -> bytes:
    """An ``[H,W,3]`` IMAGE (0..1) as PNG bytes, rounded to 8 bits exactly as :func:`..editing.images.save_image`."""
    from PIL import Image

    from ..editing.images import to_unit_float

    arr = (to_unit_float(image.detach().cpu()).numpy() * 255.0).round().astype(np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(arr).save(buffer, format="PNG")
    return buffer.getvalue()


def _edit(model, spec: JobSpec, task: Task) -> Outcome:
    from ..editing.conditioning import encode_instruction
    from ..editing.edit import edit
    from ..editing.images import load_image
    from ..editing.seeds import PlanItem, SeedPlan
    from ..errors import InputError

    image = load_image(task.image)
    mask = None
    if task.mask is not None:
        mask = load_image(task.mask)[..., 0]  # grey value, 1 = edit, as `ip2p-edit edit --mask` reads it
        if mask.shape[1:] != image.shape[1:3]:
            raise InputError(f"the mask is {mask.shape[2]}x{mask.shape[1]} but the picture is "
                             f"{image.shape[2]}x{image.shape[1]}; give the mask made for this picture")
    text_guidance = task.text_guidance if task.text_guidance is not None else spec.guidance[0]
    image_guidance = task.image_guidance if task.image_guidance is not None else spec.guidance[1]
    default_text, default_image = model.family.default_guidance
    text_guidance = default_text if text_guidance is None else text_guidance
    image_guidance = default_image if image_guidance is None else image_guidance
    s = spec.settings
    cond = encode_instruction(model, task.instruction, spec.negative)
    result = edit(model, cond, image, SeedPlan((PlanItem(task.seed),)), steps=s.steps, text_guidance=text_guidance,
                  image_guidance=image_guidance, scheduler=s.scheduler, max_batch=1, mask=mask, feather=s.feather,
                  crop_to_mask=s.crop_to_mask, denoise=s.denoise, working_resolution=s.working_resolution,
                  speed=s.speed, fast_interval=s.fast_interval, vram=s.vram)
    return Outcome(task.number, task.key, png_bytes(result.images[0]), text_guidance, image_guidance)


def edit_task(model, spec: JobSpec, task: Task) -> Outcome:
    """Edit one row; a failure of this row (a picture that does not decode, a mask of another size, anything
    the sampler refuses) comes back as an outcome with the reason, never stopping the job."""
    try:
        return _edit(model, spec, task)
    except IP2PError as exc:
        return Outcome(task.number, task.key, error=str(exc))
    except Exception as exc:  # noqa: BLE001 - one row must not stop ten thousand; the reason is reported
        log.debug("batch: row %d failed", task.number, exc_info=True)
        return Outcome(task.number, task.key, error=f"{type(exc).__name__}: {exc}")
