"""`diffplat demo`: the whole pipeline on one machine, on inputs it makes itself."""

from __future__ import annotations

import logging
import time
from importlib import resources
from pathlib import Path

from diffplat.config import load_config
from diffplat.data.synthetic_bdd import write_synthetic_bdd
from diffplat.models.tiny import write_tiny_model
from diffplat.runner import JobResult, run_job

log = logging.getLogger("diffplat")


def demo_config_path() -> Path:
    return Path(str(resources.files("diffplat") / "recipes" / "demo.yaml"))


def run_demo(output: str | Path, overrides: list[str] | None = None) -> JobResult:
    out = Path(output).resolve()
    config = load_config(demo_config_path(), overrides)
    seconds = {}
    start = time.perf_counter()
    log.info("demo: writing a tiny SDXL to %s", out / "base-model")
    write_tiny_model(out / "base-model", "sdxl")
    log.info("demo: writing a synthetic BDD-like dataset to %s", out / "bdd")
    write_synthetic_bdd(out / "bdd", num_images=24)
    seconds["setup"] = time.perf_counter() - start
    result = run_job(config, out)
    result.seconds = {**seconds, **result.seconds}
    print(summary(out, result))
    return result


def summary(out: Path, result: JobResult) -> str:
    lines = ["", "diffplat demo: done", ""]
    for stage, secs in result.seconds.items():
        lines.append(f"  {stage:<9} {secs:7.1f} s")
    lines.append(f"  {'total':<9} {sum(result.seconds.values()):7.1f} s")
    prep, train = result.outputs.get("prepare", {}), result.outputs.get("train", {})
    gen, filt = result.outputs.get("generate", {}), result.outputs.get("filter", {})
    lines += [
        "",
        f"  base model   {out / 'base-model'}",
        f"  data         {out / 'data'}  ({prep.get('rows_written')} rows, skipped {prep.get('skipped')})",
        f"  adapter      {out / 'adapters/lora/pytorch_lora_weights.safetensors'}  (final loss {train.get('final_loss', float('nan')):.4f})",
        f"  generations  {out / 'generations'}  ({gen.get('images')} images, contact_sheet.png, metadata.jsonl, labels/, annotated/)",
        f"  filter       kept {filt.get('kept')} of {filt.get('images')}: {out / 'generations/filter_report.json'}",
        f"  mlflow       {result.tracking_uri}",
        "",
        "Open the MLflow dashboard on it:",
        f"  .venv/bin/mlflow ui --backend-store-uri {result.tracking_uri} --host 127.0.0.1 --port 5000",
        "",
    ]
    return "\n".join(lines)
