"""The HTTP API's settings: the args a Ray Serve config gives `build_app`, and the limits of a request."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from diffplat.config.base import _Strict, ModelResolution

class ServeLimits(_Strict):
    """What one HTTP request may ask for; beyond it the answer is a 4xx naming the field."""

    max_prompt_chars: int = Field(2000, gt=0)
    max_steps: int = Field(100, gt=0)
    max_side: int = Field(2048, gt=0, description="largest width or height, pixels")
    max_images: int = Field(8, gt=0, description="images a request")
    max_upload_bytes: int = Field(20 * 2**20, gt=0, description="an uploaded image; a body larger than its base64 "
                                  "(4/3 of it, plus 64 KiB) is refused with 413 before it is read")  # fmt: skip
    max_pixels: int = Field(4096 * 4096, gt=0, description="an upload's width x height, checked before decoding")
    max_panels: int = Field(16, ge=2, description="panels of an In-Context LoRA layout")
    max_pixel_steps: int = Field(8 * 1024 * 1024 * 50, gt=0, description="one request's budget: images x width x "
                                 "height x denoising steps, on every route")  # fmt: skip


class BatchingSettings(_Strict):
    enabled: bool = True
    max_batch_size: int = Field(4, gt=0, description="compatible generation requests run as one pipeline call")
    batch_wait_timeout_s: float = Field(0.05, ge=0)


class ServeConfig(_Strict):
    """The HTTP API's models and limits: the `args:` of a Ray Serve config (serve/*.yaml)."""

    base_model: str = Field(description="hub id or folder of the SDXL pipeline for /v1/generate")
    vae: str | None = None
    variant: str | None = None
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    inpaint_model: str | None = Field(None, description="an SDXL inpainting pipeline: /v1/ic-lora exists when set")
    controlnet: str | None = Field(None, description="a ControlNet: /v1/controlnet exists when set")
    adapters: str | None = Field(None, description="registry folder: one sub-folder per LoRA, named by requests")
    max_loaded_adapters: int = Field(4, gt=0, description="per replica; least recently used evicted")
    detector: str | None = Field("yolov8n.yaml", description="YOLO weights or model yaml: /v1/detect and filtering")
    detector_imgsz: int = Field(640, gt=0)
    detector_device: str = "cpu"
    default_resolution: ModelResolution = (1024, 1024)
    auth: Literal["key", "none"] = Field("key", description="key: every route but /healthz needs Authorization: "
                                         "Bearer <key>, and the app refuses to start without the key; none: an "
                                         "open API, said explicitly (127.0.0.1 only)")  # fmt: skip
    api_key_env: str = Field("DIFFPLAT_API_KEY", min_length=1, description="the environment variable holding the API "
                             "key, read where the application is built")  # fmt: skip
    tracking_uri: str | None = Field(None, description="MLflow store of runs:/ and models:/ "
                                       "adapters; default: $MLFLOW_TRACKING_URI, else workdir's mlflow.db")
    workdir: str | None = Field(None, description="what relative paths are relative to (default: the current folder)")
    batching: BatchingSettings = BatchingSettings()
    limits: ServeLimits = ServeLimits()
