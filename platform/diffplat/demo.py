"""`diffplat demo`: the whole pipeline on one machine, on inputs it makes itself.

Four jobs on one local Ray, each a recipe shipped in the package: `demo.yaml` (BDD -> text-to-image
LoRA -> generation -> YOLO filter -> does a detector trained with the kept images do better?),
`demo_ic_lora.yaml` (BDD -> composites -> In-Context LoRA -> panel filling), `demo_controlnet.yaml`
(BDD masks -> ControlNet -> images from maps -> filter) and `demo_flux.yaml` (the In-Context LoRA
paper's recipe on a tiny FLUX.1: three-frame composites -> LoRA -> a frame filled).
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
DEMO_JOBS = {"lora": "demo.yaml", "ic_lora": "demo_ic_lora.yaml", "controlnet": "demo_controlnet.yaml",
             "flux": "demo_flux.yaml"}  # fmt: skip


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
    log.info("demo: a tiny SDXL, its inpainting variant, a tiny FLUX.1 and a synthetic BDD-like dataset in %s", out)
    write_tiny_model(out / "base-model", "sdxl")
    # Same seed, so the same text encoders and VAE: only the UNet has 9 input channels.
    write_tiny_model(out / "base-model-inpaint", "sdxl-inpaint")
    write_tiny_model(out / "base-model-flux", "flux")
    write_synthetic_bdd(out / "bdd", num_images=24)
    write_synthetic_bdd(out / "bdd-val", num_images=8, seed=1)  # held out: the evaluate stage's real validation
    setup = time.perf_counter() - start
    results = {}
    with ray_session(configs["lora"].ray):  # one Ray for every job
        for leg, config in configs.items():
            results[leg] = run_job(config, out)
    print(summary(out, setup, results))
    return results


def summary(out: Path, setup: float, results: dict[str, JobResult]) -> str:
    """One screen: where each job's time went, what it wrote, and what to open next."""
    total = setup + sum(sum(r.seconds.values()) for r in results.values())
    lines = ["", f"diffplat demo: done in {total:.0f} s (setup {setup:.0f} s)"]
    for leg, result in results.items():
        lines.append(f"  {leg:<10} " + ", ".join(f"{stage} {secs:.0f} s" for stage, secs in result.seconds.items()))
    lora, ic, cn = results["lora"].outputs, results["ic_lora"].outputs, results["controlnet"].outputs
    prep, cache, train, gen, filt, ev = (lora.get(k, {}) for k in ("prepare", "cache", "train", "generate", "filter",
                                                                    "evaluate"))  # fmt: skip
    ic_prep, ic_train, ic_gen = (ic.get(k, {}) for k in ("prepare", "train", "generate"))
    cn_train, cn_gen, cn_filt = (cn.get(k, {}) for k in ("train", "generate", "filter"))
    fx_prep, fx_train, fx_gen = (results["flux"].outputs.get(k, {}) for k in ("prepare", "train", "generate"))
    loss = lambda t: f"final loss {t.get('final_loss', float('nan')):.4f}"  # noqa: E731
    from mlflow import MlflowClient

    from diffplat.tracking import runs_page

    first = next(iter(results.values()))
    experiment = MlflowClient(tracking_uri=first.tracking_uri).get_run(first.run_id).info.experiment_id
    models = [r.outputs.get("train", {}).get("model") for r in results.values()]
    registered = ", ".join(m.removeprefix("models:/") for m in models if m) + " (alias demo: models:/<name>@demo)"
    lines += [
        f"  in {out}:",
        f"    data/ {prep.get('rows_written')} rows (skipped {prep.get('skipped')}), cache/ {cache.get('rows')} rows "
        f"of latents + embeddings",
        f"    adapters/lora ({loss(train)}, trained from the cache), adapters/ic_lora ({loss(ic_train)}), "
        f"adapters/controlnet ({loss(cn_train)})",
        f"    generations/ {gen.get('images')} images, kept {filt.get('kept')}: generations/gallery/index.html",
        f"    evaluation/ mAP50-95 real {ev.get('real/map50_95', float('nan')):.3f}, real+kept "
        f"{ev.get('real+kept/map50_95', float('nan')):.3f}: report.txt, comparison.png (3 epochs at 64 px on "
        f"{ev.get('val_images')} images: the numbers mean nothing at this size; every piece ran)",
        f"    data-ic/composites/ {ic_prep.get('rows_written')} of layout {ic_prep.get('layout')}, ic_lora/ "
        f"{ic_gen.get('images')} filled (comparisons/)",
        f"    controlnet/ {cn_gen.get('images')} images from maps (comparisons/), kept {cn_filt.get('kept')}",
        f"    FLUX.1: data-flux/composites/ {fx_prep.get('rows_written')} of layout 3x1, adapters/flux_ic_lora "
        f"({loss(fx_train)}), flux/ {fx_gen.get('images')} with frame 2 filled (comparisons/)",
        f"  MLflow's model registry: {registered}",
        f"  the MLflow dashboard of these runs: .venv/bin/diffplat mlflow --workdir {out}",
        f"    then {runs_page('http://127.0.0.1:5000', experiment)}",
        "  fill panels of a composite yourself (source 1's flags):",
        f"    .venv/bin/diffplat ic-lora-infer --lora_path {out / 'adapters/ic_lora'} --input_image "
        f"{out / 'data-ic/composites/composite-00000.png'} --prompt \"...\" --panels_to_inpaint 2 3",
        "",
    ]
    return "\n".join(lines)
