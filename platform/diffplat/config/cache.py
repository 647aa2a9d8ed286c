"""cache: latents and text embeddings encoded once, at the resolution training reads them."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from diffplat.config.base import _Strict, TokenLength, ModelResolution

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
