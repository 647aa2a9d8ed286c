"""Model families: one module per base-model architecture, behind the hooks of base.Family.

`family_of(base_model)` reads the folder's (or hub repo's) `model_index.json` and picks the
family from the pipeline class diffusers saved there. A new family is one new module and one
line in FAMILIES.
"""

from __future__ import annotations

import json
import os
from functools import lru_cache

from diffplat.models.families.base import Family, Parts, Prompts, scale_latents
from diffplat.models.families.flux import Flux
from diffplat.models.families.sdxl import SDXL

__all__ = ["FAMILIES", "Family", "FamilyError", "Parts", "Prompts", "family_of", "family_of_pipeline", "scale_latents"]

FAMILIES: dict[str, Family] = {f.name: f for f in (SDXL(), Flux())}


class FamilyError(ValueError):
    """A base model whose family cannot be told, or that diffplat has no module for."""


def _model_index(base_model: str) -> dict:
    if os.path.isdir(base_model):
        path = os.path.join(base_model, "model_index.json")
        if not os.path.isfile(path):
            raise FamilyError(f"{base_model}: no model_index.json; it is not a diffusers pipeline folder")
    else:  # a hub id: the file from the local Hugging Face cache, or fetched once
        from huggingface_hub import hf_hub_download

        try:
            path = hf_hub_download(base_model, "model_index.json")
        except Exception as err:  # offline and not cached, no such repo, no access
            raise FamilyError(f"{base_model}: cannot read its model_index.json ({type(err).__name__}: {err})") from None
    try:
        with open(path) as f:
            index = json.load(f)
    except (OSError, ValueError) as err:
        raise FamilyError(f"{path}: unreadable ({err})") from None
    if not isinstance(index, dict):
        raise FamilyError(f"{path}: not a JSON object")
    return index


def _by_class_name(class_name: str, what: str) -> Family:
    for family in FAMILIES.values():
        if class_name.startswith(family.class_prefix):
            return family
    known = ", ".join(f"{f.class_prefix}*" for f in FAMILIES.values())
    raise FamilyError(f"{what}: a {class_name or 'pipeline of no _class_name'}; diffplat trains and samples {known}")


@lru_cache(maxsize=64)
def family_of(base_model: str) -> Family:
    """The family of a diffusers pipeline folder or hub id, from its model_index.json."""
    return _by_class_name(str(_model_index(base_model).get("_class_name", "")), base_model)


def family_of_pipeline(pipe) -> Family:
    """The family of a loaded diffusers pipeline object."""
    return _by_class_name(type(pipe).__name__, "the pipeline")
