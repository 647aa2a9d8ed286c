"""prepare: where the images come from (BDD, composites, pairs, folders, shards) and how they are sharded."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, field_validator, model_validator

from diffplat.config.base import _Strict, Resolution, _check_layout

class BddSource(_Strict):
    images: str
    labels: list[str] = Field(default_factory=list, description="BDD label JSON files (2018 or det_20 format, "
                              "read as streams) or folders of per-image label files")  # fmt: skip
    seg_masks: str | None = Field(None, description="folder of semantic masks, train ids 0-18, 255 = ignore")
    caption_template: str = Field("a driving scene {scene}, {time}, {weather}, with {objects}", description=(
        "fields {scene} {time} {weather} {objects}; a part between commas whose fields are all empty is left out"))
    where: dict[Literal["timeofday", "weather", "scene"], list[str]] = Field(default_factory=dict, description=(
        "only frames whose label attributes take one of these values, BDD's own, e.g. {timeofday: [night]} or "
        "{weather: [rainy, snowy]}; images without a label record are then left out"))

    @field_validator("caption_template")
    @classmethod
    def _template(cls, value: str) -> str:
        import string

        unknown = {f for _, f, _, _ in string.Formatter().parse(value) if f} - {"scene", "time", "weather", "objects"}
        if unknown:
            raise ValueError(f"unknown field {{{sorted(unknown)[0]}}}; use {{scene}} {{time}} {{weather}} {{objects}}")
        return value


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
