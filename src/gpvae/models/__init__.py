"""Inference methods: one config dataclass + one nn.Module per module, registered here."""
from __future__ import annotations

from dataclasses import fields

from ..errors import ConfigError
from .base import LatentVariableModel, ModelConfig
from .gpvae import GPVAE, GPVAEConfig
from .vae import VAE, VAEConfig

MODELS: dict[str, type[LatentVariableModel]] = {"vae": VAE, "gpvae": GPVAE}


def register(name: str, cls: type[LatentVariableModel]) -> None:
    MODELS[name] = cls


def model_class(name: str) -> type[LatentVariableModel]:
    if name not in MODELS:
        raise ConfigError(f"unknown model {name!r}; choose from {', '.join(sorted(MODELS))}")
    return MODELS[name]


def build_model(name: str, image_shape, **options) -> LatentVariableModel:
    """Build model ``name`` for ``image_shape``; ``options`` are its config's fields."""
    cls = model_class(name)
    cfg_cls = cls.config_class
    valid = {f.name for f in fields(cfg_cls)}
    unknown = set(options) - valid
    if unknown:
        raise ConfigError(
            f"model {name!r} has no option(s) {', '.join(sorted(unknown))}; "
            f"its options are {', '.join(sorted(valid))}"
        )
    return cls(cfg_cls(**options), image_shape)


__all__ = ["MODELS", "GPVAE", "GPVAEConfig", "LatentVariableModel", "ModelConfig", "VAE",
           "VAEConfig", "build_model",
           "model_class", "register"]
