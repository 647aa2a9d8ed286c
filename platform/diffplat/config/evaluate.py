"""evaluate: detectors trained on real data and on mixes with kept generations, and their report."""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import Field, field_validator, model_validator

from diffplat.config.base import _Strict

class BddSplit(_Strict):
    """A BDD split read as a detection set: its images and label JSON (2018 or det_20)."""

    images: str
    labels: list[str] = Field(min_length=1, description="label JSON files or folders of per-image label files")


# A detection set: a YOLO data.yaml (or the folder holding one), or a BDD split made into one.
DetectionSet = str | BddSplit


SET_NAME = r"^[A-Za-z0-9][\w.-]*$"  # a synthetic set's name: a file-name prefix and an MLflow key as it is


class MixSpec(_Strict):
    name: str = Field(pattern=r"^[A-Za-z0-9][\w.+-]*$", description="the variant's name in the report and MLflow")
    add: dict[str, float] = Field(min_length=1, description="synthetic set name -> share: x the real image "
                                  "count (by: ratio) or images (by: count)")  # fmt: skip


# ultralytics train arguments the evaluate stage sets itself (from its own fields, or per variant)
DETECTOR_OWN_ARGS = frozenset({"data", "model", "epochs", "imgsz", "batch", "seed", "device", "workers", "project",
                               "name", "exist_ok", "val", "plots", "mode", "task", "resume", "deterministic"})  # fmt: skip


class DetectorSettings(_Strict):
    """The one detector every variant trains: same model, schedule and seed; only the data differ."""

    # A model yaml that ships in ultralytics (trained from scratch) or a YOLO weights file to fine-tune.
    model: str = "yolov8n.yaml"
    epochs: int = Field(50, gt=0)
    imgsz: int = Field(640, gt=0)
    batch: int = Field(16, gt=0)
    workers: int = Field(2, ge=0, description="data loader processes per variant")
    device: str | None = Field(None, description="None: the GPU Ray gives the variant (gpus_per_variant), else cpu")
    train_args: dict[str, str | int | float | bool | None] = Field(default_factory=dict, description=(
        "any other ultralytics train argument (lr0, mosaic, nbs, ...), checked against ultralytics' own list"))

    @field_validator("train_args")
    @classmethod
    def _not_own(cls, value: dict) -> dict:
        own = sorted(set(value) & DETECTOR_OWN_ARGS)
        if own:
            raise ValueError(f"{own} are set by the stage (its fields, or per variant), not through train_args")
        return value


class EvaluateConfig(_Strict):
    """Does the synthetic data make a better detector? The same detector is trained on the real
    set alone and on each mix, then every model is validated on the same real validation set."""

    real: DetectionSet = Field(description="the real training set")
    val: DetectionSet = Field(description="the held-out real validation set (its val: split, else its train:)")
    synthetic: dict[Annotated[str, Field(pattern=SET_NAME)], str] = Field(min_length=1, description=(
        "set name -> a YOLO set (data.yaml or its folder), e.g. a filter run's <images>/dataset"))
    mixes: list[MixSpec] = Field(min_length=1, description="one variant each, beside the real-only one")
    by: Literal["ratio", "count"] = "ratio"
    drop_unmapped: bool = Field(False, description="drop boxes of synthetic classes the real set has no name for "
                                "(else they are an error that lists the names)")  # fmt: skip
    detector: DetectorSettings = DetectorSettings()
    seeds: list[int] = Field([0], min_length=1, description="each variant trains once per seed (mixing and "
                             "training); the report gives the mean")  # fmt: skip
    gpus_per_variant: float = Field(0, ge=0)
    cpus_per_variant: float = Field(1, gt=0)
    output: str = "evaluation"

    @model_validator(mode="after")
    def _mixes_name_sets(self) -> "EvaluateConfig":
        names = [m.name for m in self.mixes]
        keys = [n.replace("+", "_") for n in names]  # as MLflow metric keys have them
        if REAL_VARIANT in names or len(set(keys)) < len(keys):
            raise ValueError(f"mixes: names must be unique (also with + read as _) and not {REAL_VARIANT!r} (the "
                             f"real-only variant), got {names}")  # fmt: skip
        for i, m in enumerate(self.mixes):
            unknown = sorted(set(m.add) - set(self.synthetic))
            if unknown:
                raise ValueError(f"mixes[{i}] ({m.name}) adds {unknown}, not among synthetic: {sorted(self.synthetic)}")
            if any(share < 0 for share in m.add.values()):
                raise ValueError(f"mixes[{i}] ({m.name}): shares must be >= 0, got {m.add}")
            if self.by == "count" and any(share != int(share) for share in m.add.values()):
                raise ValueError(f"mixes[{i}] ({m.name}): by: count takes whole numbers of images, got {m.add}")
        if REAL_VARIANT in self.synthetic:
            raise ValueError(f"synthetic: {REAL_VARIANT!r} names the real set; give the synthetic set another name")
        if len(set(self.seeds)) < len(self.seeds):
            raise ValueError(f"seeds: each seed once, got {self.seeds}")
        return self


REAL_VARIANT = "real"  # the variant trained on the real set alone, and that set's name in every mix
