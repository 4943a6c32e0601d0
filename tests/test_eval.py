"""Evaluation on a tiny checkpoint: tables and picture are written, bicubic is scored right."""
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from bidiff import runtime
from bidiff.models import create_model, get_config, save_checkpoint
from bidiff.models.evaluate import center_crop, run_eval
from bidiff.models.metrics import psnr_y, ssim_y

TINY = get_config("tiny-binary")
ROOT = Path(__file__).resolve().parents[1]



@pytest.fixture
def photos(tmp_path):
    rng = np.random.default_rng(0)
    folder = tmp_path / "hr"
    folder.mkdir()
    for name, size in [("a", (40, 36)), ("b", (37, 41))]:
        smooth = np.kron(rng.random((size[0] // 4 + 1, size[1] // 4 + 1, 3)), np.ones((4, 4, 1)))
        img = (smooth[:size[0], :size[1]] * 255).round().astype(np.uint8)
        Image.fromarray(img).save(folder / f"{name}.png")
    return folder


def test_eval_writes_table_json_and_picture(tmp_path, photos):
    torch.manual_seed(0)
    ckpt = tmp_path / "tiny.safetensors"
    save_checkpoint(ckpt, create_model(TINY), TINY, {"steps": "0"})
    out = tmp_path / "eval"
    result = run_eval(ckpt, photos, out, steps=(2, 1), max_side=32, picture_crop=16)
    md = (out / "results.md").read_text()
    for row in ("| bicubic |", "| 2 steps |", "| 1 steps |", "| a |", "| b |"):
        assert row in md
    saved = json.loads((out / "results.json").read_text())
    assert list(saved["scores"]) == ["bicubic"]
    assert set(saved["scores"]["bicubic"]) == {"bicubic", "2 steps", "1 steps"}
    assert saved["info"]["config"] == "tiny-binary"
    assert Image.open(out / "comparison.png").size == (3 * 16 + 2 * 4, 2 * 16 + 4)

    import cv2
    hr = center_crop(np.asarray(Image.open(photos / "b.png")), max_side=32, multiple=2)
    lr = np.asarray(Image.fromarray(hr).resize((hr.shape[1] // 2, hr.shape[0] // 2),
                                               Image.Resampling.BICUBIC))
    up = cv2.resize(lr.astype(np.float32) / 255, (hr.shape[1], hr.shape[0]),
                    interpolation=cv2.INTER_CUBIC)
    up = np.round(np.clip(up, 0, 1) * 255) / 255  # the 8-bit output evaluate() scores
    expected = [psnr_y(up, hr / 255, border=2), ssim_y(up, hr / 255, border=2)]
    assert result.scores["bicubic"]["bicubic"]["b"] == pytest.approx(expected, abs=1e-6)


def test_center_crop():
    img = np.arange(10 * 7 * 3).reshape(10, 7, 3)
    assert center_crop(img, max_side=4, multiple=2).shape == (4, 4, 3)
    assert (center_crop(img, max_side=4, multiple=2) == img[3:7, 1:5]).all()
    assert center_crop(img, max_side=None, multiple=4).shape == (8, 4, 3)


def test_eval_samples_with_the_checkpoints_sampler_settings(tmp_path, photos):
    """run_eval uses the checkpoint's tuned time_shift and back_projection unless told
    otherwise (and the spacing when told), and records them."""
    torch.manual_seed(0)
    model = create_model(TINY)
    plain, tuned = tmp_path / "plain.safetensors", tmp_path / "tuned.safetensors"
    save_checkpoint(plain, model, TINY)
    save_checkpoint(tuned, model, TINY, {"time_shift": "700", "back_projection": "3"})
    kw = dict(steps=(3,), max_side=16, picture_crop=16)
    a = run_eval(plain, photos, tmp_path / "a", **kw)
    b = run_eval(tuned, photos, tmp_path / "b", **kw)
    c = run_eval(tuned, photos, tmp_path / "c", time_shift=0, back_projection=0, **kw)
    d = run_eval(plain, photos, tmp_path / "d", back_projection=3, **kw)
    e = run_eval(plain, photos, tmp_path / "e", timestep_spacing="trailing", **kw)
    info = [r.info["samplers"] for r in (a, b, c, d, e)]
    assert info == ["3 steps: leading, shift 0, back-projection x0",
                    "3 steps: leading, shift 700, back-projection x3",
                    "3 steps: leading, shift 0, back-projection x0",
                    "3 steps: leading, shift 0, back-projection x3",
                    "3 steps: trailing, shift 0, back-projection x0"]
    assert e.scores["bicubic"]["3 steps"] != a.scores["bicubic"]["3 steps"]
    with pytest.raises(ValueError, match="timestep_spacing must be one of leading, trailing, linspace, got 'middle'"):
        run_eval(plain, photos, tmp_path / "f", timestep_spacing="middle", **kw)
    a, b, c, d = (r.scores["bicubic"] for r in (a, b, c, d))
    assert a == c and a["3 steps"] != b["3 steps"]
    assert a["bicubic"] == d["bicubic"] and a["3 steps"] != d["3 steps"]
    # back-projected runs also score the same correction applied to bicubic (the fair baseline)
    assert list(a) == ["bicubic", "3 steps"]
    assert list(d) == ["bicubic", "bicubic + back-projection x3", "3 steps"]
    assert d["bicubic + back-projection x3"] != d["bicubic"]
    assert "| bicubic + back-projection x3 |" in (tmp_path / "d" / "results.md").read_text()


def test_eval_through_the_runtime_script(tmp_path, photos):
    """scripts/eval.py --runtime onnx exports the checkpoint and samples with the device runtime:
    its scores are those of the runtime's own sampler on the same crops."""
    from bidiff import runtime
    from bidiff.exporter import export_artifact
    from bidiff.models.data import make_pair
    from bidiff.models.evaluate import to_uint8
    from bidiff.runtime.sampler import sample
    torch.manual_seed(0)
    ckpt = tmp_path / "tiny.safetensors"
    save_checkpoint(ckpt, create_model(TINY), TINY, {"time_shift": "300", "back_projection": "1"})
    out = tmp_path / "eval"
    res = subprocess.run([sys.executable, str(ROOT / "scripts" / "eval.py"), "-c", str(ckpt),
                          "-i", str(photos), "-o", str(out), "--steps", "2", "--max-side", "32",
                          "--picture-crop", "16", "--runtime", "onnx", "--threads", "1"],
                         capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr
    saved = json.loads((out / "results.json").read_text())
    assert saved["info"]["sampler"] == "bidiff runtime, onnxruntime, tiles of 128, overlap default, ensemble of 1"
    assert list(saved["scores"]["bicubic"]) == ["bicubic", "bicubic + back-projection x1", "2 steps"]
    export_artifact(ckpt, out=tmp_path / "art", progress=False, measure_float=False)
    hr = center_crop(np.asarray(Image.open(photos / "a.png")), max_side=32, multiple=2)
    pair = make_pair(hr, 2)
    with runtime.load(tmp_path / "art", backend="onnxruntime", threads=1) as up:
        img = sample(up.backend, pair.lr[0], scale=2, formulation=up.formulation, steps=2,
                     time_shift=300, back_projection=1)
    want = [psnr_y(to_uint8(img) / 255, hr / 255, border=2), ssim_y(to_uint8(img) / 255, hr / 255, border=2)]
    assert saved["scores"]["bicubic"]["2 steps"]["a"] == pytest.approx(want, abs=1e-9)
    other = tmp_path / "other.safetensors"
    save_checkpoint(other, create_model(TINY), TINY)
    res = subprocess.run([sys.executable, str(ROOT / "scripts" / "eval.py"), "-c", str(other),
                          "-i", str(photos), "-o", str(tmp_path / "eval2"), "--artifact",
                          str(tmp_path / "art")], capture_output=True, text=True, timeout=600)
    assert res.returncode == 1 and not (tmp_path / "eval2").exists()
    assert res.stderr.strip().splitlines() == [
        f"{tmp_path / 'art'} was not exported from {other}: pass its checkpoint with -c"]
    res = subprocess.run([sys.executable, str(ROOT / "scripts" / "eval.py"), "-c", str(ckpt),
                          "-i", str(photos), "-o", str(tmp_path / "eval3"), "--ensemble", "2"],
                         capture_output=True, text=True, timeout=600)
    assert res.returncode == 1 and not (tmp_path / "eval3").exists()
    assert res.stderr.strip().splitlines() == ["--overlap and --ensemble need --runtime or --artifact "
                                               "(the PyTorch sampler takes whole images, once)"]


def test_eval_three_degradations_default_steps_and_the_papers_sampler(tmp_path, photos):
    """The issue-17 table: every degradation a column, the checkpoint's default steps and twice
    that (its trailing spacing), the paper's 50 leading steps, and both bicubic baselines."""
    from dataclasses import replace
    from bidiff.models.data import EVAL_DEGRADATIONS, eval_downsample
    from bidiff.runtime.formulation import Formulation
    cfg = replace(TINY, formulation=Formulation("residual", 4.0, "sample"))
    torch.manual_seed(0)
    ckpt = tmp_path / "x0.safetensors"
    save_checkpoint(ckpt, create_model(cfg), cfg, {"default_steps": "2", "timestep_spacing": "trailing",
                                                   "back_projection": "2"})
    res = run_eval(ckpt, photos, tmp_path / "e", max_side=16, picture_crop=16,
                   degradations=EVAL_DEGRADATIONS, paper=True)
    assert list(res.scores) == ["bicubic", "lanczos", "bicubic+jpeg85"]
    assert res.methods == ["bicubic", "bicubic + back-projection x2", "2 steps", "4 steps",
                           "paper's sampler (50 leading steps)"]
    assert "4 steps: trailing, shift 0, back-projection x2" in res.info["samplers"]
    # the untrained x0 head outputs x0 = 0: the model is exactly bicubic + back-projection
    for d in res.scores:
        for k, v in res.scores[d]["2 steps"].items():
            assert v == pytest.approx(res.scores[d]["bicubic + back-projection x2"][k], abs=1e-12)
    assert res.scores["lanczos"]["bicubic"] != res.scores["bicubic"]["bicubic"]
    md = (tmp_path / "e" / "results.md").read_text()
    assert "| method | bicubic LR | lanczos LR | bicubic+jpeg85 LR | mean PSNR | vs " in md
    hr = np.zeros((16, 16, 3), np.uint8) + 128
    assert eval_downsample(hr, 2, "bicubic+jpeg85").shape == (8, 8, 3)
    with pytest.raises(ValueError, match="unknown degradation 'area'"):
        eval_downsample(hr, 2, "area")


def test_stress_degradations_are_what_they_say() -> None:
    """Each robustness probe is its documented degradation, deterministic, and none is a twin
    of the evaluation's own three."""
    from bidiff.models.data import EVAL_DEGRADATIONS, STRESS_DEGRADATIONS, eval_downsample
    hr = np.asarray(Image.open(Path(runtime.__file__).parent / "samples" / "astronaut_128.png")
                    .convert("RGB"))
    lr = {d: eval_downsample(hr, 2, d) for d in EVAL_DEGRADATIONS + STRESS_DEGRADATIONS}
    assert all(v.shape == (64, 64, 3) and v.dtype == np.uint8 for v in lr.values())
    box = np.asarray(Image.fromarray(hr).resize((64, 64), Image.Resampling.BOX))
    np.testing.assert_array_equal(lr["box"], box)
    noise = lr["bicubic+noise2"].astype(np.float64) - lr["bicubic"]
    assert abs(noise.mean()) < 0.1 and 1.8 < noise.std() < 2.2          # sigma 2, zero mean
    np.testing.assert_array_equal(eval_downsample(hr, 2, "bicubic+noise2"), lr["bicubic+noise2"])
    err = {d: np.abs(lr[d].astype(np.float64) - lr["bicubic"]).mean() for d in lr}
    assert err["bicubic+jpeg55"] > err["bicubic+jpeg85"] > 0                # stronger compression
    light = np.abs(lr["lanczos+jpeg95"].astype(np.float64) - lr["lanczos"]).mean()
    assert 0 < light < err["bicubic+jpeg85"]                                # lighter compression
    assert err["blur0.8+bicubic"] > 0.5                                    # softer than bicubic
    assert len({v.tobytes() for v in lr.values()}) == len(lr)
