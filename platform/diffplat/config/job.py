"""A job: its stages' sections in one file, read from YAML (or an ai-toolkit file) with `--set` overrides."""

from __future__ import annotations

from pathlib import Path

import yaml
from pydantic import ValidationError, model_validator

from diffplat.config.base import ConfigError, _Strict, TrackingConfig, RayConfig
from diffplat.config.prepare import PrepareConfig
from diffplat.config.train import TrainConfig
from diffplat.config.cache import CacheConfig
from diffplat.config.generate import GenerateConfig
from diffplat.config.filter import FilterConfig
from diffplat.config.evaluate import EvaluateConfig

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
