"""The `filter` stage: YOLO detection on a generations folder, labels, rules, a dataset.

Writes into the generations folder: `labels/` (YOLO txt, one per image), `annotated/`
(boxes drawn), `dataset/` (kept images + labels + data.yaml, which ultralytics trains on
directly) and `filter_report.json`.
"""

from __future__ import annotations

import logging
import os
import shutil
from collections import Counter
from pathlib import Path

import yaml

from diffplat.config import FilterConfig
from diffplat.filter.rules import Detection, decide
from diffplat.fileio import replace_dir, write_json_atomic
from diffplat.pictures import list_images

log = logging.getLogger("diffplat")

def load_detector(model: str):
    """A YOLO model from a weights file, or built from a yaml that ships in ultralytics."""
    # ultralytics switches on integrations for installed packages (it would start an MLflow run
    # of its own and Ray Tune callbacks): this stage logs through diffplat's tracking only.
    os.environ.setdefault("YOLO_VERBOSE", "False")
    from ultralytics import YOLO, settings
    from ultralytics.utils import patches

    # ultralytics replaces PIL's Image.open process-wide with one that, on bytes PIL cannot
    # identify, pip-installs pi-heif (a download at run time) and raises ModuleNotFoundError
    # offline, so a corrupt image elsewhere in this process would no longer be a clean skip.
    from PIL import Image

    Image.open = patches._image_open
    settings.update({"mlflow": False, "raytune": False, "sync": False, "tensorboard": False, "wandb": False})
    if not model.endswith((".yaml", ".yml")) and not Path(model).is_file():
        raise FileNotFoundError(f"filter.model: {model} is not a file (give a YOLO weights file or a model yaml)")
    return YOLO(model)


def _detections(result) -> list[Detection]:
    boxes = result.boxes
    names = result.names
    out = []
    for cls, conf, xywhn in zip(boxes.cls.tolist(), boxes.conf.tolist(), boxes.xywhn.tolist()):
        out.append(Detection(names[int(cls)], int(cls), float(conf), tuple(float(v) for v in xywhn)))
    return out


def _label_lines(detections: list[Detection]) -> str:
    return "".join(f"{d.class_id} {' '.join(f'{v:.6f}' for v in d.box_xywhn)}\n" for d in detections)


def run_filter(config: FilterConfig, folder: Path, model_path: str) -> dict:
    """Detect, label and filter every image in `folder/images`."""
    images = list_images(folder / "images")
    if not images:
        raise FileNotFoundError(f"filter: no images in {folder / 'images'}")
    model = load_detector(model_path)
    names = dict(model.names)
    per_image, kept, reasons = {}, [], Counter()
    class_counts: Counter[str] = Counter()
    with replace_dir(folder / "labels") as labels_dir, replace_dir(folder / "annotated") as annotated_dir:
        results = model.predict(
            source=[str(p) for p in images],
            imgsz=config.imgsz,
            conf=min(config.rules.min_confidence, 0.25) or 0.001,
            iou=config.iou,
            device=config.device,
            stream=True,
            verbose=False,
        )
        for n, (path, result) in enumerate(zip(images, results), 1):
            detections = _detections(result)
            counted = [d for d in detections if d.confidence >= config.rules.min_confidence]
            (labels_dir / f"{path.stem}.txt").write_text(_label_lines(counted))
            if config.save_annotated:
                from PIL import Image

                Image.fromarray(result.plot(conf=True)[..., ::-1]).save(annotated_dir / path.name)
            keep, why = decide(detections, config.rules)
            class_counts.update(d.class_name for d in counted)
            per_image[path.name] = {"kept": keep, "reasons": why, "detections": len(counted)}
            if keep:
                kept.append(path)
            reasons.update(why)
            if n % 20 == 0 or n == len(images):
                log.info("filter: %d/%d images, %d kept", n, len(images), len(kept))
    dataset = folder / "dataset"
    with replace_dir(dataset) as tmp:
        for sub in ("images/train", "labels/train"):
            (tmp / sub).mkdir(parents=True)
        for path in kept:
            shutil.copy2(path, tmp / "images/train" / path.name)
            shutil.copy2(folder / "labels" / f"{path.stem}.txt", tmp / "labels/train" / f"{path.stem}.txt")
        # `path` is relative to data.yaml's own folder, so the dataset can be moved or copied.
        data_yaml = {"path": ".", "train": "images/train", "val": "images/train", "names": names}
        (tmp / "data.yaml").write_text(yaml.safe_dump(data_yaml, sort_keys=False))
    report = {
        "model": model_path,
        "rules": config.rules.model_dump(),
        "images": len(images),
        "kept": len(kept),
        "rejected": len(images) - len(kept),
        "keep_rate": len(kept) / len(images),
        "rejection_reasons": dict(reasons),
        "detections_by_class": dict(class_counts),
        "per_image": per_image,
    }
    write_json_atomic(folder / "filter_report.json", report)
    log.info("filter: kept %d of %d images", len(kept), len(images))
    return report

