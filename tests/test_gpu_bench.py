"""bench/gpu_train_step.py, the one-GPU SDXL LoRA step benchmark: its tiny mode runs on CPU and writes
every case, and its full config is SDXL's UNet (counted on the meta device, no step)."""

import json

import pytest

from helpers import run_bench

pytestmark = pytest.mark.timeout(300)


def _run(*args: str):
    return run_bench("gpu_train_step.py", *args)


def test_tiny_run_reports_every_case_on_cpu(tmp_path):
    out = tmp_path / "gpu.json"
    proc = _run("--tiny", "--steps", "2", "--warmup", "1", "--device", "cpu", "--json", str(out))
    result = json.loads(out.read_text())
    assert result["config"] == "tiny" and result["device"] == "cpu" and result["lora_params"] > 0
    cases = {(c["batch"], c["gradient_checkpointing"]): c for c in result["cases"]}
    assert sorted(cases) == [(1, False), (1, True), (4, False), (4, True)]
    for (batch, _), case in cases.items():
        assert case["status"] == "ok", case
        assert len(case["step_times_s"]) == 2 and all(t > 0 for t in case["step_times_s"])
        assert case["median_s"] > 0 and case["samples_per_s"] == pytest.approx(batch / case["median_s"])
        assert case["forward_flops"] > 0 and case["train_flops"] == 3 * case["forward_flops"]
        assert 0 < case["train_flops_counted"] <= case["train_flops"] and case["train_flops_executed"] >= case["train_flops_counted"]
        assert 0 < case["mfu"] <= 1 and 0 < case["mfu_counted"] <= case["mfu"]
    assert cases[(4, False)]["forward_flops"] == pytest.approx(4 * cases[(1, False)]["forward_flops"], rel=0.05)
    # checkpointing recomputes the forward in the backward: more FLOPs executed, the same counted as useful
    assert cases[(1, True)]["train_flops_executed"] > cases[(1, False)]["train_flops_executed"]
    assert "MFU" in proc.stdout and "batch" in proc.stdout


def test_full_config_is_the_sdxl_unet(tmp_path):
    out = tmp_path / "count.json"
    proc = _run("--count-only", "--batch-sizes", "1", "--json", str(out))
    result = json.loads(out.read_text())
    assert result["config"] == "sdxl" and result["resolution"] == 1024 and result["latent"] == 128
    assert result["unet_params"] == 2_567_463_684  # stabilityai/stable-diffusion-xl-base-1.0's UNet
    assert 20e6 < result["lora_params"] < 25e6  # rank 16 on to_k/to_q/to_v/to_out.0
    assert 6e12 < result["flops"]["1"]["forward_flops"] < 8e12  # ~6.8 TFLOP a forward at 1024x1024
    assert "2,567,463,684" in proc.stdout


def test_flux_family_tiny_run_and_full_config(tmp_path):
    """--family flux: FLUX.1-dev's transformer from its config (11.9B parameters, counted on the meta
    device), and the same step at toy size on CPU."""
    out = tmp_path / "flux.json"
    _run("--family", "flux", "--tiny", "--steps", "1", "--warmup", "1", "--batch-sizes", "1", "--device", "cpu",
         "--json", str(out))  # fmt: skip
    result = json.loads(out.read_text())
    assert result["config"] == "flux-tiny" and "proj_mlp" in result["lora_targets"]
    assert [c["status"] for c in result["cases"]] == ["ok", "ok"] and all(c["median_s"] > 0 for c in result["cases"])
    _run("--family", "flux", "--count-only", "--batch-sizes", "1", "--json", str(out))
    full = json.loads(out.read_text())
    assert full["config"] == "flux" and full["unet_params"] == 11_901_408_320 and full["latent"] == 128
    assert 50e12 < full["flops"]["1"]["forward_flops"] < 200e12  # 4,096 image + 512 text tokens through 57 blocks
