"""What the diffusion sample x0 means for a model, and what its network predicts; recorded in
checkpoints and artifacts.

``type`` (what x0 is):
- ``official``: x0 is the HR image itself in [0, 1] (BI-DiffSR / SR3 as released); the
  official checkpoints use it.
- ``residual``: x0 = residual_scale * (HR - cond), the HR detail missing from the bicubic
  condition, scaled into the [-1, 1] clipping range. A small model learns it far faster
  (docs/TRAINING.md): at init its output is already the bicubic image.

``prediction`` (what the network outputs, as diffusers' ``prediction_type``):
- ``epsilon``: the noise (the paper's objective; every sampler step adds its error);
- ``sample``: x0 itself. With a zero-initialised last conv the network starts at x0 = 0, i.e.
  at the condition for ``residual``, and a few DDIM steps suffice (docs/TRAINING.md).

``lr_correction`` (``residual`` x0 models): the network outputs three more channels, c, and
back-projection aims at ``lr + down(c) / residual_scale`` instead of the LR as given. Why:
back-projection imposes the LR's low frequencies on the output, and an LR that is not the
bicubic downscale it assumes (JPEG blocking, another downscaler) has the wrong ones; on JPEG'd
validation photos, back-projecting the same output onto the clean LR instead of the JPEG'd one
scores 1.9 dB higher (docs/EXPERIMENTS.md). The network learns the correction with the rest, and
starts at c = 0, the plain back-projection.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Literal

import numpy as np

FormulationType = Literal["official", "residual"]
FORMULATIONS = ("official", "residual")
PredictionType = Literal["epsilon", "sample"]
PREDICTIONS = ("epsilon", "sample")


@dataclass(frozen=True)
class Formulation:
    type: FormulationType = "official"
    residual_scale: float = 4.0
    prediction: PredictionType = "epsilon"
    lr_correction: bool = False

    def __post_init__(self) -> None:
        if self.type not in FORMULATIONS:
            raise ValueError(f"unknown formulation {self.type!r}; valid: {', '.join(FORMULATIONS)}")
        if not self.residual_scale > 0:
            raise ValueError(f"residual_scale must be > 0, got {self.residual_scale}")
        if self.prediction not in PREDICTIONS:
            raise ValueError(f"unknown prediction {self.prediction!r}; valid: {', '.join(PREDICTIONS)}")
        if not isinstance(self.lr_correction, bool):
            raise ValueError(f"lr_correction must be true or false, got {self.lr_correction!r}")
        if self.lr_correction and (self.type, self.prediction) != ("residual", "sample"):
            raise ValueError("lr_correction needs the residual formulation predicting the sample (x0)")

    def to_dict(self) -> dict:
        """Only what differs from the paper is written, so older checkpoints and artifacts
        (which know no ``prediction``) keep their exact bytes."""
        d = asdict(self) if self.type == "residual" else {"type": "official"}
        if self.prediction == "epsilon":
            d.pop("prediction", None)
        else:
            d["prediction"] = self.prediction
        if not self.lr_correction:
            d.pop("lr_correction", None)
        return d

    @classmethod
    def from_dict(cls, d: dict | None) -> "Formulation":
        return cls() if not d else cls(**d)

    def target(self, hr: np.ndarray, cond: np.ndarray) -> np.ndarray:
        """The x0 a model is trained to produce (works on numpy arrays and torch tensors)."""
        return hr if self.type == "official" else (hr - cond) * self.residual_scale

    def to_image(self, x0: np.ndarray, cond: np.ndarray) -> np.ndarray:
        """Sampled x0 -> image in [0, 1] (unclamped; callers clamp)."""
        return x0 if self.type == "official" else cond + x0 / self.residual_scale

    @property
    def output_channels(self) -> int:
        """Channels of the network's output: x0 (3), then the LR correction (3) if it has one."""
        return 6 if self.lr_correction else 3

    def lr_target(self, lr: np.ndarray, correction_down: np.ndarray) -> np.ndarray:
        """The LR back-projection aims at, given the correction channels already downscaled to
        the LR's size (numpy arrays or torch tensors)."""
        return lr + correction_down / self.residual_scale
