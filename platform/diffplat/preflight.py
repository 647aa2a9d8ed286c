"""Every model, adapter, VAE and data path of a job, checked before Ray starts.

A wrong `base_model` found inside a Ray actor is a 350-line traceback minutes into a run; found
here it is one line naming the field and the value, in well under a second. A path that an
earlier stage of the same job writes (the shards of `prepare`, the folder of `cache`, the adapter
of `train`, the images of `generate`, the kept set of `filter`) is not checked: it is not there yet.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Callable

from diffplat.config import ConfigError, JobConfig

HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+")


class PreflightError(ConfigError):
    """Paths of a job that cannot work; one line each."""


def _offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE") == "1"


def _hub_problem(field: str, value: str, needs: str) -> str | None:
    """A hub id is fine online; offline it must already be in the local hub cache."""
    if not _offline():
        return None
    from huggingface_hub import try_to_load_from_cache

    try:
        if isinstance(try_to_load_from_cache(value, needs), str):
            return None
    except ValueError:  # not a valid repo id after all (e.g. `--` or `..` in it)
        return f"{field}: {value} is not there (neither a folder nor a hub id like org/name)"
    return f"{field}: {value} is not a folder here, and as a hub id it is not in the local hub cache (HF_HUB_OFFLINE=1)"


class Preflight:
    """Collects the problems of one job; `resolve` turns a job path into a real path."""

    def __init__(self, resolve: Callable[[str], Path]):
        self.resolve = resolve
        self.problems: list[str] = []
        self.inputs: list[tuple[str, Path]] = []  # (field, path) of every local input checked

    def _input(self, field: str, value: str | None) -> None:
        if value is not None and "://" not in value and self.resolve(value).exists():
            self.inputs.append((field, self.resolve(value).resolve()))

    def model(self, field: str, value: str | None, needs: str, what: str) -> None:
        """A diffusers model: a local folder holding `needs`, or a hub id."""
        self._input(field, value)
        if value is None:
            return
        local = self.resolve(value)
        if local.is_dir():
            if not (local / needs).is_file():
                self.problems.append(f"{field}: {value} has no {needs}; it is not a diffusers {what} folder")
        elif local.exists():
            self.problems.append(f"{field}: {value} is a file; give the {what} folder (or a hub id)")
        elif HUB_ID.fullmatch(value) and not value.startswith("."):
            problem = _hub_problem(field, value, needs)
            if problem:
                self.problems.append(problem)
        else:
            self.problems.append(f"{field}: {value} is not there (neither a folder nor a hub id like org/name)")

    def lora(self, field: str, value: str | None) -> None:
        from diffplat.tracking import is_mlflow_ref

        if value is None or is_mlflow_ref(value):  # MLflow's to fetch when the stage starts
            return
        self._input(field, value)
        from diffplat.models.lora import LoraFileError, lora_location

        path = value if HUB_ID.fullmatch(value) and not self.resolve(value).exists() else str(self.resolve(value))
        try:
            lora_location(path)
        except LoraFileError as err:
            self.problems.append(f"{field}: {err}")

    def folder(self, field: str, value: str | None) -> None:
        self._input(field, value)
        if value is not None and "://" not in value and not self.resolve(value).is_dir():
            self.problems.append(f"{field}: {value} is not a folder")

    def file(self, field: str, value: str | None) -> None:
        self._input(field, value)
        if value is not None and "://" not in value and not self.resolve(value).is_file():
            self.problems.append(f"{field}: {value} is not a file")

    def file_or_folder(self, field: str, value: str) -> None:
        self._input(field, value)
        if "://" not in value and not self.resolve(value).exists():
            self.problems.append(f"{field}: {value} is neither a file nor a folder")

    def shards(self, field: str, value: str) -> None:
        self._input(field, value)
        if "://" in value:
            return
        folder = self.resolve(value)
        if not folder.is_dir():
            self.problems.append(f"{field}: {value} is not a folder (run a prepare stage first, or add one to the job)")
        elif not any(folder.glob("*.parquet")):
            self.problems.append(f"{field}: {value} holds no Parquet shards (written by a prepare stage)")

    def cache(self, field: str, value: str) -> None:
        self._input(field, value)
        from diffplat.data.cache import CACHE_INFO

        folder = self.resolve(value)
        if not folder.is_dir():
            self.problems.append(f"{field}: {value} is not a folder (run a cache stage first, or add one to the job)")
        elif not (folder / CACHE_INFO).is_file():
            self.problems.append(f"{field}: {value} has no {CACHE_INFO}; it is not a folder a cache stage wrote")


def _written_by_job(config: JobConfig, resolve) -> Callable[[str], bool]:
    """Whether a path lies in what the job's own stages write (prepare's output folder, the cache,
    train's adapter, generate's images, filter's dataset), so later stages may name it before it
    exists."""
    outputs = [resolve(stage.output) for stage in (config.prepare, config.cache, config.train, config.generate) if stage]
    if config.filter:
        outputs.append(resolve(config.filter.images) / "dataset")  # the kept set it writes there
    outputs = [out.resolve() for out in outputs]

    def made(value: str) -> bool:
        path = resolve(value).resolve()
        return any(path == out or out in path.parents for out in outputs)

    return made


def check_job_paths(config: JobConfig, resolve: Callable[[str], Path], job_file: Path | None = None) -> None:
    """Raise PreflightError listing every path of `config` that cannot work, one line each
    (`job_file`, the YAML the job came from, is one more thing no output may replace)."""
    check = Preflight(resolve)
    if job_file is not None:
        check.inputs.append(("the job file", Path(job_file).resolve()))
    made = _written_by_job(config, resolve)
    p = config.prepare
    if p is not None:
        if p.source == "bdd" and p.bdd:
            check.folder("prepare.bdd.images", p.bdd.images)
            check.folder("prepare.bdd.seg_masks", p.bdd.seg_masks)
            for i, label in enumerate(p.bdd.labels):
                check.file_or_folder(f"prepare.bdd.labels[{i}]", label)
        if p.source == "composites" and p.composites:
            c = p.composites
            check.folder("prepare.composites.images", c.images)
            check.file("prepare.composites.list_file", c.list_file)
            if c.bdd:
                check.folder("prepare.composites.bdd.images", c.bdd.images)
        if p.source == "pairs" and p.pairs:
            if p.pairs.csv:
                check.file("prepare.pairs.csv", p.pairs.csv)
            else:
                check.folder("prepare.pairs.images", p.pairs.images)
                check.folder("prepare.pairs.conditioning", p.pairs.conditioning)
            check.folder("prepare.pairs.captions", p.pairs.captions)
        if p.source == "shards" and p.shards:
            check.shards("prepare.shards.path", p.shards.path)
        if p.source == "folder" and p.folder:
            check.folder("prepare.folder.images", p.folder.images)
            check.folder("prepare.folder.captions", p.folder.captions)
            check.file("prepare.folder.csv", p.folder.csv)
    c = config.cache
    if c is not None:
        check.model("cache.base_model", c.base_model, "model_index.json", "pipeline")
        check.model("cache.vae", c.vae, "config.json", "VAE")
        if not made(c.data):
            check.shards("cache.data", c.data)
    t = config.train
    if t is not None:
        check.model("train.base_model", t.base_model, "model_index.json", "pipeline")
        check.model("train.vae", t.vae, "config.json", "VAE")
        check.model("train.controlnet.init", t.controlnet.init, "config.json", "ControlNet")
        if not made(t.data):
            check.shards("train.data", t.data)
        if t.cache and not made(t.cache):
            check.cache("train.cache", t.cache)
    g = config.generate
    if g is not None:
        check.model("generate.base_model", g.base_model, "model_index.json", "pipeline")
        check.model("generate.vae", g.vae, "config.json", "VAE")
        if g.lora and not made(g.lora):
            check.lora("generate.lora", g.lora)
        for i, adapter in enumerate(g.loras):
            if not made(adapter.path):
                check.lora(f"generate.loras[{i}].path", adapter.path)
        check.file("generate.prompts_file", g.prompts_file)
        if g.prompts_from_shards and not made(g.prompts_from_shards):
            check.shards("generate.prompts_from_shards", g.prompts_from_shards)
        if g.ic_lora and not made(g.ic_lora.inputs):
            check.folder("generate.ic_lora.inputs", g.ic_lora.inputs)
        if g.controlnet:
            n = g.controlnet
            if not made(n.model):
                check.model("generate.controlnet.model", n.model, "config.json", "ControlNet")
            if not made(n.maps):
                check.folder("generate.controlnet.maps", n.maps)
            check.folder("generate.controlnet.captions", n.captions)
            for i, label in enumerate(n.bdd_labels):
                check.file(f"generate.controlnet.bdd_labels[{i}]", label)
    f = config.filter
    if f is not None:
        if not f.model.endswith((".yaml", ".yml")):
            check.file("filter.model", f.model)
        if not made(f.images):
            check.folder("filter.images", f.images)
    e = config.evaluate
    if e is not None:
        for field, value in (("evaluate.real", e.real), ("evaluate.val", e.val)):
            if isinstance(value, str):
                if not made(value):
                    check.file_or_folder(field, value)
            else:
                check.folder(f"{field}.images", value.images)
                for i, label in enumerate(value.labels):
                    check.file_or_folder(f"{field}.labels[{i}]", label)
        for name, value in e.synthetic.items():
            if not made(value):
                check.file_or_folder(f"evaluate.synthetic.{name}", value)
        if not e.detector.model.endswith((".yaml", ".yml")):
            check.file("evaluate.detector.model", e.detector.model)
    check.problems += _overlaps(config, resolve, check.inputs)
    if check.problems:
        raise PreflightError("\n".join(check.problems))


def _overlaps(config: JobConfig, resolve: Callable[[str], Path], inputs: list[tuple[str, Path]]) -> list[str]:
    """An output a stage replaces whole must not be, or hold, the work folder, an input of the
    job, or another stage's output: a one-character slip (`train.output: .`) would replace them."""
    stages = {"prepare": config.prepare, "cache": config.cache, "train": config.train, "generate": config.generate,
              "evaluate": config.evaluate}  # fmt: skip
    outputs = {f"{name}.output": resolve(stage.output).resolve() for name, stage in stages.items() if stage}
    replaced = {k: v for k, v in outputs.items() if not k.startswith("prepare.")}  # prepare fills its folder
    work = resolve(".").resolve()
    problems = []

    def holds(outer: Path, inner: Path) -> bool:
        return inner == outer or outer in inner.parents

    for field, out in replaced.items():
        if holds(out, work):
            problems.append(f"{field}: {out} is the work folder or holds it; it would be replaced whole: name a "
                            f"folder of its own, e.g. {field.split('.')[0]}-output")  # fmt: skip
            continue
        for name, path in inputs:
            if holds(out, path):
                problems.append(f"{field}: {out} holds {name} ({path}), which the job reads; it would be replaced")
        for other, path in outputs.items():
            if other != field and holds(out, path):
                problems.append(f"{field}: {out} holds {other} ({path}); it would be replaced")
    return problems


def check_job_cpus(config: JobConfig) -> None:
    """On a Ray of this process's own (cluster.py's rule 3) the CPUs are fixed: training workers
    that hold all of them leave none for Ray Data's read tasks (a CPU each), and the run would
    wait for its first batch forever. A cluster's CPUs are its autoscaler's to add: not checked."""
    from diffplat.cluster import init_options, starts_own_ray

    if config.train is None or not starts_own_ray(init_options(config.ray.address)):
        return
    total = config.ray.num_cpus or os.cpu_count() or 1
    scaling = config.train.scaling
    held = scaling.num_workers * scaling.cpus_per_worker
    if held > total - 1:
        raise PreflightError(
            f"train.scaling: {scaling.num_workers} worker(s) x {scaling.cpus_per_worker:g} CPU hold {held:g} of the "
            f"{total:g} CPUs of this machine's Ray (ray.num_cpus), leaving less than the one CPU Ray Data needs "
            f"to read the training data: the run would wait forever. Lower train.scaling.cpus_per_worker (e.g. "
            f"{max(total - 1, 0.5) / scaling.num_workers:g}) or num_workers")  # fmt: skip
