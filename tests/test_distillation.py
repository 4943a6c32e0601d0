"""The full-precision twin and output distillation from it (docs/TRAINING.md)."""
import copy
from dataclasses import replace

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from bidiff.exporter.cli import main as export_main
from bidiff.models import create_model, get_config, load_checkpoint, save_checkpoint
from bidiff.models.data import sample_batch
from bidiff.models.layers import BIConv, HardBinaryConv
from bidiff.models.projection import back_project
from bidiff.models.train import TrainConfig, diffusion_loss, train
from bidiff.runtime.formulation import Formulation
from bidiff.runtime.schedule import alphas_cumprod

X0 = replace(get_config("tiny-binary"), formulation=Formulation("residual", 4.0, "sample"))
TWIN = replace(X0, name="tiny-binary-fp", network={**X0.network, "binary": False})


def _batch(seed: int = 3):
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[0:48, 0:48] / 48
    images = [(np.stack([0.5 + 0.4 * np.sin(2 * np.pi * rng.uniform(2, 6) * (xx + c * yy))
                         for c in range(3)], -1) * 255).round().astype(np.uint8) for _ in range(3)]
    b = sample_batch(images, 2, patch=16, scale=2, rng=np.random.default_rng(seed))
    return images, *(torch.from_numpy(a) for a in (b.hr, b.cond, b.lr))


def test_twin_is_the_binary_network_without_signs():
    torch.manual_seed(0)
    twin, binary = create_model(TWIN), create_model(X0)
    assert twin.state_dict().keys() == binary.state_dict().keys()
    conv = next(m for m in twin.modules() if isinstance(m, HardBinaryConv))
    assert conv.weight.min() < 0 < 0.02 < conv.weight.std()   # nn.Conv2d's init, not 0.001 * rand
    block = next(m for m in twin.modules() if isinstance(m, BIConv))
    x = torch.randn(1, block.channels, 8, 8)
    want = block.TaA[2](F.conv2d(block.TaR[2](x), block.binary_conv.weight, padding=1)) + x
    torch.testing.assert_close(block(x, 2), want)
    binary.load_state_dict(twin.state_dict())              # same weights, 1-bit arithmetic
    with torch.no_grad():
        for m in (twin, binary):
            m.final_conv.block[-1].weight.normal_(0, 0.1, generator=torch.Generator().manual_seed(1))
        x_t, cond, t = torch.randn(1, 3, 16, 16), torch.rand(1, 3, 16, 16), torch.tensor([[1999]])
        assert not torch.allclose(twin(x_t, cond, t), binary(x_t, cond, t), atol=1e-3)


def test_distillation_adds_the_weighted_l1_to_the_teacher():
    _, hr, cond, low = _batch()
    abar = torch.from_numpy(alphas_cumprod().copy())
    torch.manual_seed(0)
    student, teacher = create_model(X0), create_model(TWIN)
    with torch.no_grad():
        for m in (student, teacher):
            m.final_conv.block[-1].weight.normal_(0, 0.05)
    noise = torch.randn(hr.shape, generator=torch.Generator().manual_seed(2))
    kw = dict(lr=low, back_projection=2)
    plain = diffusion_loss(student, hr, cond, 1900, noise, X0, abar, **kw)
    same = diffusion_loss(student, hr, cond, 1900, noise, X0, abar, teacher=copy.deepcopy(student), **kw)
    assert same.item() == plain.item()                     # a teacher equal to the student adds 0
    got = diffusion_loss(student, hr, cond, 1900, noise, X0, abar, teacher=teacher, distil_weight=0.5, **kw)
    x_t = abar[1900].sqrt() * X0.formulation.target(hr, cond) + (1 - abar[1900]).sqrt() * noise
    t = torch.full((2, 1), 1900)
    with torch.no_grad():
        images = [back_project(X0.formulation.to_image(m(x_t, cond, t), cond), low, 2, 2)
                  for m in (student, teacher)]
    gap = 4.0 * (images[0] - images[1]).abs().mean().item()
    assert gap > 1e-3 and got.item() == pytest.approx(plain.item() + 0.5 * gap, rel=1e-5)
    got.backward()
    assert all(p.grad is None for p in teacher.parameters())


def test_training_from_a_teacher_checkpoint_and_its_refusals(tmp_path, capsys):
    images, *_ = _batch()
    torch.manual_seed(5)
    teacher_path = tmp_path / "twin.safetensors"
    save_checkpoint(teacher_path, create_model(TWIN), TWIN)
    loaded, cfg = load_checkpoint(teacher_path)
    assert cfg.network["binary"] is False and not loaded.binary
    cfg_kw = dict(model="tiny-binary", steps=2, batch=2, patch=16, lr=1e-3, warmup_steps=1,
                  loss_back_projection=1, checkpoint_minutes=1e9)
    run = train(TrainConfig(**cfg_kw, teacher=str(teacher_path)), tmp_path / "run", images=images,
                model_config=X0, progress=False)
    assert run.step == 2 and (tmp_path / "run" / "latest_ema.safetensors").is_file()
    with pytest.raises(SystemExit, match="predicts another target than tiny-binary"):
        train(TrainConfig(**{**cfg_kw, "loss_back_projection": 0}, teacher=str(teacher_path)),
              tmp_path / "run2", images=images, model_config=get_config("tiny-binary"), progress=False)
    with pytest.raises(SystemExit, match="^teacher: checkpoint .*nope.safetensors does not exist$"):
        train(TrainConfig(**cfg_kw, teacher=str(tmp_path / "nope.safetensors")), tmp_path / "run3",
              images=images, model_config=X0, progress=False)
    assert not (tmp_path / "run3").exists()
    with pytest.raises(ValueError, match="distil_weight -1.0 is negative"):
        TrainConfig(distil_weight=-1.0)

    out = tmp_path / "art"
    assert export_main([str(teacher_path), "--out", str(out), "--no-progress", "--tile", "16"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "a full-precision training twin (a distillation teacher)" in err
    assert not out.exists()
