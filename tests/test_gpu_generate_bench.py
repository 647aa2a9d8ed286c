"""bench/gpu_generate.py, the one-GPU SDXL text-to-image benchmark: its tiny mode runs on CPU and reports every
case with the VAE decode timed apart, and its full configs are SDXL base's (counted on the meta device)."""

import json

import pytest

from helpers import run_bench

pytestmark = pytest.mark.timeout(300)


def _run(*args: str):
    return run_bench("gpu_generate.py", *args)


def test_tiny_run_reports_every_case_on_cpu(tmp_path):
    out = tmp_path / "generate.json"
    proc = _run("--tiny", "--steps", "3", "--repeats", "2", "--device", "cpu", "--json", str(out))
    result = json.loads(out.read_text())
    assert result["config"] == "tiny" and result["device"] == "cpu" and result["steps"] == 3
    assert result["guidance"] == 5.0 and result["unet_batch_factor"] == 2
    assert result["reference"]["s_per_image"] == 1.47
    cases = {(c["batch"], c["compile"]): c for c in result["cases"]}
    assert sorted(cases) == [(1, False), (1, True), (4, False), (4, True)]
    for batch in (1, 4):
        assert cases[(batch, True)]["status"].startswith("skipped"), "no torch.compile on CPU by default"
        case = cases[(batch, False)]
        assert case["status"] == "ok", case
        assert len(case["runs"]) == 2 and len(case["warmup_s"]) == 1
        for run in case["runs"]:
            assert run["text_encode_s"] > 0 and run["denoise_s"] > 0 and run["decode_s"] > 0
            assert run["total_s"] == pytest.approx(run["text_encode_s"] + run["denoise_s"] + run["decode_s"])
        # the decode is timed apart from the denoising loop: both medians present and positive
        assert case["decode_s"] > 0 and case["denoise_s"] > 0 and case["total_s"] > case["decode_s"]
        assert case["s_per_image"] == pytest.approx(case["total_s"] / batch)
        assert case["images_per_s"] == pytest.approx(batch / case["total_s"])
        assert case["unet_s_per_step"] == pytest.approx(case["denoise_s"] / 3)
        assert case["image_shape"] == [batch, 3, 64, 64]  # decoded pixels, not latents
        assert case["unet_step_flops"] > 0 and case["decode_flops"] > 0 and case["unet_tflops"] > 0
        assert "compile_s" not in case
    # classifier-free guidance doubles the UNet batch: 4 images cost 4x the FLOPs of 1
    assert cases[(4, False)]["unet_step_flops"] == pytest.approx(4 * cases[(1, False)]["unet_step_flops"], rel=0.05)
    assert "s/image" in proc.stdout and "decode s" in proc.stdout and "1.47" in proc.stdout


def test_full_configs_are_sdxl_base(tmp_path):
    out = tmp_path / "count.json"
    proc = _run("--count-only", "--batch-sizes", "1", "--json", str(out))
    result = json.loads(out.read_text())
    assert result["config"] == "sdxl" and result["resolution"] == 1024 and result["latent"] == 128
    assert result["steps"] == 30 and result["guidance"] == 5.0
    # stabilityai/stable-diffusion-xl-base-1.0's four models
    assert result["params"] == {"unet": 2_567_463_684, "vae": 83_653_863, "text_encoder": 123_060_480,
                                "text_encoder_2": 694_659_840}  # fmt: skip
    # a UNet step at guidance 5 runs the batch twice: 2 x ~6.8 TFLOP at 1024x1024
    assert 12e12 < result["flops"]["1"]["unet_step_flops"] < 15e12
    assert 5e12 < result["flops"]["1"]["decode_flops"] < 20e12
    assert "2,567,463,684" in proc.stdout and "694,659,840" in proc.stdout
