"""One variant's detector: trained by ultralytics on its mix, then validated on the real set.

Runs in a Ray task (one GPU each on a cluster). Every variant trains the same model with the
same settings and seed, so only the training images differ. The model validated is the last
epoch's (`weights/last.pt`), not ultralytics' "best", which is chosen on the validation set that
every variant is then compared on.
"""

from __future__ import annotations

import os
import shutil
import socket
import time
from pathlib import Path

from diffplat.config import DetectorSettings

TRAIN_FOLDER = "train"  # ultralytics' run folder inside a variant's run folder
RESULTS_CSV = "results.csv"  # one line per finished epoch (ultralytics writes it as it goes)


def validation_metrics(results, names: dict[int, str]) -> dict:
    """mAP50 and mAP50-95 overall and per class (classes with objects in the validation set),
    precision and recall, from ultralytics' DetMetrics."""
    box = results.box
    per_class = {}
    for i, cls in enumerate(int(c) for c in box.ap_class_index):
        per_class[names[cls]] = {"map50": float(box.ap50[i]), "map50_95": float(box.ap[i]),
                                 "instances": int(results.nt_per_class[cls])}  # fmt: skip
    return {"map50": float(box.map50), "map50_95": float(box.map), "precision": float(box.mp),
            "recall": float(box.mr), "per_class": per_class}  # fmt: skip


# train arguments that change what validation counts, passed to it too
VAL_ARGS = ("iou", "max_det", "classes", "single_cls", "half", "agnostic_nms", "rect")


def validate(weights: str | Path, data_yaml: str | Path, settings: DetectorSettings, device: str, folder: Path) -> dict:
    """The weights on data.yaml's `val:` images, as `yolo val` computes it."""
    from ultralytics import YOLO

    model = YOLO(str(weights))
    same = {k: v for k, v in settings.train_args.items() if k in VAL_ARGS}
    results = model.val(data=str(data_yaml), split="val", imgsz=settings.imgsz, batch=settings.batch, device=device,
                        workers=settings.workers, plots=False, project=str(folder), name="val", exist_ok=True,
                        **same)  # fmt: skip
    return validation_metrics(results, {int(k): str(v) for k, v in model.names.items()})


def train_and_validate(data_yaml: str, folder: str, detector: dict, seed: int) -> dict:
    """Train the detector on `data_yaml`'s training images into `folder`, validate it; the
    metrics, the weights validated, and where and how long it ran."""
    from diffplat.filter.yolo import setup_ultralytics

    setup_ultralytics()
    import ray
    from ultralytics import YOLO

    settings = DetectorSettings.model_validate(detector)
    # Ray gives this task its GPU as device 0; a task given none must not take one it can see.
    device = settings.device or ("0" if ray.get_gpu_ids() else "cpu")
    for old in (TRAIN_FOLDER, "val"):  # ultralytics would append to an earlier run's results.csv
        shutil.rmtree(Path(folder) / old, ignore_errors=True)
    started = time.time()
    YOLO(settings.model).train(
        data=data_yaml, epochs=settings.epochs, imgsz=settings.imgsz, batch=settings.batch, workers=settings.workers,
        device=device, seed=seed, deterministic=True, project=folder, name=TRAIN_FOLDER, exist_ok=True,
        val=False,  # validated once, below, on the last weights (it still validates its final epoch)
        plots=False, **settings.train_args)  # fmt: skip
    weights = Path(folder) / TRAIN_FOLDER / "weights" / "last.pt"
    metrics = validate(weights, data_yaml, settings, device, Path(folder))
    return {"seed": seed, "weights": str(weights), **metrics, "started": started, "finished": time.time(),
            "seconds": time.time() - started, "node": socket.gethostname(), "pid": os.getpid(), "device": device}  # fmt: skip


def epochs_done(folder: Path) -> int:
    """How many epochs a running variant has finished (0 if it has not started or is elsewhere)."""
    try:
        return max(0, len((folder / TRAIN_FOLDER / RESULTS_CSV).read_text().splitlines()) - 1)
    except OSError:
        return 0
