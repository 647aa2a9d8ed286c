"""`diffplat demo`: the whole pipeline on one machine, on inputs it makes itself.

Setup writes synthetic BDD-like scenes and a tiny SDXL whose VAE has learnt to reconstruct them.
Then five jobs on one local Ray, each a recipe shipped in the package: `demo_pretrain.yaml` (the
tiny SDXL's UNet learns the scenes from scratch: a full fine-tune, so every later picture is a
scene, not noise), `demo.yaml` (night frames -> text-to-image LoRA -> generation -> YOLO filter ->
does a detector trained with the kept images do better?), `demo_ic_lora.yaml` (composites ->
In-Context LoRA on the base's inpainting variant -> panel filling), `demo_controlnet.yaml` (BDD
masks -> ControlNet -> images from maps -> filter) and `demo_flux.yaml` (the In-Context LoRA
paper's recipe on a tiny, untrained FLUX.1: three-frame composites -> LoRA -> a frame filled).
Last, demo_quality.py measures what each adapter changed against its base (quality.json).
"""

from __future__ import annotations

import logging
import time
from concurrent.futures import ThreadPoolExecutor
from importlib import resources
from pathlib import Path

import yaml

from diffplat import demo_quality
from diffplat.config import load_config
from diffplat.data.images import readable_images
from diffplat.data.synthetic_bdd import write_synthetic_bdd
from diffplat.models.inpainting import inpainting_variant
from diffplat.models.tiny import write_tiny_model
from diffplat.runner import JobResult, ray_session, run_job

log = logging.getLogger("diffplat")

# In this order: every leg builds on the base the pretraining makes; the ControlNet leg trains on
# its shards and the LoRA leg's evaluate stage takes its BDD -> YOLO export as the real set.
DEMO_JOBS = {"pretrain": "demo_pretrain.yaml", "lora": "demo.yaml", "ic_lora": "demo_ic_lora.yaml",
             "controlnet": "demo_controlnet.yaml", "flux": "demo_flux.yaml"}  # fmt: skip
FRAMES, VAL_FRAMES, VAE_FIT_STEPS, DECODER_STEPS = 144, 24, 250, 400


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
    results = {}
    # Setup writes the inputs in a thread while Ray starts: Ray's start is mostly waiting.
    with ThreadPoolExecutor(max_workers=1) as pool:
        writing = pool.submit(_write_inputs, out)
        with ray_session(configs["lora"].ray):  # one Ray for every job
            setup = writing.result()
            for leg, config in configs.items():
                results[leg] = run_job(config, out)
                if leg == "pretrain":  # the In-Context LoRA leg's base: 9 input channels, the new 5 at zero
                    inpainting_variant(str(out / "base-model"), out / "base-model-inpaint")
    start = time.perf_counter()
    generated = configs["controlnet"].generate  # measured at the scale it generated with (overrides included)
    measures = demo_quality.measure_demo(out, generated.controlnet.conditioning_scale if generated else 1.0)
    demo_quality.write_quality(out, measures)
    first = results["pretrain"]
    demo_quality.log_quality(out, measures, first.tracking_uri, _experiment_id(first))
    print(summary(out, setup, results, measures, time.perf_counter() - start))
    return results


def _write_inputs(out: Path) -> float:
    """The demo's inputs: synthetic frames (and a held-out set), a tiny SDXL whose VAE has learnt
    them, a tiny FLUX.1. Returns the seconds taken."""
    start = time.perf_counter()
    log.info("demo: synthetic BDD-like scenes, a tiny SDXL whose VAE learns them, and a tiny FLUX.1 in %s", out)
    write_synthetic_bdd(out / "bdd", num_images=FRAMES)
    write_synthetic_bdd(out / "bdd-val", num_images=VAL_FRAMES, seed=1)  # held out: evaluate's and quality's
    write_tiny_model(out / "base-model-random", "sdxl", fit_images=readable_images(out / "bdd" / "images")[0],
                     fit_steps=VAE_FIT_STEPS, whole_words=True, decoder_steps=DECODER_STEPS)  # fmt: skip
    write_tiny_model(out / "base-model-flux", "flux")
    return time.perf_counter() - start


def _experiment_id(result: JobResult) -> str:
    from mlflow import MlflowClient

    return MlflowClient(tracking_uri=result.tracking_uri).get_run(result.run_id).info.experiment_id


def summary(out: Path, setup: float, results: dict[str, JobResult], measures: dict, measuring: float) -> str:
    """One screen: where each job's time went, what it wrote, and what to open next."""
    total = setup + sum(sum(r.seconds.values()) for r in results.values()) + measuring
    lines = ["", f"diffplat demo: done in {total:.0f} s (setup {setup:.0f} s)"]
    for leg, result in results.items():
        lines.append(f"  {leg:<10} " + ", ".join(f"{stage} {secs:.0f} s" for stage, secs in result.seconds.items()))
    lora, ic, cn = results["lora"].outputs, results["ic_lora"].outputs, results["controlnet"].outputs
    prep, train, gen, filt, ev = (lora.get(k, {}) for k in ("prepare", "train", "generate", "filter", "evaluate"))
    pre_prep, pre_cache, pre_train = (results["pretrain"].outputs.get(k, {}) for k in ("prepare", "cache", "train"))
    ic_prep, ic_train, ic_gen = (ic.get(k, {}) for k in ("prepare", "train", "generate"))
    cn_train, cn_gen = (cn.get(k, {}) for k in ("train", "generate"))
    fx_prep, fx_train, fx_gen = (results["flux"].outputs.get(k, {}) for k in ("prepare", "train", "generate"))
    loss = lambda t: f"final loss {t.get('final_loss', float('nan')):.4f}"  # noqa: E731
    from diffplat.tracking import runs_page

    experiment = _experiment_id(results["pretrain"])
    models = [r.outputs.get("train", {}).get("model") for r in results.values()]
    registered = ", ".join(m.removeprefix("models:/") for m in models if m) + " (alias demo: models:/<name>@demo)"
    lines += [
        f"  in {out}:",
        f"    data/ {pre_prep.get('rows_written')} rows (skipped {pre_prep.get('skipped')}), cache-pretrain/ "
        f"{pre_cache.get('rows')} rows of latents + embeddings -> base-model/ (a full fine-tune of "
        f"base-model-random's UNet from the cache, {loss(pre_train)})",
        f"    data-night/ {prep.get('rows_written')} night rows -> adapters/lora ({loss(train)}), adapters/ic_lora "
        f"({loss(ic_train)}), "
        f"adapters/controlnet ({loss(cn_train)})",
        f"    generations/ {gen.get('images')} images, kept {filt.get('kept')} (gallery/index.html); evaluation/ "
        f"mAP50-95 real {ev.get('real/map50_95', float('nan')):.3f}, real+kept "
        f"{ev.get('real+kept/map50_95', float('nan')):.3f} on {ev.get('val_images')} held-out frames: report.txt, "
        "comparison.png",
        f"    data-ic/composites/ {ic_prep.get('rows_written')} of layout {ic_prep.get('layout')}, ic_lora/ "
        f"{ic_gen.get('images')} filled (comparisons/); controlnet/ {cn_gen.get('images')} images from maps "
        "(comparisons/)",
        f"    FLUX.1: data-flux/composites/ {fx_prep.get('rows_written')} of layout 3x1, adapters/flux_ic_lora "
        f"({loss(fx_train)}), flux/ {fx_gen.get('images')} with frame 2 filled (comparisons/)",
        f"  what each adapter changed, against its base with the same prompts and seeds ({measuring:.0f} s; "
        "quality.json, quality/*.png):",
        *demo_quality.summary_lines(measures),
        f"  MLflow's model registry: {registered}",
        f"  the MLflow dashboard of these runs: .venv/bin/diffplat mlflow --workdir {out}, then "
        f"{runs_page('http://127.0.0.1:5000', experiment)}",
        "",
    ]
    return "\n".join(lines)
