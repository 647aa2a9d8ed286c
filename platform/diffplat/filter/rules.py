"""Keep-or-reject rules on one image's detections: pure functions, no model involved."""

from __future__ import annotations

from dataclasses import dataclass

from diffplat.config import FilterRules


@dataclass(frozen=True)
class Detection:
    class_name: str
    class_id: int
    confidence: float
    box_xywhn: tuple[float, float, float, float]  # centre x, centre y, width, height in 0..1


def decide(detections: list[Detection], rules: FilterRules) -> tuple[bool, list[str]]:
    """(keep, reasons it was rejected); only detections at or above min_confidence count."""
    counted = [d for d in detections if d.confidence >= rules.min_confidence]
    reasons = []
    found = {d.class_name for d in counted}
    missing = [c for c in rules.required_classes if c not in found]
    if missing:
        reasons.append("missing required class: " + ", ".join(missing))
    if len(counted) < rules.min_count:
        reasons.append(f"{len(counted)} detections at confidence >= {rules.min_confidence}, need {rules.min_count}")
    return not reasons, reasons
