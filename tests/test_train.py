"""A tiny training run: the loss falls, and a resumed run equals an uninterrupted one."""
import json
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch

from bidiff.models import create_model, get_config, load_checkpoint, save_checkpoint
from bidiff.models.checkpoint import read_metadata
from bidiff.models.data import BatchStream, random_patch, sample_batch, step_rng
from bidiff.models.layers import HardBinaryConv
from bidiff.models.train import (LOSSES, TrainConfig, diffusion_loss, ema_decay, learning_rate,
                                 train)
from bidiff.runtime.formulation import Formulation
from bidiff.runtime.schedule import alphas_cumprod

TINY = get_config("tiny-binary")
ROOT = Path(__file__).resolve().parents[1]



def _images(n: int = 3, size: int = 48) -> list[np.ndarray]:
    """Smooth random colour fields: structured enough to have learnable detail."""
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[0:size, 0:size] / size
    out = []
    for _ in range(n):
        f = rng.uniform(2, 6, (3, 2))
        chans = [0.5 + 0.4 * np.sin(2 * np.pi * (f[c, 0] * xx + f[c, 1] * yy)) for c in range(3)]
        out.append((np.stack(chans, -1) * 255).round().astype(np.uint8))
    return out


def _model_and_batch(cfg, n: int, seed: int):
    """A fresh model (torch seed 0), one batch of n patches, its noise and the schedule."""
    torch.manual_seed(0)
    model = create_model(cfg)
    batch = sample_batch(_images(), n, patch=16, scale=2, rng=np.random.default_rng(seed))
    hr, cond = torch.from_numpy(batch.hr), torch.from_numpy(batch.cond)
    noise = torch.randn(hr.shape, generator=torch.Generator().manual_seed(seed + 1))
    return model, hr, cond, noise, torch.from_numpy(alphas_cumprod().copy())


def _cfg(**kw) -> TrainConfig:
    base = dict(model="tiny-binary", steps=6, batch=2, patch=16, lr=1e-3, warmup_steps=2,
                log_every=2, checkpoint_minutes=1e9)
    return TrainConfig(**{**base, **kw})


def test_loss_goes_down_on_a_fixed_batch():
    model, hr, cond, noise, abar = _model_and_batch(TINY, 4, seed=1)
    opt = torch.optim.Adam(model.parameters(), lr=2e-3, betas=(0.9, 0.99))
    losses = []
    for _ in range(30):
        loss = diffusion_loss(model, hr, cond, 1000, noise, TINY, abar)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert np.mean(losses[-5:]) < 0.7 * np.mean(losses[:5])


def test_batch_stream_is_the_same_with_worker_processes():
    """Batches are a function of (seed, step): workers and the start step change nothing (the
    degradation and zoom reach the workers too)."""
    images = _images()
    kw = dict(patch=16, scale=2, degradation="mixed", zoom=0.5)
    inline = BatchStream(images, 3, seed=5, start=7, **kw)
    ahead = BatchStream(images, 3, seed=5, start=8, workers=2, **kw)
    try:
        first = next(inline)
        expect = sample_batch(images, 3, rng=step_rng(5, 7), **kw)
        assert not np.array_equal(expect.hr, sample_batch(images, 3, patch=16, scale=2, rng=step_rng(5, 7)).hr)
        np.testing.assert_array_equal(first.hr, expect.hr)
        for _ in range(5):
            a, b = next(inline), next(ahead)
            for x, y in [(a.hr, b.hr), (a.lr, b.lr), (a.cond, b.cond)]:
                np.testing.assert_array_equal(x, y)
        assert not np.array_equal(first.hr, a.hr)
    finally:
        inline.close()
        ahead.close()


def test_resumed_run_equals_uninterrupted_run(tmp_path):
    images = _images()
    full = train(_cfg(), tmp_path / "full", images=images, model_config=TINY, progress=False)
    train(_cfg(), tmp_path / "split", images=images, model_config=TINY, until=3, progress=False)
    split = train(_cfg(), tmp_path / "split", resume=True, images=images, progress=False)
    assert split.step == full.step == 6
    for a, b in [(full.model, split.model), (full.ema, split.ema)]:
        for (k, x), y in zip(a.state_dict().items(), b.state_dict().values()):
            assert torch.equal(x, y), k
    log = [json.loads(line) for line in (tmp_path / "split" / "log.jsonl").read_text().splitlines()]
    assert [e["step"] for e in log if "loss" in e] == [2, 3, 4, 6]
    model, cfg = load_checkpoint(tmp_path / "split" / "latest_ema.safetensors")
    assert cfg == TINY
    for x, y in zip(model.state_dict().values(), split.ema.state_dict().values()):
        assert torch.equal(x, y)


def test_init_from_weights_continues_the_step_count(tmp_path):
    images = _images()
    first = train(_cfg(steps=3), tmp_path / "a", images=images, model_config=TINY, progress=False)
    again = train(_cfg(steps=3), tmp_path / "b", images=images, model_config=TINY, progress=False,
                  init=tmp_path / "a" / "latest_raw.safetensors", until=3)
    assert again.step == 3                                   # nothing left to do: weights as given
    for x, y, z in zip(first.model.state_dict().values(), again.model.state_dict().values(),
                       again.ema.state_dict().values()):
        assert torch.equal(x, y) and torch.equal(x, z)
    tuned = tmp_path / "tuned.safetensors"
    save_checkpoint(tuned, first.model, TINY, {"steps": "3", "default_steps": "2",
                                               "timestep_spacing": "trailing", "back_projection": "1"})
    more = train(_cfg(steps=5), tmp_path / "c", images=images, model_config=TINY, progress=False,
                 init=tuned, until=4)
    more = train(_cfg(steps=5), tmp_path / "c", images=images, progress=False, resume=True)
    assert more.step == 5
    meta = read_metadata(tmp_path / "c" / "latest_ema.safetensors")      # its sampler carries on
    assert (meta["steps"], meta["default_steps"], meta["timestep_spacing"], meta["back_projection"]) \
        == ("5", "2", "trailing", "1")
    assert meta["tile"] == "16"                   # the patch it trained at: the export's tile
    kept = tmp_path / "kept" / "wip.safetensors"                      # scripts/keep_weights.py
    res = subprocess.run([sys.executable, str(ROOT / "scripts" / "keep_weights.py"),
                          str(tmp_path / "c" / "latest_ema.safetensors"), str(kept)],
                         capture_output=True, text=True, timeout=300)
    assert res.returncode == 0 and res.stdout.startswith(f"wrote {kept}"), res.stderr
    assert read_metadata(kept)["steps"] == "5"
    ship = tmp_path / "kept" / "ship.safetensors"          # --set: a from-scratch run's sampler
    res = subprocess.run([sys.executable, str(ROOT / "scripts" / "keep_weights.py"), str(kept), str(ship),
                          "--set", "default_steps=1", "--set", "timestep_spacing=leading"],
                         capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr
    assert (read_metadata(ship)["default_steps"], read_metadata(ship)["timestep_spacing"]) == ("1", "leading")
    signs = tmp_path / "kept" / "signs.safetensors"         # --latents signs: the packaged form
    res = subprocess.run([sys.executable, str(ROOT / "scripts" / "keep_weights.py"), str(ship), str(signs),
                          "--latents", "signs"], capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr
    assert read_metadata(signs) == read_metadata(ship) and signs.stat().st_size < kept.stat().st_size
    assert all(torch.equal(torch.sign(a), torch.sign(b)) for a, b in zip(
        load_checkpoint(signs)[0].state_dict().values(), load_checkpoint(ship)[0].state_dict().values()))
    for bad, message in ((["--set", "tile=12"], "keep_weights: --set tile: tile 12 must be a positive multiple of 8"),
                         (["--set", "default_steps=0"], "keep_weights: --set default_steps: "),
                         (["--set", "back_projection=-1"], "metadata back_projection"),
                         (["--set", "steps=9"], "keep_weights: --set 'steps=9': expected KEY=VALUE")):
        res = subprocess.run([sys.executable, str(ROOT / "scripts" / "keep_weights.py"), str(kept),
                              str(tmp_path / "bad.safetensors"), *bad], capture_output=True, text=True, timeout=300)
        assert res.returncode == 1 and message in res.stderr and "Traceback" not in res.stderr, res.stderr
        assert not (tmp_path / "bad.safetensors").exists()
    again = train(_cfg(steps=6), tmp_path / "e", images=images, model_config=TINY, progress=False,
                  init=kept, until=5)
    kept_model, _ = load_checkpoint(kept)                   # compact: the 1-bit convs' signs kept
    assert all(torch.equal(torch.sign(a), torch.sign(b)) for a, b in zip(
        more.ema.state_dict().values(), kept_model.state_dict().values()))
    assert again.step == 5 and all(torch.equal(a, b) for a, b in zip(
        kept_model.state_dict().values(), again.model.state_dict().values()))
    with pytest.raises(SystemExit, match="holds 'tiny-binary', not 'bidiff-s-x2'"):
        train(_cfg(model="bidiff-s-x2"), tmp_path / "d", images=images, progress=False,
              init=tmp_path / "a" / "latest_raw.safetensors")


def test_t_min_trains_only_the_experts_of_the_top_timesteps(tmp_path):
    """t_min = 1600: only group 4's TaR/TaA experts move; groups 0-3 keep their init."""
    start = create_model(TINY).state_dict()
    run = train(_cfg(t_min=1600), tmp_path, images=_images(), model_config=TINY, progress=False)
    moved = {k for k, v in run.model.state_dict().items() if not torch.equal(v, start[k])}
    experts = [k for k in start if "dynamic_" in k]
    assert experts and all(("_4." in k) == (k in moved) for k in experts)
    with pytest.raises(ValueError, match="t_min 2000 is outside 0..1999"):
        _cfg(t_min=2000)


def test_resume_without_state_and_restart_over_state_are_user_errors(tmp_path):
    with pytest.raises(SystemExit, match="nothing to resume"):
        train(_cfg(), tmp_path, resume=True, images=_images(), progress=False)
    train(_cfg(steps=1), tmp_path, images=_images(), model_config=TINY, progress=False)
    with pytest.raises(SystemExit, match="--resume"):
        train(_cfg(steps=1), tmp_path, images=_images(), model_config=TINY, progress=False)
    with pytest.raises(SystemExit, match="trains 'tiny-binary'"):
        train(_cfg(), tmp_path, resume=True, overrides={"model": "bidiff-s-x2"},
              images=_images(), progress=False)


def test_full_precision_training_keeps_every_binary_sign(tmp_path):
    """train_params="full-precision": the 1-bit convs' latent weights stay bit for bit those of
    --init (so do the EMA's), every other trained parameter moves; a resume may not switch."""
    images = _images()
    start = train(_cfg(steps=2), tmp_path / "a", images=images, model_config=TINY, progress=False)
    init = tmp_path / "a" / "latest_raw.safetensors"
    run = train(_cfg(steps=6, train_params="full-precision"), tmp_path / "b", images=images,
                model_config=TINY, progress=False, init=init)
    binary = {n + ".weight" for n, m in run.model.named_modules() if isinstance(m, HardBinaryConv)}
    assert binary
    before = start.model.state_dict()
    for name, value in run.model.named_parameters():
        if name in binary:
            assert torch.equal(value, before[name]) and torch.equal(run.ema.state_dict()[name], value), name
    moved = [n for n, v in run.model.named_parameters() if n not in binary and not torch.equal(v, before[n])]
    assert len(moved) > 0.5 * (len(before) - len(binary))
    with pytest.raises(SystemExit, match="trains 'full-precision' parameters; .* --init instead"):
        train(_cfg(steps=8), tmp_path / "b", resume=True, overrides={"train_params": "all"},
              images=images, progress=False)
    with pytest.raises(ValueError, match="unknown train_params 'binary'; valid: all, full-precision"):
        _cfg(train_params="binary")


def test_init_grows_a_network_by_the_condition_summary(tmp_path):
    """--init with a tiny-binary checkpoint starts tiny-binary-cond as the same function (its
    new layers at their no-op init); any other config mismatch stays an error."""
    images = _images()
    first = train(_cfg(steps=2), tmp_path / "a", images=images, model_config=TINY, progress=False)
    init = tmp_path / "a" / "latest_raw.safetensors"
    grown = train(_cfg(model="tiny-binary-cond", steps=2), tmp_path / "b", images=images,
                  model_config=get_config("tiny-binary-cond"), progress=False, init=init, until=2)
    g = torch.Generator().manual_seed(3)
    x_t, cond, t = torch.randn(1, 3, 16, 16, generator=g), torch.rand(1, 3, 16, 16, generator=g), torch.tensor([[1999]])
    with torch.no_grad():
        assert torch.equal(first.model(x_t, cond, t), grown.model(x_t, cond, t))
        assert torch.equal(first.model(x_t, cond, t), grown.ema(x_t, cond, t))
    with pytest.raises(SystemExit, match="holds 'tiny-binary', not 'bidiff-s-x2'; pass --config tiny-binary"):
        train(_cfg(model="bidiff-s-x2"), tmp_path / "c", images=images, model_config=get_config("bidiff-s-x2"),
              progress=False, init=init)


def test_init_grows_an_x0_network_by_the_lr_correction(tmp_path):
    """--init with an x0 tiny-binary checkpoint starts tiny-lrc with its x0 channels bit for bit
    the old output and its correction channels at zero; the loss then trains the correction
    through back-projection, where a JPEG'd LR gives it something to fix."""
    images = _images()
    x0 = replace(TINY, formulation=Formulation("residual", 4.0, "sample"))
    lrc = get_config("tiny-lrc")
    first = train(_cfg(steps=2, loss_back_projection=2), tmp_path / "a", images=images,
                  model_config=x0, progress=False)
    grown = train(_cfg(model="tiny-lrc", steps=2, loss_back_projection=2), tmp_path / "b",
                  images=images, model_config=lrc, progress=False,
                  init=tmp_path / "a" / "latest_raw.safetensors", until=2)
    g = torch.Generator().manual_seed(3)
    x_t, cond, t = torch.randn(1, 3, 16, 16, generator=g), torch.rand(1, 3, 16, 16, generator=g), torch.tensor([[1999]])
    with torch.no_grad():
        out = grown.model(x_t, cond, t)
        assert out.shape[1] == 6 and torch.equal(out[:, :3], first.model(x_t, cond, t))
        assert not out[:, 3:].any()

    batch = sample_batch(images, 2, patch=16, scale=2, rng=np.random.default_rng(3), degradation="jpeg-only")
    hr, cond, low = (torch.from_numpy(a) for a in (batch.hr, batch.cond, batch.lr))
    abar = torch.from_numpy(alphas_cumprod().copy())
    model = grown.model
    model.zero_grad()
    diffusion_loss(model, hr, cond, 1999, torch.randn(hr.shape), lrc, abar, lr=low,
                   back_projection=2).backward()
    assert model.final_conv.correction.weight.grad.abs().sum() > 0
    with pytest.raises(ValueError, match="^an LR-correcting model is trained through back-projection, in one call$"):
        diffusion_loss(model, hr, cond, 1999, torch.randn(hr.shape), lrc, abar, lr=low)


@pytest.mark.parametrize("target", ["hr", "split", "projected"])
def test_correction_weight_adds_the_distance_of_the_aimed_lr_to_the_targets_lr(target):
    """correction_weight W adds W x the distance between the LR back-projection aims at and
    the LR of the target (times the residual scale, like the rest of the loss): the HR's
    bicubic downscale where the target is the HR, the given LR where it is the projected HR."""
    from bidiff.models.projection import downscale
    lrc = get_config("tiny-lrc")
    torch.manual_seed(0)
    model = create_model(lrc)
    with torch.no_grad():
        model.final_conv.correction.weight.normal_(0.0, 0.05)
    batch = sample_batch(_images(), 2, patch=16, scale=2, rng=np.random.default_rng(3), degradation="jpeg-only")
    hr, cond, low = (torch.from_numpy(a) for a in (batch.hr, batch.cond, batch.lr))
    abar = torch.from_numpy(alphas_cumprod().copy())
    x_t, jpeg = torch.zeros_like(hr), torch.tensor([True, False])
    kw = dict(lr=low, back_projection=2, loss="l2", first_x_t="zeros", target=target, jpeg=jpeg)
    with torch.no_grad():
        base = diffusion_loss(model, hr, cond, 1999, x_t, lrc, abar, **kw)
        weighted = diffusion_loss(model, hr, cond, 1999, x_t, lrc, abar, correction_weight=2.0, **kw)
        aim = low + downscale(model(x_t, cond, torch.full((2, 1), 1999))[:, 3:], 2) / 4
        want = {"hr": downscale(hr, 2), "projected": low,
                "split": torch.cat([downscale(hr, 2)[:1], low[1:]])}[target]
    assert float(weighted - base) == pytest.approx(float(4 * 2.0 * ((aim - want) ** 2).mean()), rel=1e-4)
    with pytest.raises(ValueError, match="correction_weight -1.0 is negative"):
        _cfg(correction_weight=-1.0)


def test_grows_accepts_only_parts_that_start_as_no_ops():
    """_grows: more head blocks, a condition summary or an LR correction may start from a
    checkpoint without them; fewer, or any other difference, may not."""
    from bidiff.models.configs import ModelConfig
    from bidiff.models.train import _grows
    base = get_config("tiny-head")
    def cfg(**kw):
        return ModelConfig("x", {**base.network, **kw}, base.scale, base.formulation, "")
    assert _grows(cfg(head_blocks=0), cfg(head_blocks=2))
    assert _grows(cfg(head_blocks=1), cfg(head_blocks=1, cond_embed=True))
    assert not _grows(cfg(head_blocks=2), cfg(head_blocks=1))
    assert not _grows(cfg(cond_embed=True), cfg())
    assert not _grows(cfg(head_blocks=0), cfg(head_blocks=1, inner_channel=32))
    assert not _grows(cfg(), ModelConfig("x", base.network, 4, base.formulation, ""))
    x0 = Formulation("residual", 4.0, "sample")
    plain, corrected = (ModelConfig("x", base.network, 2, f, "") for f in (x0, replace(x0, lr_correction=True)))
    assert _grows(plain, corrected) and not _grows(corrected, plain)
    assert not _grows(replace(plain, formulation=replace(x0, residual_scale=2.0)), corrected)
    assert not _grows(corrected, replace(plain, formulation=Formulation()))     # no error either


@pytest.mark.parametrize("name,prefix,kw", [("tiny-head", "head.", {}),
                                             ("tiny-lrc", "final_conv.correction.", {"loss_back_projection": 1})])
def test_head_lr_scale_multiplies_the_parts_that_start_at_zero_only(tmp_path, name, prefix, kw):
    """One Adam step moves every parameter by about lr; with head_lr_scale 10 the head block's
    (or the LR correction's) parameters move 10x as far and the rest exactly as far as without
    it. A run saved with other parameter groups resumes with a one-line refusal."""
    images = _images()
    moves = {}
    for scale in (1.0, 10.0):
        torch.manual_seed(0)
        start = create_model(name).state_dict()
        run = train(_cfg(model=name, steps=1, head_lr_scale=scale, **kw), tmp_path / str(scale),
                    images=images, model_config=get_config(name), progress=False)
        after = run.model.state_dict()
        moves[scale] = {k: float((after[k] - start[k]).abs().max()) for k in start}
    head = [k for k in moves[1.0] if k.startswith(prefix) and moves[1.0][k] > 0]
    rest = [k for k in moves[1.0] if not k.startswith(prefix)]
    assert head and rest
    for k in head:
        assert moves[10.0][k] == pytest.approx(10 * moves[1.0][k], rel=1e-3), k
    for k in rest:
        assert moves[10.0][k] == pytest.approx(moves[1.0][k], rel=1e-6, abs=1e-9), k
    state = torch.load(tmp_path / "1.0" / "state.pt", weights_only=True)
    state["optimizer"]["param_groups"] = state["optimizer"]["param_groups"][:1]
    torch.save(state, tmp_path / "1.0" / "state.pt")
    with pytest.raises(SystemExit, match=r"state.pt: its optimizer state does not fit this network's "
                                         r"parameter groups \(.*\); continue from its weights with --init instead"):
        train(_cfg(model=name, steps=2, **kw), tmp_path / "1.0", resume=True, images=images, progress=False)
    with pytest.raises(ValueError, match="head_lr_scale 0.0 must be positive"):
        _cfg(head_lr_scale=0.0)


def test_schedules():
    cfg = TrainConfig(lr=1.0, min_lr=0.0, warmup_steps=10, steps=110, lr_schedule="cosine")
    assert learning_rate(0, cfg) == pytest.approx(0.1)
    assert learning_rate(9, cfg) == pytest.approx(1.0)
    assert learning_rate(60, cfg) == pytest.approx(0.5)
    assert learning_rate(110, cfg) == pytest.approx(0.0)
    const = replace(cfg, lr_schedule="constant")
    assert learning_rate(100, const) == 1.0
    late = replace(cfg, decay_start=60)
    assert learning_rate(59, late) == 1.0 and learning_rate(85, late) == pytest.approx(0.5)
    assert ema_decay(0, 0.999) == pytest.approx(0.1)
    assert ema_decay(10**6, 0.999) == 0.999
    with pytest.raises(ValueError, match="valid: constant, cosine"):
        TrainConfig(lr_schedule="linear")


@pytest.mark.parametrize("formulation", ["official", "residual"])
def test_loss_noises_the_formulations_x0(formulation):
    """With zero noise the network sees x_t = sqrt(abar_t) x0, x0 as the formulation defines."""
    seen = {}

    def spy(x_t, cond, t):
        seen.update(x_t=x_t, t=t)
        return torch.zeros_like(x_t)

    cfg = replace(TINY, formulation=Formulation(formulation, 4.0))
    hr, cond = torch.rand(2, 3, 8, 8), torch.rand(2, 3, 8, 8)
    abar = torch.from_numpy(alphas_cumprod().copy())
    loss = diffusion_loss(spy, hr, cond, 700, torch.zeros_like(hr), cfg, abar)
    x0 = hr if formulation == "official" else 4 * (hr - cond)
    torch.testing.assert_close(seen["x_t"], float(np.sqrt(alphas_cumprod()[700])) * x0)
    assert seen["t"].dtype == torch.int64 and seen["t"].tolist() == [[700], [700]]
    assert loss.item() == 0.0


def test_x0_prediction_loss_compares_x0_and_starts_at_the_condition(tmp_path):
    """prediction = sample: the loss is L1 to x0, and the zero-initialised head outputs x0 = 0,
    so at step 0 the loss is exactly mean |x0| (the condition's error, for ``residual``)."""
    cfg = replace(TINY, formulation=Formulation("residual", 4.0, "sample"))
    model, hr, cond, noise, abar = _model_and_batch(cfg, 2, seed=3)
    first = model.downs[0].weight
    assert not first[:, 3:].any() and first[:, :3].any()     # x_t (noise) channels start at zero
    loss = diffusion_loss(model, hr, cond, 1500, noise, cfg, abar)
    assert loss.item() == pytest.approx((4 * (hr - cond)).abs().mean().item(), rel=1e-6)
    run = train(_cfg(steps=3, model="tiny-binary"), tmp_path, images=_images(), model_config=cfg,
                progress=False)
    assert run.model.final_conv.block[-1].weight.abs().sum() > 0         # it trained the head
    saved, saved_cfg = load_checkpoint(tmp_path / "latest_raw.safetensors")
    assert saved_cfg.formulation.prediction == "sample"                  # the checkpoint says so


def test_mixed_degradation_varies_the_lr_and_keeps_bicubic_batches_unchanged():
    images = _images()
    plain = sample_batch(images, 8, patch=16, scale=2, rng=np.random.default_rng(7))
    again = sample_batch(images, 8, patch=16, scale=2, rng=np.random.default_rng(7), degradation="bicubic")
    assert np.array_equal(plain.lr, again.lr) and np.array_equal(plain.hr, again.hr)
    mixed = sample_batch(images, 8, patch=16, scale=2, rng=np.random.default_rng(7), degradation="mixed")
    assert np.array_equal(mixed.hr, plain.hr)                 # same patches ...
    assert not np.array_equal(mixed.lr, plain.lr)            # ... other downscalers / JPEG
    other_patch = np.abs(plain.lr - plain.lr[::-1]).mean()
    assert np.abs(mixed.lr - plain.lr).mean() < 0.5 * other_patch   # still the same picture
    with pytest.raises(ValueError, match="unknown degradation 'gauss'; valid: bicubic, mixed, mixed-jpeg, jpeg-only, no-jpeg"):
        TrainConfig(degradation="gauss")


def test_zoom_cuts_patches_at_scales_between_zoom_and_one():
    """On a ramp that rises one level per pixel, a patch's slope is the scale it was cut at:
    1 without zoom (and the same patches as before the option), 1..2 with zoom 0.5, over the
    whole range, capped where the photo is too small for the zoomed-out square."""
    ramp = np.broadcast_to(np.arange(256, dtype=np.uint8)[None, :, None], (256, 256, 3)).copy()

    def slopes(image: np.ndarray, zoom: float) -> np.ndarray:
        out = []
        for seed in range(60):
            p = random_patch(image, 32, np.random.default_rng(seed), zoom).astype(float)[4:-4, 4:-4, 0]
            out.append(max(abs(np.diff(p, axis=0).mean()), abs(np.diff(p, axis=1).mean())))
        return np.array(out)

    assert np.array_equal(random_patch(ramp, 32, np.random.default_rng(3)),
                          random_patch(ramp, 32, np.random.default_rng(3), 1.0))
    np.testing.assert_allclose(slopes(ramp, 1.0), 1.0)
    zoomed = slopes(ramp, 0.5)
    assert zoomed.min() > 0.97 and zoomed.max() < 2.03
    assert zoomed.min() < 1.15 and zoomed.max() > 1.85
    assert slopes(ramp[:40], 0.25).max() < 40 / 32 + 0.03        # the square fits the photo
    with pytest.raises(ValueError, match=r"zoom 0 is outside \(0, 1\]"):
        TrainConfig(zoom=0)
    with pytest.raises(ValueError, match=r"zoom 1.5 is outside \(0, 1\]"):
        random_patch(ramp, 32, np.random.default_rng(0), 1.5)


@pytest.mark.parametrize("name, share, low, high", [("mixed", 0.3, 70, 95), ("mixed-jpeg", 0.5, 50, 95),
                                                      ("jpeg-only", 1.0, 70, 95), ("no-jpeg", 0.0, None, None)])
def test_each_mix_jpegs_its_share_of_patches_over_its_quality_range(monkeypatch, name, share, low, high):
    from bidiff.models import data
    qualities = []
    monkeypatch.setattr(data, "jpeg_round_trip", lambda img, q: qualities.append(int(q)) or img)
    rng = np.random.default_rng(0)
    patch = np.zeros((8, 8, 3), np.uint8)
    flags = [data.degrade(patch, 2, name, rng)[1] for _ in range(2000)]
    assert abs(len(qualities) / 2000 - share) < 0.04
    assert sum(flags) == len(qualities)
    assert (min(qualities), max(qualities)) == (low, high) if qualities else low is None


def test_torch_back_projection_equals_the_runtime_one_and_trains_through_it():
    """models.projection is the runtime's back-projection, differentiable: a loss taken after
    it equals the runtime's correction of the same prediction, and its gradient reaches x0.
    Its downscale (what an LR correction goes through) is the runtime's too."""
    from bidiff.models.projection import back_project, downscale
    from bidiff.runtime.consistency import back_project as runtime_back_project
    from bidiff.runtime.consistency import downscale as runtime_downscale
    rng = np.random.default_rng(0)
    sr, lr = rng.random((2, 3, 32, 24), dtype=np.float32), rng.random((2, 3, 16, 12), dtype=np.float32)
    got = back_project(torch.from_numpy(sr).double(), torch.from_numpy(lr).double(), 2, 3).numpy()
    want = np.stack([runtime_back_project(s, low, 2, 3) for s, low in zip(sr, lr)])
    np.testing.assert_allclose(got, want, atol=1e-6)
    np.testing.assert_allclose(downscale(torch.from_numpy(sr).double(), 2).numpy(),
                               np.stack([runtime_downscale(s, (16, 12)) for s in sr]), atol=1e-6)
    with pytest.raises(ValueError, match="^cannot downscale 31x24 by 2$"):
        downscale(torch.zeros(1, 3, 31, 24), 2)
    with pytest.raises(ValueError, match="do not match at x2"):
        back_project(torch.zeros(1, 3, 32, 24), torch.zeros(1, 3, 16, 16), 2, 1)

    cfg = replace(TINY, formulation=Formulation("residual", 4.0, "sample"))
    torch.manual_seed(0)
    model = create_model(cfg)
    batch = sample_batch(_images(), 2, patch=16, scale=2, rng=np.random.default_rng(3))
    hr, cond, low = (torch.from_numpy(a) for a in (batch.hr, batch.cond, batch.lr))
    abar = torch.from_numpy(alphas_cumprod().copy())
    loss = diffusion_loss(model, hr, cond, 1500, torch.randn(hr.shape), cfg, abar, lr=low,
                          back_projection=2)
    bicubic_bp = np.stack([runtime_back_project(c, x, 2, 2) for c, x in zip(batch.cond, batch.lr)])
    assert loss.item() == pytest.approx(4 * np.abs(bicubic_bp - batch.hr).mean(), rel=1e-5)
    loss.backward()
    assert model.final_conv.block[-1].weight.grad.abs().sum() > 0
    with pytest.raises(ValueError, match="needs an x0-predicting model"):
        diffusion_loss(create_model(TINY), hr, cond, 10, torch.randn(hr.shape), TINY, abar, lr=low,
                       back_projection=1)


def test_projected_loss_target_leaves_out_what_the_lr_alone_decides():
    """target="projected": the loss is |A (x0 - HR)| for the affine back-projection A, so it
    does not change when the LR does (a JPEG'd LR, here noise added to it), where the HR
    target's does; with the LR the HR downscales to exactly, the two nearly agree."""
    cfg = replace(TINY, formulation=Formulation("residual", 4.0, "sample"))
    torch.manual_seed(0)
    model = create_model(cfg)
    batch = sample_batch(_images(), 2, patch=16, scale=2, rng=np.random.default_rng(3))
    hr, cond, low = (torch.from_numpy(a) for a in (batch.hr, batch.cond, batch.lr))
    noisy = low + 0.05 * torch.randn(low.shape, generator=torch.Generator().manual_seed(1))
    abar = torch.from_numpy(alphas_cumprod().copy())
    noise = torch.randn(hr.shape)

    def loss(lr, target):
        return diffusion_loss(model, hr, cond, 1900, noise, cfg, abar, lr=lr, back_projection=3,
                              target=target).item()
    assert loss(noisy, "projected") == pytest.approx(loss(low, "projected"), rel=1e-5)
    assert loss(noisy, "hr") > 1.5 * loss(low, "hr")
    assert loss(low, "projected") == pytest.approx(loss(low, "hr"), rel=0.1)
    with pytest.raises(ValueError, match="loss_target 'projected' needs loss_back_projection > 0"):
        TrainConfig(loss_target="projected")
    with pytest.raises(ValueError, match="loss target 'projected' needs back_projection > 0"):
        diffusion_loss(model, hr, cond, 1900, noise, cfg, abar, lr=low, target="projected")
    with pytest.raises(ValueError, match="^unknown loss target 'pro'; valid: hr, projected, split$"):
        diffusion_loss(model, hr, cond, 1900, noise, cfg, abar, lr=low, back_projection=1, target="pro")


def test_split_loss_target_takes_the_hr_for_jpeg_patches_and_the_projected_hr_for_the_rest():
    """target="split": a sample the batch marks as JPEG'd is compared with the HR, the others
    with the projected HR; the flags come from the data pipeline (``mixed`` JPEGs ~30 %)."""
    cfg = replace(TINY, formulation=Formulation("residual", 4.0, "sample"))
    torch.manual_seed(0)
    model = create_model(cfg)
    batch = sample_batch(_images(), 2, patch=16, scale=2, rng=np.random.default_rng(3))
    hr, cond = torch.from_numpy(batch.hr), torch.from_numpy(batch.cond)
    low = torch.from_numpy(batch.lr) + 0.05 * torch.randn(batch.lr.shape, generator=torch.Generator().manual_seed(1))
    abar = torch.from_numpy(alphas_cumprod().copy())
    noise = torch.randn(hr.shape)

    def loss(target, jpeg=None, rows=slice(None)):
        return diffusion_loss(model, hr[rows], cond[rows], 1900, noise[rows], cfg, abar, lr=low[rows],
                              back_projection=3, target=target, loss="l2",
                              jpeg=None if jpeg is None else torch.tensor(jpeg)).item()
    mixed = loss("split", [True, False])
    assert mixed == pytest.approx((loss("hr", rows=slice(0, 1)) + loss("projected", rows=slice(1, 2))) / 2, rel=1e-5)
    assert loss("split", [True, True]) == pytest.approx(loss("hr"), rel=1e-6)
    assert loss("split", [False, False]) == pytest.approx(loss("projected"), rel=1e-6)
    assert loss("hr") != pytest.approx(loss("projected"), rel=1e-3)
    with pytest.raises(ValueError, match="^loss target 'split' needs the batch's jpeg flags$"):
        loss("split")
    flags = np.concatenate([sample_batch(_images(), 8, patch=16, scale=2, rng=np.random.default_rng(s),
                                         degradation="mixed").jpeg for s in range(50)])
    assert flags.dtype == bool and 0.2 < flags.mean() < 0.4
    assert not sample_batch(_images(), 8, patch=16, scale=2, rng=np.random.default_rng(0)).jpeg.any()


def test_projection_floor_orders_the_degradations_by_what_the_lr_alone_loses():
    """scripts/projection_floor.py: HR back-projected onto its own bicubic LR comes back almost
    exactly (the runtime's projection models that downscaler); a JPEG'd LR leaves far more,
    the more the lower the quality."""
    sys.path.insert(0, str(ROOT / "scripts"))
    try:
        from projection_floor import projection_floor
    finally:
        sys.path.pop(0)
    db = projection_floor(_images(size=64), crops=4, size=32, scale=2, rounds=3, seed=0)
    assert db["bicubic"] > 55 > 50 > db["lanczos"]
    assert db["bicubic+jpeg95"] > db["bicubic+jpeg85"] > db["bicubic+jpeg70"] > db["bicubic+jpeg50"]
    assert db["bicubic"] - db["bicubic+jpeg50"] > 20


def test_train_script_checks_resume_flags_against_the_saved_run(tmp_path):
    """`--resume` flags are overrides of the saved config: alone they need not be a valid one
    (here the saved run would supply --loss-back-projection), so the script must not reject
    them before it has read the run."""
    res = subprocess.run([sys.executable, str(ROOT / "scripts" / "train.py"), "--resume", "--name", "r",
                          "--runs", str(tmp_path), "--loss-target", "projected"],
                         capture_output=True, text=True, timeout=300)
    assert res.returncode == 1
    assert res.stderr.strip().splitlines()[-1] == f"nothing to resume: {tmp_path / 'r' / 'state.pt'} does not exist"


def test_train_timed_ends_on_a_cosine_with_the_flags_given(tmp_path):
    """scripts/train_timed.py (the lent-GPU entry point): phase 1 at the constant peak LR, then
    a cosine to the end step its budget reaches, with the recipe's flags (the same set as
    scripts/train.py's: models.train_flags)."""
    from PIL import Image
    data = tmp_path / "data"
    data.mkdir()
    for i, img in enumerate(_images()):
        Image.fromarray(img).save(data / f"p{i}.png")
    res = subprocess.run([sys.executable, str(ROOT / "scripts" / "train_timed.py"), "--config", "tiny-binary",
                          "--minutes", "0.75", "--probe-steps", "3", "--warmup-steps", "1", "--batch", "2",
                          "--patch", "16", "--t-min", "1600", "--data", str(data), "--runs", str(tmp_path / "runs"),
                          "--loss", "l2", "--degradation", "mixed", "--threads", "1"],
                         capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-2000:]
    assert "phase 1: 3 steps at" in res.stdout
    state = torch.load(tmp_path / "runs" / "tiny-binary" / "state.pt", weights_only=False)
    cfg = state["config"]
    assert (cfg["t_min"], cfg["lr_schedule"], cfg["decay_start"]) == (1600, "cosine", 3)
    assert (cfg["loss"], cfg["degradation"]) == ("l2", "mixed")   # every TrainConfig flag reaches it
    assert state["step"] == cfg["steps"] >= 3
    res = subprocess.run([sys.executable, str(ROOT / "scripts" / "train_timed.py"), "--config", "tiny-binary",
                          "--minutes", "0.75", "--probe-steps", "2", "--warmup-steps", "1", "--batch", "2",
                          "--patch", "16", "--data", str(data), "--runs", str(tmp_path / "runs"),
                          "--name", "flat", "--no-anneal", "--threads", "1"],
                         capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-2000:]
    assert "phase 1: 2 steps at" in res.stdout and " steps/s; constant over " in res.stdout
    state = torch.load(tmp_path / "runs" / "flat" / "state.pt", weights_only=False)
    assert state["config"]["lr_schedule"] == "constant"
    assert state["step"] == state["config"]["steps"] >= 2


def _pack_carry():
    sys.path.insert(0, str(ROOT / "scripts"))
    try:
        from pack_carry import pack
    finally:
        sys.path.pop(0)
    return pack


def _carry_sources(tmp_path):
    from PIL import Image
    train, teachers = tmp_path / "train", tmp_path / "teachers"
    train.mkdir()
    teachers.mkdir()
    noisy = np.random.default_rng(1).integers(0, 256, (40, 56, 3), dtype=np.uint8)
    for i, img in enumerate([*_images(), noisy]):
        Image.fromarray(img).save(train / f"p{i}.png")
    (teachers / "teacher.json").write_text("{}")
    (teachers / "clean.bin").write_bytes(b"\x01\x02")
    return train, teachers


def test_pack_carry_keeps_every_pixel_in_the_same_order(tmp_path):
    """The lent-GPU carry (scripts/pack_carry.py): lossless WebP gives back each training
    image's pixels, listed in the order data/train lists them, so a run sees the same data
    stream; the teachers are copied as they are."""
    from bidiff.models.data import list_images, load_rgb
    train, teachers = _carry_sources(tmp_path)
    out = tmp_path / "build" / "carry"
    size = _pack_carry()(train, teachers, out)
    packed, sources = list_images(out / "train"), list_images(train)
    assert [p.suffix for p in packed] == [".webp"] * 4
    assert [p.stem for p in packed] == [p.stem for p in sources]
    for a, b in zip(packed, sources):
        assert np.array_equal(load_rgb(a), load_rgb(b))
    assert (out / "teachers" / "clean.bin").read_bytes() == b"\x01\x02"
    assert size == sum(p.stat().st_size for p in out.rglob("*") if p.is_file())
    assert sorted(p.name for p in out.parent.iterdir()) == ["carry"]      # no staging left


def test_pack_carry_refuses_an_oversized_carry_and_writes_nothing(tmp_path):
    train, teachers = _carry_sources(tmp_path)
    out = tmp_path / "build" / "carry"
    with pytest.raises(SystemExit, match=r"^packed data is 0\.0 MiB, over the 0 MiB a device call "
                                         r"carries: carry the training images in two calls$"):
        _pack_carry()(train, teachers, out, limit=100)
    assert list(out.parent.iterdir()) == []
    # p0.png < p0.w.png, but p0.w.webp < p0.webp
    (train / "p0.w.png").write_bytes((train / "p1.png").read_bytes())
    with pytest.raises(SystemExit, match=r"^the \.webp names of .*train sort in another order than the "
                                         r"originals \(a dot in a file name\?\): rename them, or the "
                                         r"data stream would change$"):
        _pack_carry()(train, teachers, out)
    assert list(out.parent.iterdir()) == []
    (teachers / "teacher.json").unlink()
    with pytest.raises(SystemExit, match=r"^no teachers in .*teachers \(run scripts/prepare_data\.py "
                                         r"--teachers first\)$"):
        _pack_carry()(train, teachers, out)
    assert list(out.parent.iterdir()) == []


def test_l2_loss_is_the_mean_squared_error_of_the_same_comparison():
    """``loss="l2"`` squares the very difference L1 takes the magnitude of (x0 here)."""
    cfg = replace(TINY, formulation=Formulation("residual", 4.0, "sample"))
    hr, cond = torch.rand(2, 3, 8, 8), torch.rand(2, 3, 8, 8)
    abar = torch.from_numpy(alphas_cumprod().copy())
    half = lambda x_t, c, t: torch.full_like(x_t, 0.5)    # noqa: E731
    err = 0.5 - 4 * (hr - cond)
    l1 = diffusion_loss(half, hr, cond, 1700, torch.randn(hr.shape), cfg, abar)
    l2 = diffusion_loss(half, hr, cond, 1700, torch.randn(hr.shape), cfg, abar, loss="l2")
    assert l1.item() == pytest.approx(err.abs().mean().item(), rel=1e-6)
    assert l2.item() == pytest.approx(err.square().mean().item(), rel=1e-6)
    with pytest.raises(ValueError, match="^unknown loss 'huber'; valid: l1, l2, l1-luma, l2-luma$"):
        TrainConfig(loss="huber")


def test_luma_losses_weigh_colour_a_quarter_of_brightness():
    """``l1-luma`` / ``l2-luma``: a grey error costs what plain L1 / L2 charges; an error with no
    luma in it (Cr alone) costs a quarter of its chroma distance; the loss reaches the network
    through the same comparison (x0 here)."""
    l1_luma, l2_luma = LOSSES["l1-luma"], LOSSES["l2-luma"]
    grey = torch.full((2, 3, 4, 4), -0.3)
    assert l1_luma(grey).item() == pytest.approx(0.3, rel=1e-6)
    assert l2_luma(grey).item() == pytest.approx(0.09, rel=1e-5)
    ycbcr = torch.tensor([[0.299, 0.587, 0.114], [-0.168736, -0.331264, 0.5], [0.5, -0.418688, -0.081312]])
    red_only = torch.linalg.solve(ycbcr, torch.tensor([0.0, 0.0, 0.2]))    # Y = Cb = 0, Cr = 0.2
    d = red_only.view(1, 3, 1, 1).expand(2, 3, 4, 4)
    assert l1_luma(d).item() == pytest.approx(0.25 * 0.2, rel=1e-5)
    assert l2_luma(d).item() == pytest.approx(0.25 * 0.04, rel=1e-4)
    cfg = replace(TINY, formulation=Formulation("residual", 4.0, "sample"))
    hr, cond = torch.rand(2, 3, 8, 8), torch.rand(2, 3, 8, 8)
    abar = torch.from_numpy(alphas_cumprod().copy())
    half = lambda x_t, c, t: torch.full_like(x_t, 0.5)    # noqa: E731
    got = diffusion_loss(half, hr, cond, 1700, torch.randn(hr.shape), cfg, abar, loss="l1-luma")
    assert got.item() == pytest.approx(l1_luma(0.5 - 4 * (hr - cond)).item(), rel=1e-6)
    assert TrainConfig(loss="l2-luma").loss == "l2-luma"


def test_bf16_precision_runs_the_network_under_autocast_and_keeps_float32_weights(tmp_path):
    """``precision="bf16"``: the loss is near fp32's but not equal (the convs ran in bf16), its
    gradients reach float32 parameters, and a run saves it in its config."""
    model, hr, cond, noise, abar = _model_and_batch(TINY, 2, seed=3)
    exact = diffusion_loss(model, hr, cond, 1000, noise, TINY, abar)
    fast = diffusion_loss(model, hr, cond, 1000, noise, TINY, abar, precision="bf16")
    assert fast.dtype == torch.float32
    assert fast.item() != exact.item()
    assert fast.item() == pytest.approx(exact.item(), rel=0.05)
    fast.backward()
    assert all(p.grad is None or p.grad.dtype == torch.float32 for p in model.parameters())
    run = train(_cfg(precision="bf16", steps=2), tmp_path / "r", images=_images(), model_config=TINY,
                progress=False)
    assert run.step == 2 and all(p.dtype == torch.float32 for p in run.model.parameters())
    state = torch.load(tmp_path / "r" / "state.pt", weights_only=False)
    assert state["config"]["precision"] == "bf16"
    with pytest.raises(ValueError, match="^unknown precision 'fp16'; valid: fp32, bf16$"):
        TrainConfig(precision="fp16")


def test_refine_t_trains_a_second_call_on_the_first_calls_estimate():
    """The second call sees x_t at refine_t made, as the DDIM update makes it, from the first
    call's clipped x0 and the ε it implies; the loss is the mean of both calls' losses."""
    cfg = replace(TINY, formulation=Formulation("residual", 4.0, "sample"))
    hr, cond, noise = torch.rand(2, 3, 8, 8), torch.rand(2, 3, 8, 8), torch.randn(2, 3, 8, 8)
    abar = torch.from_numpy(alphas_cumprod().copy())
    calls = []

    def spy(x_t, c, t):
        calls.append((x_t, int(t[0, 0])))
        return torch.full_like(x_t, 1.5 if len(calls) == 1 else 0.25)

    x0 = 4 * (hr - cond)
    loss = diffusion_loss(spy, hr, cond, 1700, noise, cfg, abar, refine_t=0)
    assert [t for _, t in calls] == [1700, 0]
    a, a0 = abar[1700], abar[0]
    eps = (calls[0][0] - a.sqrt() * 1.0) / (1 - a).sqrt()          # the estimate clipped to 1
    torch.testing.assert_close(calls[1][0], a0.sqrt() * 1.0 + (1 - a0).sqrt() * eps)
    want = ((1.5 - x0).abs().mean() + (0.25 - x0).abs().mean()) / 2
    assert loss.item() == pytest.approx(want.item(), rel=1e-6)
    with pytest.raises(ValueError, match="^a refining second call needs an x0-predicting model and no teacher$"):
        diffusion_loss(spy, hr, cond, 1700, noise, TINY, abar, refine_t=0)
    with pytest.raises(ValueError, match=r"^refine_t 2000 is outside -1\.\.1999 \(-1: off\)$"):
        TrainConfig(refine_t=2000)


def test_first_x_t_zeros_gives_the_first_call_zeros_and_the_refining_call_the_estimate():
    """``first_x_t="zeros"``: the first call sees x_t = 0 at its t (as a sampler started from
    x_T = 0), and the refining call sees what the DDIM update makes from that x_t and the first
    call's clipped x0; an ε model is refused (its target would be unpredictable noise)."""
    cfg = replace(TINY, formulation=Formulation("residual", 4.0, "sample"))
    hr, cond, noise = torch.rand(2, 3, 8, 8), torch.rand(2, 3, 8, 8), torch.randn(2, 3, 8, 8)
    abar = torch.from_numpy(alphas_cumprod().copy())
    calls = []

    def spy(x_t, c, t):
        calls.append(x_t.clone())
        return torch.full_like(x_t, 0.5)

    diffusion_loss(spy, hr, cond, 1999, noise, cfg, abar, refine_t=0, first_x_t="zeros")
    assert torch.equal(calls[0], torch.zeros_like(hr))
    a, a0 = abar[1999], abar[0]
    eps = (0 - a.sqrt() * 0.5) / (1 - a).sqrt()
    torch.testing.assert_close(calls[1], torch.full_like(hr, float(a0.sqrt() * 0.5 + (1 - a0).sqrt() * eps)))
    calls.clear()
    diffusion_loss(spy, hr, cond, 1999, noise, cfg, abar)
    assert not torch.equal(calls[0], torch.zeros_like(hr))
    with pytest.raises(ValueError, match="^x_t = 0 in the first call needs an x0-predicting model$"):
        diffusion_loss(spy, hr, cond, 1999, noise, TINY, abar, first_x_t="zeros")
    with pytest.raises(ValueError, match="^unknown first_x_t 'ones'; valid: noise, zeros$"):
        TrainConfig(first_x_t="ones")


def test_train_passes_first_x_t_refine_t_and_loss_target_to_the_loss(tmp_path, monkeypatch):
    """The run's config reaches every step's loss (the options above are inert otherwise)."""
    import bidiff.models.train as train_module
    seen = []
    real = train_module.diffusion_loss

    def spy(*args, **kw):
        seen.append((kw["first_x_t"], kw["refine_t"], kw["target"]))
        return real(*args, **kw)

    monkeypatch.setattr(train_module, "diffusion_loss", spy)
    x0_tiny = replace(TINY, formulation=Formulation("residual", 4.0, "sample"))
    train(_cfg(steps=2, first_x_t="zeros", refine_t=0, loss_back_projection=1,
               loss_target="projected"), tmp_path / "r", images=_images(), model_config=x0_tiny,
          progress=False)
    assert seen == [("zeros", 0, "projected"), ("zeros", 0, "projected")]
