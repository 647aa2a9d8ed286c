"""Typed job configs: YAML -> pydantic model -> the function that runs each stage.

A job file names the stages it runs (`prepare`, `cache`, `train`, `generate`, `filter`, `evaluate`); each
present section runs, in that order. Relative paths are relative to the job's work folder.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Literal

import yaml
from pydantic import AfterValidator, BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator


class ConfigError(ValueError):
    """A job file that cannot be used; the message names the file and the field."""


class _Strict(BaseModel):
    # A misspelt option is an error, not a silently ignored key.
    model_config = ConfigDict(extra="forbid", frozen=True)


Resolution = tuple[int, int]  # (width, height), as image tools say it: 1280 720
TokenLength = Literal[75, 150, 225]  # kohya's max_token_length: 1, 2 or 3 CLIP windows


def _check_resolution(value: Resolution) -> Resolution:
    width, height = value
    if width <= 0 or height <= 0 or width % 8 or height % 8:
        raise ValueError(f"resolution must be two positive multiples of 8 (width height), got {width} {height}")
    return value


# What a model runs at: every field of this type is checked the same way, where it is declared.
ModelResolution = Annotated[Resolution, AfterValidator(_check_resolution)]


class TrackingConfig(_Strict):
    experiment: str = "diffplat"
    # None: $MLFLOW_TRACKING_URI if set, else a SQLite store in the work folder.
    uri: str | None = None


class RayConfig(_Strict):
    address: str | None = Field(None, description="a cluster to join; unset: the one RAY_ADDRESS names (as `ray job "
                                "submit` sets it), else a Ray of this process's own (cluster.py)")  # fmt: skip
    num_cpus: int | None = Field(None, description="CPUs of a Ray of this process's own; a cluster's are its own")
    dashboard: bool = False
    verbose: bool = Field(False, description="show the other libraries' logs, warnings and progress bars here too "
                          "(they are always in Ray's session log files)")  # fmt: skip


class BddSource(_Strict):
    images: str
    labels: list[str] = Field(default_factory=list, description="BDD label JSON files (2018 or det_20 format, "
                              "read as streams) or folders of per-image label files")  # fmt: skip
    seg_masks: str | None = Field(None, description="folder of semantic masks, train ids 0-18, 255 = ignore")
    caption_template: str = Field("a driving scene {scene}, {time}, {weather}, with {objects}", description=(
        "fields {scene} {time} {weather} {objects}; a part between commas whose fields are all empty is left out"))

    @field_validator("caption_template")
    @classmethod
    def _template(cls, value: str) -> str:
        import string

        unknown = {f for _, f, _, _ in string.Formatter().parse(value) if f} - {"scene", "time", "weather", "objects"}
        if unknown:
            raise ValueError(f"unknown field {{{sorted(unknown)[0]}}}; use {{scene}} {{time}} {{weather}} {{objects}}")
        return value


def _check_layout(value: str) -> str:
    from diffplat.data.composites import CompositeError, Layout

    try:
        return str(Layout.parse(value))
    except CompositeError as err:
        raise ValueError(str(err)) from None


class CompositeSource(_Strict):
    """Composites for In-Context LoRA: built from groups of images, or taken as they are."""

    groups: Literal["existing", "consecutive", "list", "bdd"] = Field(
        "consecutive", description="existing composites, a folder in name order, a list file, or BDD frames by attribute"
    )
    layout: str = Field("2x2", description="ROWSxCOLS; panel i is at row i // cols, column i % cols")
    images: str | None = Field(None, description="folder of composites (existing) or of panel images, with .txt captions")
    list_file: str | None = Field(None, description="groups: list; one composite a line, panel files separated by commas")
    bdd: BddSource | None = None
    group_by: Literal["scene", "timeofday", "weather"] = "scene"
    stride: int | None = Field(None, gt=0, description="images between the starts of two composites; default: no overlap")
    panel_size: Resolution = (512, 512)
    tag: str = Field("", description='caption prefix tag, e.g. "[MOVIE-SHOTS]" or "[BDD]"')
    summary: str = Field("", description="text after the tag; {count} and {value} are filled in for bdd groups")

    @field_validator("layout")
    @classmethod
    def _layout(cls, value: str) -> str:
        return _check_layout(value)

    @field_validator("panel_size")
    @classmethod
    def _panel_size(cls, value: Resolution) -> Resolution:
        if min(value) <= 0:
            raise ValueError(f"panel_size must be two positive numbers (width height), got {value[0]} {value[1]}")
        return value

    @model_validator(mode="after")
    def _inputs(self) -> "CompositeSource":
        needs = {"existing": "images", "consecutive": "images", "list": "list_file", "bdd": "bdd"}[self.groups]
        if getattr(self, needs) is None:
            raise ValueError(f"groups: {self.groups} needs `{needs}`")
        return self


class PairsSource(_Strict):
    """Images with conditioning images (ControlNet): two folders paired by base name, or
    source 4's ControlNet CSV index."""

    images: str | None = Field(None, description="folder of images")
    conditioning: str | None = Field(None, description="folder of conditioning images, paired by base name")
    captions: str | None = Field(None, description="folder of <image stem>.txt; default: beside the images")
    csv: str | None = Field(None, description="source 4's bdd_hf_dataset_controlnet_train.csv, instead of folders")
    image_column: str = "image"
    conditioning_column: str = "conditioning_image"
    caption_column: str = "text"
    segmentation: bool = Field(True, description="conditioning images are segmentation masks (grey train ids or "
                               "colour maps): checked and stored as the palette map")  # fmt: skip

    @model_validator(mode="after")
    def _inputs(self) -> "PairsSource":
        if self.csv is None and (self.images is None or self.conditioning is None):
            raise ValueError("give `images` and `conditioning` folders, or a `csv` index")
        return self


class FolderSource(_Strict):
    """Images with captions (sources 1, 3 and 5; diffusers' image folders): a same-named `.txt`
    per image, or, when the folder has one, `metadata.jsonl` (`file_name` + a caption field)."""

    images: str | None = Field(None, description="folder of images")
    captions: str | None = Field(None, description="folder of <image stem>.txt; default: beside the images")
    caption_column: str = Field("text", description="metadata.jsonl's or the CSV's caption field (diffusers' "
                                "--caption_column)")  # fmt: skip
    csv: str | None = Field(None, description="source 4's bdd_hf_dataset_lora_train.csv (image path, caption), "
                            "instead of a folder; relative image paths are read from the CSV's folder")  # fmt: skip
    image_column: str = "image"

    @model_validator(mode="after")
    def _inputs(self) -> "FolderSource":
        if (self.images is None) == (self.csv is None):
            raise ValueError("give one of images (a folder) and csv (source 4's LoRA index)")
        return self


class ShardsSource(_Strict):
    """Shards written by another diffplat run: checked, deduplicated and re-sharded."""

    path: str = Field(description="a folder of shard-*.parquet (another run's data/shards)")


class PrepareConfig(_Strict):
    source: Literal["bdd", "composites", "pairs", "folder", "shards"] = "bdd"
    bdd: BddSource | None = None
    composites: CompositeSource | None = None
    pairs: PairsSource | None = None
    folder: FolderSource | None = None
    shards: ShardsSource | None = None
    output: str = "data"
    rows_per_shard: int = Field(256, gt=0)
    caption_prefix: str = ""
    max_image_pixels: int = Field(80_000_000, gt=0, description="larger images are skipped, read from the header "
                                  "before decoding (decompression bombs)")  # fmt: skip
    max_image_side: int | None = Field(None, gt=0, description="images with a longer side are stored scaled down "
                                       "to it (maps nearest-neighbour); smaller ones as they are")  # fmt: skip

    @model_validator(mode="after")
    def _source_section(self) -> "PrepareConfig":
        if getattr(self, self.source) is None:
            raise ValueError(f"source: {self.source} needs a `{self.source}` section")
        return self


class LoraSettings(_Strict):
    rank: int = Field(16, gt=0)
    alpha: float = Field(16, gt=0)
    dropout: float = Field(0.0, ge=0, lt=1)
    target_modules: list[str] | None = Field(None, description="None: the base family's default (SDXL: the "
                                             "attention projections; FLUX.1: diffusers' train_dreambooth_lora_flux.py "
                                             "set, attention and feed-forward)")  # fmt: skip


class ScalingSettings(_Strict):
    num_workers: int = Field(1, gt=0)
    use_gpu: bool = False
    cpus_per_worker: float = Field(1.0, gt=0)
    # Where Ray Train keeps checkpoints: a local folder, or shared storage (s3://, NFS) on a cluster.
    storage_path: str = "ray_results"
    max_failures: int = Field(0, ge=-1, description="worker-group restarts after a lost worker, each going on "
                              "from the last checkpoint; -1: no limit")  # fmt: skip
    placement_strategy: Literal["PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD"] = Field(
        "PACK", description="Ray Train's: PACK fills a node's GPUs first (fast NVLink all-reduce); SPREAD puts "
        "workers on as many nodes as it can")  # fmt: skip


class DeepSpeedSettings(_Strict):
    zero_stage: Literal[0, 1, 2] = 2
    offload_optimizer: bool = False


class IcLoraSettings(_Strict):
    """In-Context LoRA on composites (kind: ic_lora).

    mode `composite`: the published recipe, a plain LoRA on whole composites, no masking.
    mode `masked`: each step hides random panels; the model sees the visible ones (as the
    masked-image channels of an inpainting UNet) and the text, and learns to fill the rest.
    """

    mode: Literal["composite", "masked"] = "masked"
    mask_probability: float = Field(0.7, ge=0, le=1, description="share of samples with 1..max_masked_panels "
                                    "panels hidden; the others hide every panel (text only)")  # fmt: skip
    max_masked_panels: int = Field(2, gt=0)
    masked_loss_weight: float = Field(1.0, ge=0, description="loss weight on hidden panels")
    visible_loss_weight: float = Field(0.0, ge=0, description="loss weight on visible panels")

    @model_validator(mode="after")
    def _some_weight(self) -> "IcLoraSettings":
        if self.masked_loss_weight == 0 and self.visible_loss_weight == 0:
            raise ValueError("masked_loss_weight and visible_loss_weight cannot both be 0")
        return self


class ValidationSettings(_Strict):
    """Images made with the adapter as it trains, logged to MLflow as one grid per time."""

    every_n_steps: int | None = Field(None, gt=0, description="None: only at the end")
    before_training: bool = Field(False, description="also before the first step (or the first after a resume): "
                                  "the starting point to compare with (ai-toolkit's default)")
    prompts: list[str] = Field(default_factory=list, description="lora; ic_lora and controlnet use training rows")
    num_images: int = Field(2, gt=0, description="ic_lora, controlnet: how many training rows to draw from")
    panels: list[int] | None = Field(None, description="ic_lora: panels to fill; None: the second half")
    num_inference_steps: int = Field(20, gt=0)
    guidance_scale: float = 5.0
    seed: int = Field(0, description="image i is drawn with seed + i")
    resolution: ModelResolution | None = Field(None, description="lora: the images' size; None: train.resolution")


class AiToolkitLayout(_Strict):
    """train.output in ai-toolkit's layout, for jobs read from an ai-toolkit file: `<name>.safetensors`
    (the LoRA), `<name>_<step:09d>.safetensors` of the kept checkpoints, `config.yaml` (the job
    file as read), `samples/<ms>__<step:09d>_<i>.jpg` (the validation images), and diffplat's
    adapter_info.json."""

    name: str = Field(description="the files' name (ai-toolkit's config.name)")
    job_file: str | None = Field(None, description="written as config.yaml")
    dtype: Literal["float32", "float16", "bfloat16"] = Field("float16", description="of the saved LoRA weights")


class ControlNetSettings(_Strict):
    init: str | None = Field(None, description="an existing ControlNet (folder or hub id) to go on from; "
                             "None: a new one from the base UNet")  # fmt: skip


class FlowSettings(_Strict):
    """Flow-matching training (FLUX.1): how noise levels are drawn, how the loss is weighted, and
    the guidance value a guidance-distilled model (FLUX.1-dev) is given. SDXL ignores these."""

    timestep_sampling: Literal["sigmoid", "logit_normal", "mode", "uniform"] = Field(
        "sigmoid", description="sigmoid: ai-toolkit's flowmatch (1 - sigmoid(randn)); logit_normal, mode, uniform: "
        "diffusers' --weighting_scheme")  # fmt: skip
    logit_mean: float = Field(0.0, description="logit_normal: mean")
    logit_std: float = Field(1.0, gt=0, description="logit_normal: standard deviation")
    mode_scale: float = Field(1.29, description="mode: scale")
    loss_weighting: Literal["none", "sigma_sqrt", "cosmap"] = Field("none", description="diffusers' loss weighting "
                                                                    "for SD3/FLUX; none: all steps alike")  # fmt: skip
    guidance_scale: float = Field(1.0, ge=0, description="the guidance input of FLUX.1-dev in training: ai-toolkit's "
                                  "1.0; diffusers' train_dreambooth_lora_flux.py uses 3.5")  # fmt: skip


class BucketSettings(_Strict):
    """Aspect-ratio buckets (kohya's enable_bucket): each row trains at the bucket nearest its
    shape, each batch holds one bucket. `resolutions` lists them; empty: derived from the data,
    sizes of about train.resolution's pixel area in steps of `step`, the max_buckets most used."""

    resolutions: list[ModelResolution] = Field(default_factory=list)
    max_buckets: int = Field(8, gt=0)
    step: int = Field(64, gt=0, multiple_of=8)


class TrainConfig(_Strict):
    kind: Literal["lora", "ic_lora", "controlnet"] = "lora"
    base_model: str = Field(description="hub id or local folder of an SDXL or FLUX.1 pipeline")
    vae: str | None = Field(None, description="a VAE to use instead of the base model's, e.g. an fp16-safe one")
    variant: str | None = None
    data: str = Field(description="folder of Parquet shards written by `prepare`")
    cache: str | None = Field(None, description="a folder written by a `cache` stage: latents and text embeddings "
                              "come from it, and the VAE and text encoders are never loaded (rank 0 loads them "
                              "for validation images only)")  # fmt: skip
    output: str = "adapters/lora"
    resolution: ModelResolution = (1024, 1024)
    buckets: BucketSettings | None = Field(None, description="train at the data's own aspect ratios instead of one "
                                           "resolution (see BucketSettings)")  # fmt: skip
    center_crop: bool = True
    random_flip: bool = False
    lora: LoraSettings = LoraSettings()
    ic_lora: IcLoraSettings = IcLoraSettings()
    controlnet: ControlNetSettings = ControlNetSettings()
    validation: ValidationSettings = ValidationSettings()
    ai_toolkit_layout: AiToolkitLayout | None = Field(None, description="write train.output as ai-toolkit does "
                                                      "(set by jobs read from ai-toolkit files)")  # fmt: skip
    proportion_empty_prompts: float = Field(0.0, ge=0, le=1, description="share of captions replaced by the empty "
                                            "prompt (classifier-free guidance)")  # fmt: skip
    max_token_length: TokenLength = Field(75, description="caption tokens kept: 75 is one CLIP window (stock "
                                          "diffusers); 150 or 225 keep long multi-scene captions whole")  # fmt: skip
    max_sequence_length: int = Field(512, gt=0, le=512, description="FLUX.1: T5 tokens kept (FLUX.1-dev's 512 keeps a "
                                     "long multi-scene caption whole; schnell's is 256)")  # fmt: skip
    flow: FlowSettings = FlowSettings()
    learning_rate: float = Field(1e-4, gt=0)
    # diffusers' get_scheduler, every name it offers (--lr_scheduler, --lr_num_cycles, --lr_power)
    lr_scheduler: Literal["constant", "constant_with_warmup", "linear", "cosine", "cosine_with_restarts",
                          "polynomial", "piecewise_constant"] = "constant"  # fmt: skip
    lr_warmup_steps: int = Field(0, ge=0)
    lr_num_cycles: int = Field(1, gt=0, description="cosine_with_restarts: number of hard restarts")
    lr_power: float = Field(1.0, gt=0, description="polynomial: power of the decay")
    lr_step_rules: str | None = Field(None, description="piecewise_constant: e.g. '1:10,0.1:20,0.01' (multiplier:"
                                      "until step, ..., last multiplier)")  # fmt: skip
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    adam_epsilon: float = 1e-8
    weight_decay: float = 1e-2
    use_8bit_adam: bool = False
    max_train_steps: int | None = Field(None, gt=0)
    num_train_epochs: int | None = Field(None, gt=0, description="instead of max_train_steps")
    train_batch_size: int = Field(1, gt=0, description="per worker")
    gradient_accumulation_steps: int = Field(1, gt=0)
    gradient_checkpointing: bool = False
    mixed_precision: Literal["no", "bf16", "fp16"] = "no"
    max_grad_norm: float = 1.0
    noise_offset: float = 0.0
    prediction_type: Literal["epsilon", "v_prediction"] | None = Field(None, description="what the model learns to "
                                                                       "predict; None: the base model's scheduler's")  # fmt: skip
    use_ema: bool = Field(False, description="keep an exponential moving average of the trained weights; the saved "
                          "adapter and the validation images use it")  # fmt: skip
    ema_decay: float = Field(0.9999, gt=0, lt=1, description="EMA decay, warmed up as (1 + step) / (10 + step)")
    train_text_encoder: bool = Field(False, description="also train LoRA layers on both text encoders (kind lora)")
    shuffle_buffer: int = Field(256, ge=0, description="rows each worker shuffles among, reseeded every epoch "
                                "(Ray Data's local shuffle); 0: shard order")  # fmt: skip
    snr_gamma: float | None = Field(None, gt=0, description="min-SNR loss weighting (5.0 is the paper's); None: off")
    checkpointing_steps: int | None = Field(None, gt=0)
    checkpoints_total_limit: int | None = Field(None, gt=0)
    resume_from_checkpoint: str | None = Field(None, description="`latest` (this job's newest checkpoint) or a "
                                               "checkpoint folder; the run goes on from its step")  # fmt: skip
    log_every: int = Field(1, gt=0)
    seed: int = 0
    scaling: ScalingSettings = ScalingSettings()
    deepspeed: DeepSpeedSettings = DeepSpeedSettings()

    @model_validator(mode="after")
    def _length(self) -> "TrainConfig":
        if (self.max_train_steps is None) == (self.num_train_epochs is None):
            raise ValueError("give one of max_train_steps and num_train_epochs")
        if self.lr_scheduler == "piecewise_constant" and not self.lr_step_rules:
            raise ValueError("lr_scheduler piecewise_constant needs lr_step_rules, e.g. '1:10,0.1:20,0.01'")
        if self.train_text_encoder and self.kind == "controlnet":
            raise ValueError("train_text_encoder: a ControlNet trains with the text encoders frozen; use kind lora")
        if self.cache and self.train_text_encoder:
            raise ValueError("cache: train_text_encoder trains the text encoders, so the embeddings cannot come "
                             "from a cache; drop one of the two")  # fmt: skip
        if self.buckets and self.cache:
            raise ValueError("buckets: a cache holds latents of one resolution; train from the shards to use buckets")
        if self.buckets and self.kind == "ic_lora":
            raise ValueError("buckets: a composite's layout fixes its shape; ic_lora trains at train.resolution")
        if self.cache and self.kind == "ic_lora" and self.ic_lora.mode == "masked":
            raise ValueError("cache: ic_lora mode masked encodes each step's partly hidden composite, which needs "
                             "the pixels; use mode composite, or train masked without a cache")  # fmt: skip
        return self


class CacheConfig(_Strict):
    """The `cache` stage: the VAE and both text encoders run once over the shards (Ray Data
    actors, on GPUs where there are) and their latents and embeddings are written as shards;
    `train.cache` then trains from them and never loads those models. The fields that make a row
    (model, vae, variant, resolution, crop, flip, seed, token lengths) must be train's own:
    training refuses a cache made otherwise, naming the field."""

    data: str = Field(description="folder of Parquet shards written by `prepare`")
    output: str = "cache"
    base_model: str = Field(description="hub id or local folder of an SDXL or FLUX.1 pipeline (its VAE and text "
                            "encoders)")  # fmt: skip
    vae: str | None = Field(None, description="a VAE to use instead of the base model's, as train.vae")
    variant: str | None = None
    resolution: ModelResolution = (1024, 1024)
    center_crop: bool = True
    random_flip: bool = False
    seed: int = Field(0, description="train.seed: a row's random crop and flip come from it and the row's id")
    max_token_length: TokenLength = 75
    max_sequence_length: int = Field(512, gt=0, le=512, description="FLUX.1: T5 tokens kept, as train's")
    conditioning: bool = Field(False, description="keep each row's conditioning pixels (ControlNet); rows "
                               "without a conditioning image are left out")  # fmt: skip
    dtype: Literal["float32", "bfloat16", "float16"] = Field("float32", description="of the text encoders and the "
                                                             "stored arrays; the VAE runs in float32 unless `vae` "
                                                             "is given (as in train)")  # fmt: skip
    batch_size: int = Field(8, gt=0, description="rows per encoder call")
    replicas: int = Field(1, gt=0, description="encoder copies on Ray Data; one per GPU on a cluster")
    gpus_per_replica: float = Field(0, ge=0)
    cpus_per_replica: float = Field(1, gt=0)
    rows_per_shard: int = Field(256, gt=0)


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


class JobConfig(_Strict):
    name: str
    tracking: TrackingConfig = TrackingConfig()
    ray: RayConfig = RayConfig()
    prepare: PrepareConfig | None = None
    cache: CacheConfig | None = None
    train: TrainConfig | None = None
    generate: GenerateConfig | None = None
    filter: FilterConfig | None = None
    evaluate: EvaluateConfig | None = None

    @model_validator(mode="after")
    def _has_a_stage(self) -> "JobConfig":
        if not self.stages():
            raise ValueError("a job needs at least one of: " + ", ".join(STAGES))
        if self.cache and self.train and self.train.cache == self.cache.output:
            from diffplat.data.cache import cache_differs

            problem = cache_differs(self.cache.model_dump(mode="json"), self.train, "cache.{field}")
            if problem:
                raise ValueError(problem)
        return self

    def stages(self) -> list[str]:
        return [name for name in STAGES if getattr(self, name) is not None]


STAGES = ("prepare", "cache", "train", "generate", "filter", "evaluate")


def parse_config(data: dict, source: str = "<config>") -> JobConfig:
    try:
        return JobConfig.model_validate(data)
    except ValidationError as err:
        problems = []
        for e in err.errors():
            field = ".".join(str(p) for p in e["loc"]) or "(top level)"
            problems.append(f"  {field}: {e['msg']}")
        raise ConfigError(f"{source}: invalid job config\n" + "\n".join(problems)) from None


def read_yaml_mapping(path: str | Path, what: str = "job file") -> dict:
    """A YAML file that holds a mapping (a job, a Serve config, source 2's inference YAML); a
    missing file, bad YAML or another shape is one ConfigError naming the file."""
    path = Path(path)
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (FileNotFoundError, IsADirectoryError):
        raise ConfigError(f"{path}: no such {what}") from None
    except UnicodeDecodeError:
        raise ConfigError(f"{path}: not UTF-8 text; a {what} is YAML") from None
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        raise ConfigError(f"{path}: not valid YAML{where}: {getattr(err, 'problem', None) or err}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: a {what} must be a YAML mapping, got {type(data).__name__}")
    return data


def load_config(path: str | Path, overrides: list[str] | None = None) -> JobConfig:
    """Read a job YAML (diffplat's, or ai-toolkit's `job: extension` files, translated by
    aitoolkit.py); `overrides` are `dotted.key=value` strings (value parsed as YAML)."""
    path = Path(path)
    data = read_yaml_mapping(path)
    from diffplat.aitoolkit import is_aitoolkit_job, to_job

    if is_aitoolkit_job(data):
        import logging

        data, notes = to_job(data, path)
        for note in notes:
            logging.getLogger("diffplat").warning("%s", note)
    for item in overrides or []:
        apply_override(data, item, path)
    return parse_config(data, str(path))


def apply_override(data: dict, item: str, source: Path) -> None:
    key, sep, raw = item.partition("=")
    if not sep or not key:
        raise ConfigError(f"{source}: override {item!r} is not of the form dotted.key=value")
    node = data
    parts = key.split(".")
    for part in parts[:-1]:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise ConfigError(f"{source}: override {item!r}: {part} is not a section")
    node[parts[-1]] = yaml.safe_load(raw)


def to_yaml(config: JobConfig) -> str:
    return yaml.safe_dump(config.model_dump(mode="json"), sort_keys=False)


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
    tracking_uri: str | None = Field(None, description="MLflow store for runs:/ adapters")
    workdir: str | None = Field(None, description="what relative paths are relative to (default: the current folder)")
    batching: BatchingSettings = BatchingSettings()
    limits: ServeLimits = ServeLimits()
