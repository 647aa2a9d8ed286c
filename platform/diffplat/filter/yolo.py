"""The `filter` stage: YOLO detection over a generations folder on Ray Data, rules, a dataset.

Detector replicas are Ray Data actors (one per GPU on a cluster, `replicas` of them) taking
batches of image paths. Each replica writes its images' files into the generations folder
(storage every node sees): `labels/` (YOLO txt, one per image), `annotated/` (boxes drawn) and
`dataset/images|labels/train` (kept images, copied, and their labels). The driver gets each
image's counted detections and verdict and writes the manifests: `dataset/data.yaml` (which
ultralytics trains on from any folder, also after it is moved), COCO annotations
(`coco_annotations.json`, and `dataset/annotations.json` for the kept images),
`filter_report.json` (every image's verdict and reasons) and `gallery/` (static HTML).
Each of the three folders is built under a temporary name and swapped in whole.
"""

from __future__ import annotations

import io
import json
import logging
import os
import shutil
from collections import Counter
from pathlib import Path

import yaml

from diffplat.cluster import record_bytes, replica_pool
from diffplat.config import FilterConfig
from diffplat.console import Ticker
from diffplat.filter.rules import Detection, counted, decide, lowest_threshold
from diffplat.fileio import read_jsonl, replace_dir, write_bytes_atomic, write_json_atomic, write_text_atomic
from diffplat.pictures import list_images

log = logging.getLogger("diffplat")


def setup_ultralytics() -> None:
    """ultralytics quiet and on its own, before it is first used in a process."""
    os.environ.setdefault("YOLO_VERBOSE", "False")
    from PIL import Image
    from ultralytics import settings
    from ultralytics.utils import patches

    # ultralytics replaces PIL's Image.open process-wide with one that, on bytes PIL cannot
    # identify, pip-installs pi-heif (a download at run time) and raises ModuleNotFoundError
    # offline, so a corrupt image elsewhere in this process would no longer be a clean skip.
    Image.open = patches._image_open
    # ultralytics switches on integrations for installed packages (it would start an MLflow run
    # of its own and Ray Tune callbacks): diffplat logs through its own tracking only.
    settings.update({"mlflow": False, "raytune": False, "sync": False, "tensorboard": False, "wandb": False})


def load_detector(model: str):
    """A YOLO model from a weights file, or built from a yaml that ships in ultralytics."""
    setup_ultralytics()
    from ultralytics import YOLO

    if not model.endswith((".yaml", ".yml")):
        if not Path(model).is_file():
            raise FileNotFoundError(f"filter.model: {model} is not a file (give a YOLO weights file or a model yaml)")
        return YOLO(model)
    import torch

    # A yaml builds random weights: the same ones in every replica (and run), from one seed.
    with torch.random.fork_rng():
        torch.manual_seed(0)
        return YOLO(model)


def _detections(result) -> list[Detection]:
    boxes, names = result.boxes, result.names
    return [Detection(names[int(cls)], int(cls), float(conf), tuple(float(v) for v in xywhn))
            for cls, conf, xywhn in zip(boxes.cls.tolist(), boxes.conf.tolist(), boxes.xywhn.tolist())]  # fmt: skip


def _label_lines(detections: list[Detection]) -> str:
    return "".join(f"{d.class_id} {' '.join(f'{v:.6f}' for v in d.box_xywhn)}\n" for d in detections)


class Detector:
    """A detector replica (a Ray Data actor): loads the model once, then turns batches of image
    paths into verdicts, writing each image's files itself (storage every node sees): its YOLO
    label, its annotated copy and, when kept, the image and label in the dataset. The driver gets
    back the counted detections and the verdict, never pixels."""

    def __init__(self, model: str, config: dict, out: dict[str, str]):
        self.config = FilterConfig.model_validate(config)
        self.model = load_detector(model)
        self.labels, self.annotated, dataset = (Path(out[k]) for k in ("labels", "annotated", "dataset"))
        self.kept_images, self.kept_labels = dataset / "images" / "train", dataset / "labels" / "train"

    def _predict(self, paths: list[str]):
        c = self.config
        return self.model.predict(source=paths, imgsz=c.imgsz, conf=lowest_threshold(c.rules), iou=c.iou,
                                  device=c.device, verbose=False)  # fmt: skip

    def _row(self, path: str, result) -> dict:
        from PIL import Image

        path = Path(path)
        detections = _detections(result)
        seen = counted(detections, self.config.rules)
        label = _label_lines(seen)
        write_text_atomic(self.labels / f"{path.stem}.txt", label)
        if self.config.save_annotated:
            buf = io.BytesIO()
            Image.fromarray(result.plot(conf=True)[..., ::-1]).save(buf, format=Image.registered_extensions().get(
                path.suffix.lower(), "PNG"))  # fmt: skip
            write_bytes_atomic(self.annotated / path.name, buf.getvalue())
        keep, why = decide(detections, self.config.rules)
        if keep:  # a copy, not a link: whoever trains on the dataset cannot rewrite the generation
            shutil.copy2(path, self.kept_images / path.name)
            write_text_atomic(self.kept_labels / f"{path.stem}.txt", label)
        height, width = result.orig_shape
        return {"detections": json.dumps([d.__dict__ for d in seen]), "kept": keep, "reasons": json.dumps(why),
                "width": width, "height": height, "error": ""}  # fmt: skip

    def __call__(self, batch: dict) -> dict:
        import numpy as np
        import ray

        paths = [str(p) for p in batch["path"]]
        try:
            rows = [self._row(p, r) for p, r in zip(paths, self._predict(paths))]
        except Exception:  # one unreadable image fails the whole batch: go one by one
            rows = []
            for path in paths:
                try:
                    rows.append(self._row(path, self._predict([path])[0]))
                except Exception as err:
                    rows.append({"detections": "[]", "kept": False, "reasons": "[]", "width": 0, "height": 0,
                                 "error": f"{Path(path).name}: cannot detect ({type(err).__name__}: {err})"})  # fmt: skip
        node = ray.get_runtime_context().get_node_id()
        return {"path": np.array(paths, dtype=object), "node": np.array([node] * len(paths), dtype=object),
                **{k: np.array([r[k] for r in rows], dtype=object) for k in rows[0]}}  # fmt: skip


def coco_annotations(entries: list[dict], names: dict[int, str]) -> dict:
    """COCO detection JSON: images, annotations (boxes in pixels, with scores), categories."""
    images, annotations = [], []
    for image_id, entry in enumerate(entries, 1):
        w, h = entry["width"], entry["height"]
        images.append({"id": image_id, "file_name": entry["file_name"], "width": w, "height": h})
        for d in entry["detections"]:
            x, y, bw, bh = d.box_xywhn
            box = [round((x - bw / 2) * w, 2), round((y - bh / 2) * h, 2), round(bw * w, 2), round(bh * h, 2)]
            annotations.append({"id": len(annotations) + 1, "image_id": image_id, "category_id": d.class_id,
                                "bbox": box, "area": round(box[2] * box[3], 2), "iscrowd": 0,
                                "score": round(d.confidence, 4)})  # fmt: skip
    categories = [{"id": int(i), "name": str(n)} for i, n in sorted(names.items())]
    return {"images": images, "annotations": annotations, "categories": categories}


def _generation_metadata(folder: Path) -> dict[str, dict]:
    """Prompt and seed of each image, from the generate stage's metadata.jsonl (if there)."""
    return {Path(str(r.get("file_name", ""))).name: r for r in read_jsonl(folder / "metadata.jsonl")}


def run_filter(config: FilterConfig, folder: Path, model_path: str) -> dict:
    """Detect, label and filter every image in `folder/images` on Ray Data detector actors."""
    import ray.data

    from diffplat.filter.gallery import write_gallery

    images = list_images(folder / "images")
    if not images:
        raise FileNotFoundError(f"filter: no images in {folder / 'images'}")
    names = {int(k): str(v) for k, v in load_detector(model_path).names.items()}  # the detector's own classes
    per_image, entries, reasons, class_counts, errors = {}, [], Counter(), Counter(), []
    first_of: dict[str, Path] = {}
    for path in images:  # a.png and a.jpg would share labels/a.txt: the second is left out, named
        if path.stem in first_of:
            why = f"same base name as {first_of[path.stem].name} (one labels/{path.stem}.txt for both); rename one"
            per_image[path.name] = {"kept": False, "reasons": [why], "detections": 0, "classes": {}}
            reasons["same base name as another image"] += 1
            errors.append(f"{path.name}: {why}")
        else:
            first_of[path.stem] = path
    ticker, nodes, received = Ticker(), Counter(), 0
    ours = ("../filter_report.json",)  # the filter's folders from before the marker
    with (replace_dir(folder / "labels", "filter output", ours) as labels_dir,
          replace_dir(folder / "annotated", "filter output", ours) as annotated_dir,
          replace_dir(folder / "dataset", "filter output", ours) as dataset_dir):  # fmt: skip
        for sub in ("images/train", "labels/train"):
            (dataset_dir / sub).mkdir(parents=True)
        out = {"labels": str(labels_dir), "annotated": str(annotated_dir), "dataset": str(dataset_dir)}
        pool = replica_pool(config.replicas)  # before the dataset exists: it keeps the Ray Data settings of its making
        ds = ray.data.from_items([{"path": str(p)} for p in first_of.values()]).map_batches(
            Detector,
            fn_constructor_args=(model_path, config.model_dump(mode="json"), out),
            batch_size=config.batch_size,
            batch_format="numpy",
            compute=pool,
            num_gpus=config.gpus_per_replica,
            num_cpus=config.cpus_per_replica,
        )
        for n, row in enumerate(ds.iter_rows(), 1):
            received += record_bytes(row)
            nodes[row["node"]] += 1
            path = Path(row["path"])
            if row["error"]:
                errors.append(row["error"])
                per_image[path.name] = {"kept": False, "reasons": [row["error"]], "detections": 0, "classes": {}}
                reasons["cannot detect"] += 1
                continue
            seen = [Detection(d["class_name"], d["class_id"], d["confidence"], tuple(d["box_xywhn"]))
                    for d in json.loads(row["detections"])]  # fmt: skip
            keep, why = bool(row["kept"]), json.loads(row["reasons"])
            classes = Counter(d.class_name for d in seen)
            class_counts.update(classes)
            per_image[path.name] = {"kept": keep, "reasons": why, "detections": len(seen), "classes": dict(classes),
                                    "node": row["node"]}  # the Ray node whose replica wrote its files  # fmt: skip
            entries.append({"file_name": path.name, "width": int(row["width"]), "height": int(row["height"]),
                            "detections": seen, "kept": keep})  # fmt: skip
            reasons.update(why)
            if ticker.due(last_one=n == len(first_of)):
                log.info("filter: %d/%d images, %d kept", n, len(images), sum(e["kept"] for e in entries))
        # Replicas answer in any order: sorted by name, COCO ids and the report are the same every run.
        entries.sort(key=lambda e: e["file_name"])
        per_image = dict(sorted(per_image.items()))
        kept = [e for e in entries if e["kept"]]
        # No `path:` key: ultralytics then reads the lists against data.yaml's own folder, so the
        # dataset trains from any working directory and after it is moved (a relative `path:`
        # would be read against the working directory).
        data_yaml = {"train": "images/train", "val": "images/train", "names": names}
        (dataset_dir / "data.yaml").write_text(yaml.safe_dump(data_yaml, sort_keys=False))
        (dataset_dir / "annotations.json").write_text(json.dumps(coco_annotations(kept, names)))
    write_json_atomic(folder / "coco_annotations.json", coco_annotations(entries, names))
    report = {
        "model": model_path,
        "rules": config.rules.model_dump(),
        "images": len(images),
        "kept": len(kept),
        "rejected": len(images) - len(kept),
        "keep_rate": len(kept) / len(images),
        "rejection_reasons": dict(reasons),
        "detections_by_class": dict(class_counts),
        "errors": errors[:1000],
        "nodes": len(nodes),
        "driver_bytes": received,
        "per_image": per_image,
    }
    write_json_atomic(folder / "filter_report.json", report)
    write_gallery(folder, per_image, _generation_metadata(folder), config.gallery_per_page)
    log.info("filter: kept %d of %d images (gallery: %s)", len(kept), len(images), folder / "gallery" / "index.html")
    return report
