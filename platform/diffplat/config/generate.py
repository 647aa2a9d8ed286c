"""generate: bulk text-to-image, In-Context LoRA fills and ControlNet images, on Ray Data."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, field_validator, model_validator

from diffplat.config.base import _Strict, TokenLength, ModelResolution, _check_layout

class PanelFillSettings(_Strict):
    """generate kind ic_lora: fill panels of every composite in a folder (source 1's options)."""

    inputs: str = Field(description="folder of composites; a same-named .txt is that composite's prompt")
    layout: str = "2x2"
    panel_heights: list[float] | None = Field(None, description="rows' relative heights (pixels of one composite, or "
                                              "proportions: film frames of unequal height); default: equal rows")
    panel_widths: list[float] | None = Field(None, description="columns' relative widths; default: equal columns")
    panels_to_inpaint: list[int] = Field(default_factory=lambda: [2, 3])
    strength: float = Field(1.0, gt=0, le=1)
    use_gradient_mask: bool = False
    gradient_width: int = Field(20, ge=0, description="pixels of soft transition inside filled panels")
    save_comparison: bool = True

    @field_validator("layout")
    @classmethod
    def _layout(cls, value: str) -> str:
        return _check_layout(value)

    @model_validator(mode="after")
    def _panels(self) -> "PanelFillSettings":
        from diffplat.data.composites import CompositeError, Layout

        try:
            layout = Layout.parse(self.layout).sized(self.panel_heights, self.panel_widths, "ic_lora")
            chosen = layout.check_panels(self.panels_to_inpaint, "panels_to_inpaint")
        except CompositeError as err:
            raise ValueError(str(err)) from None
        if len(chosen) == layout.panels:
            raise ValueError(f"panels_to_inpaint names every panel of layout {layout}: nothing is left to condition on")
        return self


class MapGenerateSettings(_Strict):
    """generate kind controlnet: one image per segmentation map (source 4's ControlNet inference)."""

    model: str = Field(description="the ControlNet: a save_pretrained folder or hub id")
    maps: str = Field(description="folder of maps: grey train-id masks or colour maps (or any image, "
                      "with segmentation: false)")  # fmt: skip
    conditioning_scale: float = Field(1.0, ge=0, description="controlnet_conditioning_scale")
    captions: str | None = Field(None, description="folder of <image stem>.txt prompts")
    bdd_labels: list[str] = Field(default_factory=list, description="BDD label JSON: prompts captioned from labels")
    segmentation: bool = True
    save_comparison: bool = True


class LoraRef(_Strict):
    path: str = Field(description="a LoRA folder or .safetensors file")
    scale: float = 1.0


class PromptTemplate(_Strict):
    """Prompts from a template: every combination of the variables' values is one prompt."""

    text: str = Field(description="e.g. 'a {weather} street at {time}, dashcam photo'")
    values: dict[str, list[str]] = Field(description="each variable's values")

    @model_validator(mode="after")
    def _variables(self) -> "PromptTemplate":
        import string

        named = {f for _, f, _, _ in string.Formatter().parse(self.text) if f}
        if named != set(self.values):
            raise ValueError(f"the template names {sorted(named)} and values are given for {sorted(self.values)}")
        if any(not v for v in self.values.values()):
            raise ValueError("every variable needs at least one value")
        return self

    def prompts(self) -> list[str]:
        import itertools

        keys = list(self.values)
        return [self.text.format(**dict(zip(keys, combo))) for combo in itertools.product(*self.values.values())]


class GenerateConfig(_Strict):
    kind: Literal["text_to_image", "ic_lora", "controlnet"] = "text_to_image"
    base_model: str
    lora: str | None = None
    vae: str | None = None
    variant: str | None = None
    prompts: list[str] = Field(default_factory=list)
    prompts_file: str | None = Field(None, description="one prompt per line")
    prompts_from_shards: str | None = Field(None, description="a folder of prepare shards: their captions are prompts")
    prompt_template: PromptTemplate | None = None
    loras: list[LoraRef] = Field(default_factory=list, description="several LoRAs at once, each with its scale "
                                 "(text_to_image)")  # fmt: skip
    output_format: Literal["coco", "simple"] = Field("coco", description="coco: numbered images + COCO images JSON; "
                                                     "simple: named after the prompt and seed")  # fmt: skip
    overwrite: bool = Field(False, description="start the output afresh; default: go on, making only missing images")
    negative_prompt: str = ""
    adapter_scale: float = 1.0
    resolution: ModelResolution = (1024, 1024)
    num_generations: int = Field(1, gt=0, description="images per prompt")
    guidance_scale: float = 5.0
    num_inference_steps: int = Field(30, gt=0)
    scheduler: Literal["default", "euler", "euler_a", "ddim", "ddpm", "dpm++"] = "default"
    max_token_length: TokenLength | None = Field(None, description="None: what the adapter was trained with, else 75")
    seed: int = 0
    batch_size: int = Field(1, gt=0)
    replicas: int = Field(1, gt=0, description="pipeline copies on Ray Data; one per GPU on a cluster")
    gpus_per_replica: float = Field(0, ge=0)
    cpus_per_replica: float = Field(1, gt=0)
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    output: str = "generations"
    max_images: int | None = Field(None, gt=0, description="make at most this many images")
    ic_lora: PanelFillSettings | None = None
    controlnet: MapGenerateSettings | None = None

    @model_validator(mode="after")
    def _needs_prompts(self) -> "GenerateConfig":
        if self.kind == "ic_lora":
            if self.ic_lora is None:
                raise ValueError("kind: ic_lora needs an `ic_lora` section (inputs, panels_to_inpaint, ...)")
        elif self.kind == "controlnet":
            if self.controlnet is None:
                raise ValueError("kind: controlnet needs a `controlnet` section (model, maps, ...)")
        elif not (self.prompts or self.prompts_file or self.prompts_from_shards or self.prompt_template):
            raise ValueError("give `prompts`, `prompts_file`, `prompts_from_shards` or `prompt_template`")
        if self.loras and self.kind != "text_to_image":
            raise ValueError("loras: several LoRAs at once are for kind text_to_image; give one `lora`")
        if self.loras and self.lora:
            raise ValueError("give `lora` (with adapter_scale) or `loras`, not both")
        return self
