"""What every section shares: the strict frozen model, sizes, the error type, tracking and Ray."""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field


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
    register_as: str | None = Field(None, pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,255}$", description="register the trained "
                                    "adapter in MLflow's model registry under this name, a new version each run "
                                    "(then `models:/<name>/<version>` and `models:/<name>@<alias>` name it anywhere)")
    alias: str | None = Field(None, pattern=r"^[A-Za-z][A-Za-z0-9_-]{0,254}$", description="point this alias of "
                              "register_as at the new version (production, staging, ...)")


class RayConfig(_Strict):
    address: str | None = Field(None, description="a cluster to join; unset: the one RAY_ADDRESS names (as `ray job "
                                "submit` sets it), else a Ray of this process's own (cluster.py)")  # fmt: skip
    num_cpus: int | None = Field(None, description="CPUs of a Ray of this process's own; a cluster's are its own")
    dashboard: bool = False
    verbose: bool = Field(False, description="show the other libraries' logs, warnings and progress bars here too "
                          "(they are always in Ray's session log files)")  # fmt: skip


def _check_layout(value: str) -> str:
    from diffplat.data.composites import CompositeError, Layout

    try:
        return str(Layout.parse(value))
    except CompositeError as err:
        raise ValueError(str(err)) from None
