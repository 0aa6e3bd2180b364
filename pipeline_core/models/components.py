"""The loaded modules of one model, as every family hands them to the editing code."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch

from .precision import Precision

if TYPE_CHECKING:
    from .families.base import Family
    from .loading import ModelSource


@dataclass
class IP2PComponents:
    """The modules of one model, on one device, in the chosen precision.

    ``family`` names the :mod:`.families` entry that loaded them; everything family-specific (text encoding,
    image-latent scaling, schedulers, single-file layout) is asked of :attr:`spec`, never decided here.
    """

    unet: Any
    vae: Any
    text_encoder: Any
    tokenizer: Any
    scheduler_config: dict[str, Any]
    precision: Precision
    device: torch.device
    source: "ModelSource"
    family: str = "sd15"
    text_encoder_2: Any = None  # SDXL: CLIP-G with projection
    tokenizer_2: Any = None  # SDXL: CLIP-G's tokenizer (pads with id 0)
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def spec(self) -> "Family":
        from . import families

        return families.get(self.family)

    @property
    def vae_scale_factor(self) -> int:
        return 2 ** (len(self.vae.config.block_out_channels) - 1)

    @property
    def scaling_factor(self) -> float:
        return float(self.vae.config.scaling_factor)

    @property
    def max_text_tokens(self) -> int:
        return int(self.text_encoder.config.max_position_embeddings)

    @property
    def working_resolution(self) -> int:
        """The side of the square area the model was trained at: its UNet's sample size in pixels.

        512 for SD1.5, 768 for SDXL-IP2P-768, 1024 for CosXL, 32 for the toy model. Falls back to the family's
        default where a config has no sample size.
        """
        sample = getattr(self.unet.config, "sample_size", None)
        if isinstance(sample, (list, tuple)):
            sample = max(sample)
        if isinstance(sample, int) and sample > 0:
            return int(sample) * self.vae_scale_factor
        return self.spec.default_resolution

    def modules(self) -> dict[str, torch.nn.Module]:
        out = {"unet": self.unet, "vae": self.vae, "text_encoder": self.text_encoder}
        if self.text_encoder_2 is not None:
            out["text_encoder_2"] = self.text_encoder_2
        return out
