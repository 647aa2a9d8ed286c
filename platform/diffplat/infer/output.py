"""A generation folder that a stopped run goes on filling.

    images/<name>          one file per finished image, written whole by the replica that made it
                           (temporary name, then rename); comparisons/<name> likewise
    metadata.jsonl         one line per finished image: its index, prompt, seed and settings
    generation.json        the settings that decide what the images look like
    coco_images.json       COCO's `images` list of every finished image
    skipped.txt            inputs left out, each with its reason

Every image has its own seed from its index, so a rerun of the same job skips the indices
already in metadata.jsonl (whose image is there) and makes only the missing ones: none twice,
none lost. A folder holding another generation's images is refused, not mixed into.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from diffplat.config import ConfigError, GenerateConfig
from diffplat.fileio import read_jsonl, write_json_atomic, write_text_atomic

METADATA, SETTINGS, COCO_IMAGES = "metadata.jsonl", "generation.json", "coco_images.json"
# Settings that change how the work is spread or capped, not what any image looks like.
NOT_IN_THE_IMAGES = {"max_images", "replicas", "gpus_per_replica", "cpus_per_replica", "batch_size", "output", "overwrite"}


def add_input_rows(rows: list[dict], config: GenerateConfig, path: Path, stem: str, prompt: str,
                   named: dict[str, Path], skipped: list[str]) -> None:  # fmt: skip
    """`num_generations` rows for one input (a composite, a map), its images named after `stem`.
    An input whose stem an earlier one has (`a.png` and `a.jpg`) is skipped and named: its images
    would replace the other's."""
    if stem in named:
        skipped.append(f"{path.name}: its images would be named like those of {named[stem].name} ({stem}*.png); "
                       f"rename one")  # fmt: skip
        return
    named[stem] = path
    for g in range(config.num_generations):
        index = len(rows)
        name = f"{stem}.png" if config.num_generations == 1 else f"{stem}_{g}.png"
        rows.append({"index": index, "prompt": prompt, "seed": config.seed + index, "input": str(path), "name": name})


def settings_of(config: GenerateConfig) -> dict:
    return config.model_dump(mode="json", exclude=NOT_IN_THE_IMAGES)


class GenerationFolder:
    def __init__(self, folder: Path, config: GenerateConfig):
        self.folder = Path(folder)
        saved = self.folder / SETTINGS
        if self.folder.exists() and not saved.is_file() and any(self.folder.iterdir()):
            raise ConfigError(f"generate.output: {self.folder} is not empty and holds no {SETTINGS}: it is not a "
                              "diffplat generation folder; give an empty or new folder")  # fmt: skip
        if config.overwrite and saved.is_file():  # only ever a generation folder of ours
            shutil.rmtree(self.folder)
        settings = settings_of(config)
        self.records: dict[int, dict] = {}
        if saved.is_file():
            before = json.loads(saved.read_text())
            changed = sorted(k for k in set(before) | set(settings) if before.get(k) != settings.get(k))
            if changed:
                raise ConfigError(f"generate.output: {self.folder} holds images of another generation (it differs in "
                                  f"{', '.join(changed)}); give another output, or set overwrite: true")  # fmt: skip
            self.records = self._finished()
        (self.folder / "images").mkdir(parents=True, exist_ok=True)
        for sub in ("images", "comparisons"):  # half-written files of a killed run (temporary names)
            for leftover in (self.folder / sub).glob(".*.tmp-*"):
                leftover.unlink(missing_ok=True)
        # Rewritten with exactly the finished images: drops a line torn by a kill mid-write.
        self._rewrite_metadata()
        write_json_atomic(saved, settings)
        self._metadata = open(self.folder / METADATA, "a", encoding="utf-8")

    def _finished(self) -> dict[int, dict]:
        """The images a previous run finished: a metadata line whose image is there."""
        return {int(r["index"]): r for r in read_jsonl(self.folder / METADATA)
                if isinstance(r.get("index"), int) and (self.folder / str(r.get("file_name", ""))).is_file()}  # fmt: skip

    def _rewrite_metadata(self) -> None:
        lines = [json.dumps(self.records[i]) + "\n" for i in sorted(self.records)]
        write_text_atomic(self.folder / METADATA, "".join(lines))

    @property
    def done(self) -> set[int]:
        return set(self.records)

    def finished(self, request: dict) -> bool:
        """Whether this request's image is there: same index, prompt, seed and name (an input
        list that changed between runs shifts indices; those are made again)."""
        record = self.records.get(int(request["index"]))
        return record is not None and (record.get("prompt"), record.get("seed"), record.get("file_name")) == (
            request["prompt"], request["seed"], f"images/{request['name']}")

    def add(self, name: str, record: dict) -> None:
        """One finished image, already written whole by the replica that made it: its metadata
        line (a line without its image is impossible; an image without its line is made again)."""
        record = {"index": record["index"], "file_name": f"images/{name}", **record}
        self._metadata.write(json.dumps(record) + "\n")
        self._metadata.flush()  # a killed run loses at most the images in flight
        self.records[int(record["index"])] = record

    def finish(self, skipped: list[str], requested: set[int]) -> None:
        """Close the run: metadata.jsonl rewritten with exactly this generation's images (a record
        superseded by a remade index, or past the end of a shorter input list, goes)."""
        self._metadata.close()
        self.records = {i: r for i, r in self.records.items() if i in requested}
        self._rewrite_metadata()
        images = [{"id": i + 1, "file_name": r["file_name"], "width": r.get("width"), "height": r.get("height"),
                   "diffplat_index": i} for i, r in sorted(self.records.items())]  # fmt: skip
        write_json_atomic(self.folder / COCO_IMAGES, {"images": images})
        if skipped:
            write_text_atomic(self.folder / "skipped.txt", "".join(f"{s}\n" for s in skipped))
