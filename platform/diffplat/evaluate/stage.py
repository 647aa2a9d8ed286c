"""The `evaluate` stage: does the synthetic data make a better detector?

The driver reads the sets, writes one mix per variant and seed (real-only, and real + each
`mixes` entry), then trains and validates every one as a parallel Ray task (one GPU each on a
cluster). It writes, under `output`:

    sets/real, sets/val          BDD splits made YOLO sets (when given as BDD)
    variants/<name>/seed-<s>/    data/ (the mix, mix.json), train/ (ultralytics' run, weights/last.pt),
                                 result.json (the validation metrics, and the key of what made them)
    report.json                  every variant's mAP50 / mAP50-95, overall and per class, vs real-only
    report.txt, comparison.png   the table printed at the end; the chart

A rerun reuses a variant (its result.json) whose training images (name, size, time), labels
(text), validation set, detector settings and weights file, and seed are unchanged, so a stopped
evaluation trains only what is missing. The output folder must be on storage every
node sees (as prepare's shards are), since the tasks read the mixes and write weights there.
"""

from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path
from typing import Callable

from diffplat.config import REAL_VARIANT, BddSplit, DetectionSet, EvaluateConfig
from diffplat.console import Ticker
from diffplat.evaluate.detector import epochs_done, train_and_validate
from diffplat.evaluate.mixing import Sample, YoloSet, class_map, list_samples, mix, unnamed_classes
from diffplat.evaluate.report import build_report, chart, table
from diffplat.fileio import write_json_atomic, write_text_atomic

log = logging.getLogger("diffplat")


def _load_set(value: DetectionSet, name: str, folder: Path, split: str, resolve: Callable[[str], Path]) -> YoloSet:
    """A YOLO set as given, or a BDD split written as one into `folder`."""
    if isinstance(value, BddSplit):
        from diffplat.data.bdd_exports import bdd_split_to_yolo

        made = bdd_split_to_yolo(resolve(value.images), [resolve(p) for p in value.labels], folder, split)
        left_out = made["no_label_record"] + len(made["unreadable"])
        bad = len(made["bad_label_records"])
        log.info("evaluate: %s: %d BDD images with %d boxes%s%s", name, made["images"], made["boxes"],
                 f"; {left_out} without a label record or unreadable, left out" if left_out else "",
                 f"; {bad} label records unusable, e.g. {made['bad_label_records'][0]}" if bad else "")  # fmt: skip
        return YoloSet.load(folder / "data.yaml", name=name)
    return YoloSet.load(resolve(value), name=name)


def _val_folders(val: YoloSet, real: YoloSet) -> tuple[Path, ...]:
    """The validation set's `val:` folders (else its `train:`), once its classes are the real set's."""
    mapping = class_map(val, real)  # raises, listing both sets' names, if a class has no match
    if len(val.names) != len(real.names) or any(s != t for s, t in mapping.items()):
        raise ValueError(f"evaluate.val: its class ids {list(val.names.values())} are not the real set's "
                         f"{list(real.names.values())}; a validation set must use the real set's ids")  # fmt: skip
    return val.splits.get("val") or val.splits["train"]


def check_train_args(config: EvaluateConfig) -> None:
    from diffplat.filter.yolo import setup_ultralytics

    setup_ultralytics()  # importing ultralytics changes PIL's Image.open process-wide; this puts it back
    from ultralytics.cfg import DEFAULT_CFG_DICT

    unknown = sorted(set(config.detector.train_args) - set(DEFAULT_CFG_DICT))
    if unknown:
        raise ValueError(f"evaluate.detector.train_args: {unknown} are not ultralytics train arguments")


def _warm_label_cache(val_folders: tuple[Path, ...], names: dict[int, str]) -> None:
    """ultralytics' label cache of the validation images, written once here: the variants would
    otherwise all write the same cache file at once."""
    from ultralytics.data.dataset import YOLODataset

    from diffplat.filter.yolo import setup_ultralytics

    setup_ultralytics()
    paths = [str(f) for f in val_folders]
    YOLODataset(img_path=paths[0] if len(paths) == 1 else paths, data={"names": names, "channels": 3},
                task="detect", augment=False)  # fmt: skip


def _fingerprint(samples: list[Sample]) -> str:
    """A set's content as a detector sees it: every image's name, size and time (a mix links its
    images, so they keep their source's), every label file's text (a mix writes its own)."""
    digest = hashlib.sha256()
    for sample in samples:
        st = sample.image.stat()
        digest.update(f"{sample.rel}\0{st.st_size}\0{st.st_mtime_ns}\0".encode())
        digest.update(sample.label.read_bytes() if sample.label else b"(no labels)")
        digest.update(b"\0")
    return digest.hexdigest()


def _key(train: Path, val: str, detector: dict, seed: int) -> str:
    """What a variant's result depends on: its training images and labels, the validation set,
    the detector settings (and weights file) and the seed."""
    model = Path(detector["model"])
    weights = [model.stat().st_size, model.stat().st_mtime_ns] if model.is_file() else None
    blob = json.dumps({"train": _fingerprint(list_samples([train], str(train))), "val": val, "detector": detector,
                       "weights": weights, "seed": seed}, sort_keys=True)  # fmt: skip
    return hashlib.sha256(blob.encode()).hexdigest()


def _reusable(folder: Path, key: str) -> dict | None:
    try:
        result = json.loads((folder / "result.json").read_text())
    except (OSError, ValueError):
        return None
    if result.get("key") == key and Path(result.get("weights", "")).is_file():
        return result
    return None


def run_evaluate(config: EvaluateConfig, resolve: Callable[[str], Path]) -> dict:
    """Train and validate every variant; returns report.json's content (also written)."""
    import ray

    out = resolve(config.output)
    out.mkdir(parents=True, exist_ok=True)
    detector = config.detector.model_dump(mode="json")
    if not config.detector.model.endswith((".yaml", ".yml")):
        detector["model"] = str(resolve(config.detector.model))
        if not Path(detector["model"]).is_file():
            raise FileNotFoundError(f"evaluate.detector.model: {config.detector.model} is not a file "
                                    f"(give YOLO weights or a model yaml that ships in ultralytics)")  # fmt: skip
    check_train_args(config)
    real = _load_set(config.real, REAL_VARIANT, out / "sets/real", "train", resolve)
    val_set = _load_set(config.val, "val", out / "sets/val", "val", resolve)
    val_folders = _val_folders(val_set, real)
    val_samples = list_samples(val_folders, "evaluate.val")
    val_images, val_key = len(val_samples), _fingerprint(val_samples)
    synthetic = {name: YoloSet.load(resolve(path), name=name) for name, path in config.synthetic.items()}
    for s in synthetic.values():  # before anything is written: an empty set, classes with no match
        s.samples("train")
        unnamed = unnamed_classes(class_map(s, real, drop_unmapped=config.drop_unmapped), real)
        if unnamed:
            log.warning("evaluate: %s names none of %s: such objects in its images are unlabelled (background)",
                        s.name, unnamed)  # fmt: skip

    # Every variant's mix, per seed (the seed picks the synthetic images and seeds the training).
    variants = [(REAL_VARIANT, {})] + [(m.name, m.add) for m in config.mixes]
    jobs, train_images = [], {}
    for name, add in variants:
        for seed in config.seeds:
            folder = out / "variants" / name / f"seed-{seed}"
            mixed = mix(real, [(synthetic[s], share) for s, share in add.items()], folder / "data", seed, config.by,
                        drop_unmapped=config.drop_unmapped, val=val_folders)  # fmt: skip
            train_images[name] = mixed.images
            key = _key(folder / "data/images/train", val_key, detector, seed)
            jobs.append((name, seed, folder, mixed.data_yaml, key))
    _warm_label_cache(val_folders, real.names)

    if config.gpus_per_variant and ray.cluster_resources().get("GPU", 0) < config.gpus_per_variant:
        log.warning("evaluate: the cluster has no %s GPU free now; the variants wait for one (an autoscaler adds "
                    "GPU nodes on demand)", config.gpus_per_variant)  # fmt: skip
    # max_calls=1: a variant's process (ultralytics, its model, a GPU's memory) ends with it
    remote = ray.remote(num_cpus=config.cpus_per_variant, num_gpus=config.gpus_per_variant, max_calls=1)(train_and_validate)
    results: dict[tuple[str, int], dict] = {}
    pending = {}
    for name, seed, folder, data_yaml, key in jobs:
        done = _reusable(folder, key)
        if done is not None:
            results[(name, seed)] = done
            log.info("evaluate: %s seed %d: unchanged since its last run, reused (mAP50 %.3f)", name, seed, done["map50"])
            continue
        pending[remote.remote(str(data_yaml), str(folder), detector, seed)] = (name, seed, folder, key)
    log.info("evaluate: %d variants x %d seeds on %d real validation images: %d to train (%s, %d epochs, imgsz %d)",
             len(variants), len(config.seeds), val_images, len(pending), config.detector.model, config.detector.epochs,
             config.detector.imgsz)  # fmt: skip
    failed, ticker = {}, Ticker()
    while pending:
        ready, _ = ray.wait(list(pending), num_returns=1, timeout=2.0)
        for ref in ready:
            name, seed, folder, key = pending.pop(ref)
            try:
                result = {**ray.get(ref), "key": key}
            except Exception as err:  # noqa: BLE001 - one variant's failure is reported, the rest go on
                last_line = (str(err).strip().splitlines() or [""])[-1]  # Ray's traceback ends with the error
                failed[f"{name} seed {seed}"] = f"{type(err).__name__}: {last_line}"
                log.error("evaluate: %s seed %d failed: %s", name, seed, failed[f"{name} seed {seed}"])
                continue
            write_json_atomic(folder / "result.json", result)
            results[(name, seed)] = result
            if ticker.long:  # long work: each variant as it ends
                log.info("evaluate: %s seed %d: mAP50 %.3f, mAP50-95 %.3f (%.0f s)", name, seed, result["map50"],
                         result["map50_95"], result["seconds"])  # fmt: skip
        if pending and ticker.due():
            running = ", ".join(f"{n} seed {s} {epochs_done(f)}/{config.detector.epochs}"
                                for n, s, f, _ in pending.values())  # fmt: skip
            log.info("evaluate: %d/%d trained; epochs: %s", len(results), len(jobs), running)

    report = build_report(
        [{"name": n, "train_images": train_images[n], "runs": [results[(n, s)] for s in config.seeds if (n, s) in results]}
         for n, _ in variants if any((n, s) in results for s in config.seeds)],
        {"images": val_images, "folders": [str(f) for f in val_folders]}, detector)  # fmt: skip
    report["failed"] = failed
    write_json_atomic(out / "report.json", report)
    if report["variants"]:
        text = table(report)
        write_text_atomic(out / "report.txt", text + "\n")
        chart(report, out / "comparison.png")
        log.info("evaluate: on %d real validation images (%s, %d epochs, imgsz %d, seeds %s):\n%s", val_images,
                 config.detector.model, config.detector.epochs, config.detector.imgsz, config.seeds, text)  # fmt: skip
    if failed:
        raise RuntimeError("evaluate: " + "; ".join(f"{k}: {v}" for k, v in failed.items()) +
                           f" (the others are in {out / 'report.json'}; a rerun trains only what is missing)")  # fmt: skip
    return report
