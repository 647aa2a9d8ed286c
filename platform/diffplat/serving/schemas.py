"""The HTTP API's request bodies. Structure and hard bounds live here (FastAPI answers 422
naming the field); limits that a deployment configures (`serve.limits`) are checked by the
ingress with the same answer."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from diffplat.config import FilterRules

Scheduler = Literal["default", "euler", "euler_a", "ddim", "ddpm", "dpm++"]


class _Body(BaseModel):
    model_config = ConfigDict(extra="forbid")  # a misspelt option is a 422, not silently ignored


class _Sampling(_Body):
    prompt: str = Field(min_length=1)
    negative_prompt: str = ""
    num_inference_steps: int | None = Field(None, ge=1, description="default: 30, or the server's limit if lower")
    guidance_scale: float = Field(5.0, ge=0, le=50)
    seed: int | None = Field(None, ge=0, lt=2**63, description="image i gets seed + i; default: random")
    num_images: int = Field(1, ge=1)
    adapter: str | None = Field(None, description="a registry adapter name, or one in MLflow: "
                                   "runs:/<run id>/<path>, models:/<name>/<version>, models:/<name>@<alias>")
    adapter_scale: float = Field(1.0, ge=0, le=4)


class GenerateRequest(_Sampling):
    width: int | None = Field(None, ge=8, description="default: the server's default resolution")
    height: int | None = Field(None, ge=8)
    scheduler: Scheduler = "default"
    filter: FilterRules | None = Field(None, description="detect on each image and give its verdict")


class IcLoraRequest(_Sampling):
    image: str = Field(description="the composite, base64 (PNG, JPEG or WebP)")
    panels_to_inpaint: list[int] = Field(default_factory=lambda: [2, 3], min_length=1)
    layout: str = "2x2"
    panel_heights: list[float] | None = Field(None, max_length=64, description="rows' relative heights (pixels or "
                                              "proportions), for panels of unequal height; default: equal rows")
    panel_widths: list[float] | None = Field(None, max_length=64, description="columns' relative widths")
    strength: float = Field(1.0, gt=0, le=1)
    use_gradient_mask: bool = False
    gradient_width: int = Field(20, ge=0, le=512)
    comparison: bool = Field(False, description="also return input | mask | output")


class ControlNetRequest(_Sampling):
    image: str = Field(description="the segmentation map, base64: grey train ids or a colour map")
    segmentation: bool = True
    conditioning_scale: float = Field(1.0, ge=0, le=4)
    width: int | None = Field(None, ge=8, description="default: the map's size")
    height: int | None = Field(None, ge=8)


class DetectRequest(_Body):
    image: str = Field(description="base64 (PNG, JPEG or WebP)")
    min_confidence: float = Field(0.25, ge=0, le=1)
