"""train: the adapter kind, its model and data, the optimiser, scaling over Ray Train and DeepSpeed."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from diffplat.config.base import _Strict, TokenLength, ModelResolution

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
    conditioning_init: Literal["default", "kaiming"] = Field(
        "default", description="how a new ControlNet's conditioning embedding (the convolutions that turn the map "
        "into features) starts. default: as diffusers' ControlNetModel.from_unet (torch's default init, which "
        "shrinks a signal at each layer: two different maps give features about 1000x closer than the maps are, "
        "and following maps comes late). kaiming: He-normal for those convolutions, so the map's detail reaches the "
        "last one; that last one stays zero, so the ControlNet still starts as a no-op")  # fmt: skip


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


class TimestepBias(_Strict):
    """Which of the DDPM schedule's timesteps training draws more often (SDXL), as diffusers'
    train_text_to_image_sdxl.py --timestep_bias_*: `later` weights the last `portion` of them
    (the noisiest) by `multiplier`, `earlier` the first, `range` those in [begin, end). An
    adapter that must set a picture's layout, a ControlNet's, learns it where the noise hides
    the layout and the loss still sees it (middle to high timesteps); `none`: uniform."""

    strategy: Literal["none", "earlier", "later", "range"] = "none"
    multiplier: float = Field(1.0, gt=0, description="how much more often the biased timesteps are drawn")
    portion: float = Field(0.25, gt=0, le=1, description="earlier, later: the share of the timesteps biased")
    begin: int = Field(0, ge=0, description="range: the first timestep biased")
    end: int = Field(1000, gt=0, description="range: the timestep after the last biased (at most the schedule's "
                     "length, SDXL's 1000)")  # fmt: skip

    @model_validator(mode="after")
    def _range(self) -> "TimestepBias":
        if self.strategy == "range" and self.begin >= self.end:
            raise ValueError(f"begin ({self.begin}) must be below end ({self.end})")
        return self


class BucketSettings(_Strict):
    """Aspect-ratio buckets (kohya's enable_bucket): each row trains at the bucket nearest its
    shape, each batch holds one bucket. `resolutions` lists them; empty: derived from the data,
    sizes of about train.resolution's pixel area in steps of `step`, the max_buckets most used."""

    resolutions: list[ModelResolution] = Field(default_factory=list)
    max_buckets: int = Field(8, gt=0)
    step: int = Field(64, gt=0, multiple_of=8)


class TrainConfig(_Strict):
    # full: every weight of the denoiser (diffusers' train_text_to_image_sdxl.py); the output is a
    # whole model, the base's other parts beside the trained denoiser
    kind: Literal["lora", "ic_lora", "controlnet", "full"] = "lora"
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
    repeats: int = Field(1, gt=0, description=(
        "kohya's num_repeats: every row this many times an epoch; a small dataset then makes fewer, longer "
        "epochs (each epoch restarts Ray Data's reading, seconds on a small machine)"))
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
    timestep_bias: TimestepBias = TimestepBias()
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
        if self.train_text_encoder and self.kind in ("controlnet", "full"):
            raise ValueError(f"train_text_encoder: kind {self.kind} trains with the text encoders frozen; use kind lora")
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
