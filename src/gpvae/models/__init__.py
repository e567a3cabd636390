"""Inference methods: one config dataclass + one nn.Module per module, registered here.

Option names: every field of a method's config beyond :class:`ModelConfig`'s starts with
the config's ``option_prefix`` (default: the registry name) and ``_``, and no two methods
share a field, so the CLI can merge all methods' options into one set of flags
(:func:`check_options`: run by :func:`register`, and over the whole registry by
tests/test_interface.py).  ``--models`` lists name a method with an optional size in the
paper's notation, ``NAME[:SIZE]`` (:func:`parse_model_spec`).
"""
from __future__ import annotations

import re
from dataclasses import fields

from ..errors import ConfigError
from .base import LatentVariableModel, ModelConfig
from .cmvae import CMVAE, CMVAEConfig
from .gpvae import GPVAE, GPVAEConfig
from .hf import HF, HFConfig
from .iaf import IAF, IAFConfig
from .me import ME, MEConfig
from .rme import RME, RMEConfig
from .sa import SA, SAConfig
from .vae import VAE, VAEConfig
from .vlae import VLAE, VLAEConfig

MODELS: dict[str, type[LatentVariableModel]] = {
    "vae": VAE, "gpvae": GPVAE, "cmvae": CMVAE, "sa": SA, "hf": HF, "iaf": IAF, "me": ME, "rme": RME, "vlae": VLAE}


def own_options(cls: type[LatentVariableModel]) -> list[str]:
    """The fields of a method's config beyond the generative model's (its own options)."""
    base = {f.name for f in fields(ModelConfig)}
    return [f.name for f in fields(cls.config_class) if f.name not in base]


def check_options(name: str, cls: type[LatentVariableModel], models=None) -> None:
    """Refuse a method whose own options do not start with its prefix, clash with another
    registered method's (``models``, default :data:`MODELS`), or whose ``size_option`` or
    ``renamed_options`` name no integer option of its own (a programming error: ValueError)."""
    cfg = cls.config_class
    prefix = (cfg.option_prefix or name) + "_"
    own = own_options(cls)
    bad = [f for f in own if not f.startswith(prefix)]
    if bad:
        raise ValueError(f"model {name!r}: option(s) {', '.join(bad)} must start with "
                         f"{prefix!r} (its option_prefix or registry name)")
    for other, other_cls in (MODELS if models is None else models).items():
        shared = set(own) & set(own_options(other_cls)) if other != name else set()
        if shared:
            raise ValueError(f"model {name!r} shares option(s) {', '.join(sorted(shared))} "
                             f"with {other!r}")
    types = {f.name: f.type for f in fields(cfg)}
    if cfg.size_option is not None and types.get(cfg.size_option) not in (int, "int"):
        raise ValueError(f"model {name!r}: size_option {cfg.size_option!r} is not an int "
                         "option of its config")
    for old, new in cfg.renamed_options.items():
        if new not in own or old in types:
            raise ValueError(f"model {name!r}: renamed option {old!r} -> {new!r} does not "
                             "map a former name to a current option")


def register(name: str, cls: type[LatentVariableModel]) -> None:
    check_options(name, cls)
    MODELS[name] = cls


def model_class(name: str) -> type[LatentVariableModel]:
    if name not in MODELS:
        raise ConfigError(f"unknown model {name!r}; choose from {', '.join(sorted(MODELS))}")
    return MODELS[name]


def current_options(name: str, options: dict) -> dict:
    """``options`` with former option names of model ``name`` mapped to current ones
    (``renamed_options`` of its config), e.g. the GPVAE's ``kl_expectation`` ->
    ``gp_kl_expectation``; an option given under both names is refused."""
    renamed = model_class(name).config_class.renamed_options
    out = {}
    for key, value in options.items():
        new = renamed.get(key, key)
        if new in out:
            raise ConfigError(f"model {name!r}: option {new!r} given twice (once under its "
                              f"former name {key!r})")
        out[new] = value
    return out


def build_model(name: str, image_shape, **options) -> LatentVariableModel:
    """Build model ``name`` for ``image_shape``; ``options`` are its config's fields
    (former names of renamed options are accepted)."""
    cls = model_class(name)
    cfg_cls = cls.config_class
    options = current_options(name, options)
    valid = {f.name for f in fields(cfg_cls)}
    unknown = set(options) - valid
    if unknown:
        raise ConfigError(
            f"model {name!r} has no option(s) {', '.join(sorted(unknown))}; "
            f"its options are {', '.join(sorted(valid))}"
        )
    return cls(cfg_cls(**options), image_shape)


def parse_model_spec(spec: str) -> tuple[str, dict]:
    """``"NAME"`` or ``"NAME:SIZE"`` (a size in the paper's notation, e.g. ``"sa:2"`` for
    SA(2)) -> (NAME, {its config's ``size_option``: SIZE}).  Unknown names, a size for a
    method without one, a size that is not a non-negative integer and one the method's
    config refuses are one-line :class:`~gpvae.errors.ConfigError` s."""
    name, sep, size = (part.strip() for part in str(spec).partition(":"))
    cls = model_class(name)
    if not sep:
        return name, {}
    option = cls.config_class.size_option
    if option is None:
        raise ConfigError(f"model {name!r} takes no size (got {spec.strip()!r}); write just "
                          f"{name!r}")
    if not re.fullmatch(r"[0-9]+", size):
        raise ConfigError(f"the size in {spec.strip()!r} must be a non-negative integer (it "
                          f"sets --{option.replace('_', '-')})")
    options = {option: int(size)}
    cls.config_class(**options).validate()
    return name, options


def spec_label(name: str, options: dict) -> str:
    """The canonical ``NAME[:SIZE]`` of a parsed spec (``"sa:2"``, ``"vae"``)."""
    option = model_class(name).config_class.size_option
    return f"{name}:{options[option]}" if option is not None and option in options else name


def parse_model_list(specs, flag: str = "--models") -> dict[str, tuple[str, dict]]:
    """A comma-separated ``--models`` list (or a list of specs) -> {label: (name, options)}
    in the given order, labels canonical (:func:`spec_label`); an empty list or a repeated
    entry is refused."""
    out: dict[str, tuple[str, dict]] = {}
    for spec in (specs.split(",") if isinstance(specs, str) else specs):
        if not spec.strip():
            continue
        name, options = parse_model_spec(spec)
        label = spec_label(name, options)
        if label in out:
            raise ConfigError(f"{flag} names {label!r} twice")
        out[label] = (name, options)
    if not out:
        raise ConfigError(f"{flag} needs at least one model")
    return out


def run_dir_name(label: str) -> str:
    """A spec label as a directory name: ``"sa:2"`` -> ``"sa-2"`` (``"vae"`` unchanged)."""
    return label.replace(":", "-")


__all__ = ["MODELS", "CMVAE", "CMVAEConfig", "GPVAE", "GPVAEConfig", "HF", "HFConfig", "IAF", "IAFConfig", "LatentVariableModel", "ME",
           "MEConfig", "ModelConfig", "RME", "RMEConfig", "SA", "SAConfig", "VAE", "VAEConfig", "VLAE", "VLAEConfig", "build_model", "check_options", "current_options", "model_class",
           "own_options", "parse_model_list", "parse_model_spec", "register", "run_dir_name",
           "spec_label"]
