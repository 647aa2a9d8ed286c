"""Typed job configs: YAML -> pydantic model -> the function that runs each stage.

A job file names the stages it runs (`prepare`, `cache`, `train`, `generate`, `filter`, `evaluate`); each
present section runs, in that order. Relative paths are relative to the job's work folder. One module
a stage's section (prepare.py, train.py, ...), job.py for the file as a whole, serve.py for the
HTTP API's args; this package imports nothing else of diffplat at import time.
"""

from diffplat.config.base import ConfigError, ModelResolution, RayConfig, Resolution, TokenLength, TrackingConfig
from diffplat.config.cache import CacheConfig
from diffplat.config.evaluate import (DETECTOR_OWN_ARGS, REAL_VARIANT, SET_NAME, BddSplit, DetectionSet,
                                      DetectorSettings, EvaluateConfig, MixSpec)  # fmt: skip
from diffplat.config.filter import FilterConfig, FilterRules
from diffplat.config.generate import GenerateConfig, LoraRef, MapGenerateSettings, PanelFillSettings, PromptTemplate
from diffplat.config.job import STAGES, JobConfig, apply_override, load_config, parse_config, read_yaml_mapping, to_yaml
from diffplat.config.prepare import BddSource, CompositeSource, FolderSource, PairsSource, PrepareConfig, ShardsSource
from diffplat.config.serve import BatchingSettings, ServeConfig, ServeLimits
from diffplat.config.train import (AiToolkitLayout, BucketSettings, ControlNetSettings, DeepSpeedSettings, FlowSettings,
                                   IcLoraSettings, LoraSettings, ScalingSettings, TrainConfig, ValidationSettings)  # fmt: skip

__all__ = [
    "AiToolkitLayout", "BatchingSettings", "BddSource", "BddSplit", "BucketSettings", "CacheConfig", "CompositeSource",
    "ConfigError", "ControlNetSettings", "DeepSpeedSettings", "DetectionSet", "DetectorSettings", "DETECTOR_OWN_ARGS",
    "EvaluateConfig", "FilterConfig", "FilterRules", "FlowSettings", "FolderSource", "GenerateConfig", "IcLoraSettings",
    "JobConfig", "LoraRef", "LoraSettings", "MapGenerateSettings", "MixSpec", "ModelResolution", "PairsSource",
    "PanelFillSettings", "PrepareConfig", "PromptTemplate", "RayConfig", "REAL_VARIANT", "Resolution", "ScalingSettings",
    "ServeConfig", "ServeLimits", "SET_NAME", "ShardsSource", "STAGES", "TokenLength", "TrackingConfig", "TrainConfig",
    "ValidationSettings", "apply_override", "load_config", "parse_config", "read_yaml_mapping", "to_yaml",
]  # fmt: skip
