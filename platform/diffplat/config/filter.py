"""filter: the YOLO detector and the rules that keep or drop a generated image."""

from __future__ import annotations


from pydantic import Field

from diffplat.config.base import _Strict

class FilterRules(_Strict):
    min_confidence: float = Field(0.25, ge=0, le=1, description="detections below this do not count")
    class_min_confidence: dict[str, float] = Field(default_factory=dict, description="per class, instead of "
                                                   "min_confidence, e.g. {person: 0.5}")  # fmt: skip
    required_classes: list[str] = Field(default_factory=list, description="every one must be detected")
    min_count: int = Field(0, ge=0, description="at least this many counted detections")
    max_count: int | None = Field(None, ge=0, description="at most this many counted detections")
    max_edge_share: float | None = Field(None, ge=0, le=1, description="largest share of counted boxes that may "
                                         "touch the image edge (cut-off objects)")  # fmt: skip
    edge_margin: float = Field(0.01, ge=0, lt=0.5, description="a box this close to a border (share of the side) "
                               "touches it")  # fmt: skip


class FilterConfig(_Strict):
    images: str = "generations"
    # A .pt/.safetensors-free YOLO file, or a model yaml that ships in ultralytics (random weights).
    model: str = "yolov8n.yaml"
    imgsz: int = Field(640, gt=0)
    iou: float = Field(0.7, gt=0, le=1)
    device: str = "cpu"
    rules: FilterRules = FilterRules()
    save_annotated: bool = True
    batch_size: int = Field(16, gt=0, description="images per detector call")
    replicas: int = Field(1, gt=0, description="detector copies on Ray Data; one per GPU on a cluster")
    gpus_per_replica: float = Field(0, ge=0)
    cpus_per_replica: float = Field(1, gt=0)
    gallery_per_page: int = Field(500, gt=0, description="images on one page of gallery/")
