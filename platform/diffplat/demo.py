"""`diffplat demo`: the whole pipeline on one machine, on inputs it makes itself.

Three jobs on one local Ray, each a recipe shipped in the package: `demo.yaml` (BDD -> text-to-image
LoRA -> generation -> YOLO filter), `demo_ic_lora.yaml` (BDD -> composites -> In-Context LoRA ->
panel filling) and `demo_controlnet.yaml` (BDD masks -> ControlNet -> images from maps -> filter).
"""

from __future__ import annotations

import logging
import time
from importlib import resources
from pathlib import Path

import yaml

from diffplat.config import load_config
from diffplat.data.synthetic_bdd import write_synthetic_bdd
from diffplat.models.tiny import write_tiny_model
from diffplat.runner import JobResult, ray_session, run_job

log = logging.getLogger("diffplat")

# In this order: the ControlNet leg trains on the shards the LoRA leg's prepare wrote.
DEMO_JOBS = {"lora": "demo.yaml", "ic_lora": "demo_ic_lora.yaml", "controlnet": "demo_controlnet.yaml"}


def demo_config_path(name: str = "demo.yaml") -> Path:
    return Path(str(resources.files("diffplat") / "recipes" / name))


def demo_config_paths() -> list[Path]:
    return [demo_config_path(name) for name in DEMO_JOBS.values()]


def _overrides_for(path: Path, overrides: list[str]) -> list[str]:
    """`--set train.max_train_steps=5` applies to every demo job that has a train section."""
    sections = yaml.safe_load(path.read_text())
    return [o for o in overrides if o.split("=", 1)[0].split(".", 1)[0] in sections]


def run_demo(output: str | Path, overrides: list[str] | None = None) -> dict[str, JobResult]:
    out = Path(output).resolve()
    configs = {leg: load_config(demo_config_path(name), _overrides_for(demo_config_path(name), overrides or []))
               for leg, name in DEMO_JOBS.items()}  # fmt: skip
    start = time.perf_counter()
    log.info("demo: writing a tiny SDXL and its inpainting variant to %s", out)
    write_tiny_model(out / "base-model", "sdxl")
    # Same seed, so the same text encoders and VAE: only the UNet has 9 input channels.
    write_tiny_model(out / "base-model-inpaint", "sdxl-inpaint")
    log.info("demo: writing a synthetic BDD-like dataset to %s", out / "bdd")
    write_synthetic_bdd(out / "bdd", num_images=24)
    setup = time.perf_counter() - start
    results = {}
    with ray_session(configs["lora"].ray):  # one Ray for every job
        for leg, config in configs.items():
            log.info("demo: job %s (%s)", config.name, DEMO_JOBS[leg])
            results[leg] = run_job(config, out)
    print(summary(out, setup, results))
    return results


def summary(out: Path, setup: float, results: dict[str, JobResult]) -> str:
    lines = ["", "diffplat demo: done", "", f"  {'setup':<19} {setup:7.1f} s"]
    total = setup
    for leg, result in results.items():
        for i, (stage, secs) in enumerate(result.seconds.items()):
            lines.append(f"  {leg if i == 0 else '':<9} {stage:<9} {secs:7.1f} s")
            total += secs
    lines.append(f"  {'total':<19} {total:7.1f} s")
    lora, ic, cn = results["lora"].outputs, results["ic_lora"].outputs, results["controlnet"].outputs
    prep, cache, train, gen, filt = (lora.get(k, {}) for k in ("prepare", "cache", "train", "generate", "filter"))
    ic_prep, ic_train, ic_gen = (ic.get(k, {}) for k in ("prepare", "train", "generate"))
    cn_train, cn_gen, cn_filt = (cn.get(k, {}) for k in ("train", "generate", "filter"))
    lines += [
        "",
        f"  base models  {out / 'base-model'}, {out / 'base-model-inpaint'}",
        f"  data         {out / 'data'}  ({prep.get('rows_written')} rows, skipped {prep.get('skipped')})",
        f"  cache        {out / 'cache'}  ({cache.get('rows')} rows of latents + text embeddings)",
        f"  lora         {out / 'adapters/lora'}  (trained from the cache; final loss {train.get('final_loss', float('nan')):.4f})",
        f"  generations  {out / 'generations'}  ({gen.get('images')} images, contact_sheet.png, labels/, annotated/)",
        f"  filter       kept {filt.get('kept')} of {filt.get('images')}: {out / 'generations/gallery/index.html'}",
        f"  composites   {out / 'data-ic/composites'}  ({ic_prep.get('rows_written')} of layout {ic_prep.get('layout')})",
        f"  ic_lora      {out / 'adapters/ic_lora'}  (final loss {ic_train.get('final_loss', float('nan')):.4f})",
        f"  fills        {out / 'ic_lora'}  ({ic_gen.get('images')} composites, panels 2 3 filled, comparisons/)",
        f"  controlnet   {out / 'adapters/controlnet'}  (final loss {cn_train.get('final_loss', float('nan')):.4f})",
        f"  from maps    {out / 'controlnet'}  ({cn_gen.get('images')} images, comparisons/; "
        f"filter kept {cn_filt.get('kept')} of {cn_filt.get('images')})",
        f"  mlflow       {results['lora'].tracking_uri}",
        "",
        "Open the MLflow dashboard on it:",
        f"  .venv/bin/mlflow ui --backend-store-uri {results['lora'].tracking_uri} --host 127.0.0.1 --port 5000",
        "Fill panels of a composite yourself (source 1's flags):",
        f"  .venv/bin/diffplat ic-lora-infer --lora_path {out / 'adapters/ic_lora'} --input_image "
        f"{out / 'data-ic/composites/composite-00000.png'} --prompt \"...\" --panels_to_inpaint 2 3 --save_comparison",
        "",
    ]
    return "\n".join(lines)
