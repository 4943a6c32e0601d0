"""Image teachers read from ncnn files (models.teachers) and image distillation in training."""
import json
import struct

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from bidiff.models import create_model
from bidiff.models.projection import back_project
from bidiff.models.teachers import (SRMD_BICUBIC_MAP, ImageTeacher, SrmdTeacher, Waifu2xTeacher,
                                    load_image_teacher, read_ncnn)
from bidiff.models.train import TrainConfig, diffusion_loss, train
from bidiff.runtime.schedule import alphas_cumprod
from test_distillation import X0, _batch

FP16_TAG = 0x01306B47


def _write_ncnn(folder, stem, layers):
    """ncnn files for ``layers``: (kind, {param: value}, weight [out, in, k, k] or None, bias, fp16)."""
    lines, blob, data = [], "in", b""
    for i, (kind, params, weight, bias, fp16) in enumerate(layers):
        out = f"b{i}"
        lines.append(f"{kind} l{i} 1 1 {blob} {out} " + " ".join(f"{k}={v}" for k, v in params.items()))
        blob = out
        if weight is not None:
            w = weight.numpy().ravel()
            data += struct.pack("<I", FP16_TAG) + w.astype(np.float16).tobytes() if fp16 else \
                struct.pack("<I", 0) + w.astype(np.float32).tobytes()
            data += bias.numpy().astype(np.float32).tobytes()
    text = f"7767517\n{len(layers) + 1} {len(layers) + 1}\nInput in 0 1 in\n" + "\n".join(lines) + "\n"
    (folder / f"{stem}.param").write_text(text)
    (folder / f"{stem}.bin").write_bytes(data)
    return folder / f"{stem}.param", folder / f"{stem}.bin"


def _conv(cin, cout, k, seed, **params):
    g = torch.Generator().manual_seed(seed)
    w, b = torch.randn(cout, cin, k, k, generator=g) * 0.3, torch.randn(cout, generator=g) * 0.1
    return {"0": cout, "1": k, "5": 1, "6": w.numel(), **params}, w, b


def test_read_ncnn_convolutions_activations_and_pixel_shuffle(tmp_path):
    p1, w1, b1 = _conv(3, 4, 3, 0, **{"4": 1, "9": 2, "-23310": "1,0.200000"})
    p2, w2, b2 = _conv(4, 12, 3, 1, **{"4": 1, "9": 1})
    p3, w3, b3 = _conv(12, 12, 1, 2)
    net = read_ncnn(*_write_ncnn(tmp_path, "m", [("Convolution", p1, w1, b1, True),
                                                  ("Convolution", p2, w2, b2, False),
                                                  ("Convolution", p3, w3, b3, False),
                                                  ("PixelShuffle", {"0": 2}, None, None, False)]))
    x = torch.rand(2, 3, 5, 7)
    w1h = w1.half().float()                                   # stored as float16
    want = F.leaky_relu(F.conv2d(x, w1h, b1, padding=1), 0.2)
    want = F.pixel_shuffle(F.conv2d(F.relu(F.conv2d(want, w2, b2, padding=1)), w3, b3), 2)
    got = net(x)
    assert got.shape == (2, 3, 10, 14)
    torch.testing.assert_close(got, want, rtol=0, atol=1e-6)
    assert net.in_channels == 3 and not any(p.requires_grad for p in net.buffers())


def test_read_ncnn_deconvolution_is_ncnns_out_in_layout(tmp_path):
    g = torch.Generator().manual_seed(3)
    w, b = torch.randn(3, 2, 4, 4, generator=g), torch.randn(3, generator=g)   # [out, in, k, k]
    params = {"0": 3, "1": 4, "3": 2, "4": 1, "5": 1, "6": w.numel()}
    net = read_ncnn(*_write_ncnn(tmp_path, "d", [("Deconvolution", params, w, b, False)]))
    x = torch.randn(1, 2, 3, 4, generator=g)
    # By definition: every input pixel scatters its kernel to (y*2 + ky - 1, x*2 + kx - 1).
    want = np.zeros((3, 3 * 2 + 2, 4 * 2 + 2))
    for o in range(3):
        for i in range(2):
            for y in range(3):
                for xx in range(4):
                    want[o, y * 2:y * 2 + 4, xx * 2:xx * 2 + 4] += w[o, i].numpy() * x[0, i, y, xx].item()
    want = want[:, 1:-1, 1:-1] + b.numpy()[:, None, None]
    torch.testing.assert_close(net(x)[0], torch.from_numpy(want).float(), rtol=0, atol=1e-5)


def test_read_ncnn_refuses_what_it_cannot_read(tmp_path):
    p, w, b = _conv(3, 4, 3, 0)
    param, weights = _write_ncnn(tmp_path, "m", [("Convolution", p, w, b, False)])
    good = weights.read_bytes()
    weights.write_bytes(good + b"\0\0\0\0")
    with pytest.raises(ValueError, match=r"^.*m\.bin: 4 bytes left over after the weights of .*m\.param$"):
        read_ncnn(param, weights)
    weights.write_bytes(good[:-8])
    with pytest.raises(ValueError, match=r"m\.bin: ends at byte \d+, before the weights of .*m\.param do$"):
        read_ncnn(param, weights)
    weights.write_bytes(struct.pack("<I", 7) + good[4:])
    with pytest.raises(ValueError, match=r"m\.bin: weight tag 7 at byte 0 is neither float32 nor float16$"):
        read_ncnn(param, weights)
    weights.write_bytes(good)
    param.write_text(param.read_text().replace("Convolution", "Pooling"))
    with pytest.raises(ValueError, match=r"m\.param: layer l0 is a Pooling, which read_ncnn does not support$"):
        read_ncnn(param, weights)
    param.write_text(param.read_text().replace("Pooling", "Convolution").replace(" 6=", " 7="))
    with pytest.raises(ValueError, match=r"m\.param: layer l0 lacks its 6= entries \(output channels, kernel size, "
                                         r"weight count\)$"):
        read_ncnn(param, weights)
    param.write_text("7767518\n")
    with pytest.raises(ValueError, match=r"m\.param: not an ncnn param file"):
        read_ncnn(param, weights)


def test_srmd_feeds_the_bicubic_degradation_map(tmp_path):
    # A 1x1 conv that copies input plane 3 + j to output plane 0 exposes the map's j-th value.
    j = 13
    w = torch.zeros(4, 18, 1, 1)
    w[0, 3 + j] = w[1, 0] = w[2, 1] = w[3, 2] = 1.0
    params = {"0": 4, "1": 1, "5": 1, "6": w.numel()}
    net = read_ncnn(*_write_ncnn(tmp_path, "s", [("Convolution", params, w, torch.zeros(4), False),
                                                  ("PixelShuffle", {"0": 2}, None, None, False)]))
    lr = torch.rand(2, 3, 4, 5)
    out = SrmdTeacher(net)(lr)
    assert out.shape == (2, 1, 8, 10)
    torch.testing.assert_close(out[:, 0, ::2, ::2], torch.full((2, 4, 5), SRMD_BICUBIC_MAP[j]))
    torch.testing.assert_close(out[:, 0, ::2, 1::2], lr[:, 0])
    with pytest.raises(ValueError, match="^an SRMD-NF network takes 18 input channels, this one 3$"):
        SrmdTeacher(read_ncnn(*_write_ncnn(tmp_path, "t", [("Convolution", *_conv(3, 4, 1, 0), False)])))


def test_waifu2x_pads_by_seven_and_keeps_the_2x_centre(tmp_path):
    # 6 valid 3x3 convs, the first taking the left neighbour and the rest the centre, and a
    # deconv that paints every 2x2 block: the output is the nearest-neighbour 2x of the LR
    # shifted right by one pixel, whose left column repeats the edge (the replicated padding).
    layers = []
    for i in range(6):
        w = torch.zeros(3, 3, 3, 3)
        for c in range(3):
            w[c, c, 1, 0 if i == 0 else 1] = 1.0
        layers.append(("Convolution", {"0": 3, "1": 3, "5": 1, "6": w.numel()}, w, torch.zeros(3), False))
    w = torch.zeros(3, 3, 4, 4)
    for c in range(3):
        w[c, c, 1:3, 1:3] = 1.0
    layers.append(("Deconvolution", {"0": 3, "1": 4, "3": 2, "4": 3, "5": 1, "6": w.numel()}, w, torch.zeros(3), False))
    lr = torch.rand(1, 3, 5, 6)
    out = Waifu2xTeacher(read_ncnn(*_write_ncnn(tmp_path, "w", layers)))(lr)
    shifted = F.pad(lr, (1, 0, 0, 0), mode="replicate")[..., :-1]
    torch.testing.assert_close(out, F.interpolate(shifted, scale_factor=2, mode="nearest"))


class _Up(torch.nn.Module):
    def __init__(self, gain: float) -> None:
        super().__init__()
        self.gain = gain

    def forward(self, lr):
        return F.interpolate(lr, scale_factor=2, mode="nearest") * self.gain


def test_image_teacher_back_projects_only_the_clean_guides():
    lr = torch.rand(3, 3, 8, 8)
    teacher = ImageTeacher(_Up(1.5), _Up(0.5), back_projection=2)
    jpeg = torch.tensor([False, True, False])
    guide = teacher(lr, jpeg)
    clean = back_project((_Up(1.5)(lr)).clamp(0, 1), lr, 2, 2)
    torch.testing.assert_close(guide[[0, 2]], clean[[0, 2]])
    torch.testing.assert_close(guide[1], _Up(0.5)(lr)[1])      # raw: no back-projection
    torch.testing.assert_close(teacher(lr, None), clean)


def _teacher_folder(tmp_path):
    w = torch.zeros(12, 18, 3, 3)
    w[:, :3, 1, 1] = 0.25
    _write_ncnn(tmp_path, "clean", [("Convolution", {"0": 12, "1": 3, "4": 1, "5": 1, "6": w.numel()},
                                     w, torch.zeros(12), True), ("PixelShuffle", {"0": 2}, None, None, False)])
    layers = [("Convolution", {"0": 3, "1": 3, "5": 1, "6": 81}, torch.zeros(3, 3, 3, 3), torch.full((3,), 0.5), False)
              for _ in range(6)]
    layers.append(("Deconvolution", {"0": 3, "1": 4, "3": 2, "4": 3, "5": 1, "6": 144},
                   torch.zeros(3, 3, 4, 4), torch.full((3,), 0.25), False))
    _write_ncnn(tmp_path, "jpeg", layers)
    spec = {"clean": {"kind": "srmd", "param": "clean.param", "bin": "clean.bin"},
            "jpeg": {"kind": "waifu2x", "param": "jpeg.param", "bin": "jpeg.bin"}}
    (tmp_path / "teacher.json").write_text(json.dumps(spec))
    return tmp_path, spec


def test_load_image_teacher_and_its_refusals(tmp_path):
    folder, spec = _teacher_folder(tmp_path)
    teacher = load_image_teacher(folder, back_projection=0)
    lr = torch.rand(2, 3, 4, 4)
    guide = teacher(lr, torch.tensor([False, True]))
    torch.testing.assert_close(guide[1], torch.full((3, 8, 8), 0.25))
    want = F.pixel_shuffle((0.25 * lr[:1].sum(1, keepdim=True)).expand(1, 12, 4, 4), 2)[0].clamp(0, 1)
    torch.testing.assert_close(guide[0], want)
    (folder / "teacher.json").write_text(json.dumps({**spec, "jpeg": {"kind": "esrgan"}}))
    with pytest.raises(ValueError, match=r"teacher\.json: 'jpeg' needs a kind \(srmd, waifu2x\), a param and a bin file$"):
        load_image_teacher(folder, 0)
    (folder / "teacher.json").unlink()
    with pytest.raises(ValueError, match=r"teacher\.json does not exist: run `python scripts/prepare_data.py --teachers` first$"):
        load_image_teacher(folder, 0)


def test_guide_image_adds_the_weighted_distance_to_the_image():
    _, hr, cond, low = _batch()
    abar = torch.from_numpy(alphas_cumprod().copy())
    torch.manual_seed(0)
    student = create_model(X0)
    with torch.no_grad():
        student.final_conv.block[-1].weight.normal_(0, 0.05)
    noise = torch.randn(hr.shape, generator=torch.Generator().manual_seed(2))
    kw = dict(lr=low, back_projection=2, loss="l2")
    plain = diffusion_loss(student, hr, cond, 1999, noise, X0, abar, **kw)
    x_t = abar[1999].sqrt() * X0.formulation.target(hr, cond) + (1 - abar[1999]).sqrt() * noise
    with torch.no_grad():
        image = back_project(X0.formulation.to_image(student(x_t, cond, torch.full((2, 1), 1999)), cond), low, 2, 2)
    same = diffusion_loss(student, hr, cond, 1999, noise, X0, abar, guide_image=image, **kw)
    assert same.item() == pytest.approx(plain.item(), rel=1e-6)   # a guide equal to the output adds 0
    got = diffusion_loss(student, hr, cond, 1999, noise, X0, abar, guide_image=image + 0.1,
                         distil_weight=0.5, **kw)
    assert got.item() == pytest.approx(plain.item() + 0.5 * 4.0 * 0.01, rel=1e-5)
    with pytest.raises(ValueError, match="^a guide image needs back_projection > 0, no teacher and no refining call$"):
        diffusion_loss(student, hr, cond, 1999, noise, X0, abar, lr=low, guide_image=image)


def test_training_with_an_image_teacher_and_its_refusals(tmp_path):
    images, *_ = _batch()
    (tmp_path / "teachers").mkdir()
    folder, _ = _teacher_folder(tmp_path / "teachers")
    cfg_kw = dict(model="tiny-binary", steps=2, batch=2, patch=16, lr=1e-3, warmup_steps=1,
                  loss_back_projection=1, checkpoint_minutes=1e9, degradation="mixed", loss="l2")
    run = train(TrainConfig(**cfg_kw, image_teacher=str(folder)), tmp_path / "run", images=images,
                model_config=X0, progress=False)
    assert run.step == 2 and (tmp_path / "run" / "latest_ema.safetensors").is_file()
    plain = train(TrainConfig(**cfg_kw), tmp_path / "plain", images=images, model_config=X0, progress=False)
    weights = [dict(r.model.named_parameters())["final_conv.block.3.weight"] for r in (run, plain)]
    assert not torch.equal(*weights)                        # the guide moved the weights
    with pytest.raises(SystemExit, match=r"^image teacher: .*nope/teacher\.json does not exist: run "):
        train(TrainConfig(**cfg_kw, image_teacher=str(tmp_path / "nope")), tmp_path / "run2",
              images=images, model_config=X0, progress=False)
    assert not (tmp_path / "run2").exists()
    with pytest.raises(ValueError, match=r"^image_teacher needs loss_back_projection > 0 \(its guide is an image\)$"):
        TrainConfig(image_teacher="data/teachers")
    with pytest.raises(ValueError, match="^image_teacher cannot be combined with teacher or refine_t$"):
        TrainConfig(image_teacher="data/teachers", teacher="x.safetensors", loss_back_projection=1)
