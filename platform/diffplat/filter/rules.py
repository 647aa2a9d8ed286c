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


def threshold(rules: FilterRules, class_name: str) -> float:
    """The confidence a detection of this class needs to count."""
    return rules.class_min_confidence.get(class_name, rules.min_confidence)


def counted(detections: list[Detection], rules: FilterRules) -> list[Detection]:
    """The detections at or above their class's threshold: the ones rules and labels see."""
    return [d for d in detections if d.confidence >= threshold(rules, d.class_name)]


def lowest_threshold(rules: FilterRules) -> float:
    """What the detector must report down to (ultralytics' own default, 0.25, at most)."""
    return min([rules.min_confidence, *rules.class_min_confidence.values(), 0.25]) or 0.001


def touches_edge(d: Detection, margin: float) -> bool:
    x, y, w, h = d.box_xywhn
    return min(x - w / 2, y - h / 2) <= margin or max(x + w / 2, y + h / 2) >= 1 - margin


def decide(detections: list[Detection], rules: FilterRules) -> tuple[bool, list[str]]:
    """(keep, reasons it was rejected); only detections at or above their class's threshold count."""
    kept = counted(detections, rules)
    reasons = []
    found = {d.class_name for d in kept}
    missing = [c for c in rules.required_classes if c not in found]
    if missing:
        reasons.append("missing required class: " + ", ".join(missing))
    if len(kept) < rules.min_count:
        reasons.append(f"{len(kept)} detections at confidence >= {rules.min_confidence}, need {rules.min_count}")
    if rules.max_count is not None and len(kept) > rules.max_count:
        reasons.append(f"{len(kept)} detections, at most {rules.max_count}")
    if rules.max_edge_share is not None and kept:
        share = sum(touches_edge(d, rules.edge_margin) for d in kept) / len(kept)
        if share > rules.max_edge_share:
            reasons.append(f"{share:.0%} of boxes touch the image edge, at most {rules.max_edge_share:.0%}")
    return not reasons, reasons
