"""Service settings, from the environment (prefix RLGEN_) and read through a cached function."""

from __future__ import annotations

from functools import cache

from pydantic import Field, SecretStr
from pydantic_settings import BaseSettings, SettingsConfigDict

DEFAULT_TRACKING_URI = "sqlite:///mlflow.db"


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="RLGEN_", extra="ignore")

    allowed_env_modules: list[str] = Field(
        default_factory=list,
        description="Modules that `module:EnvName-v0` env ids may import (JSON list, e.g. "
        "'[\"my_envs\"]'). Empty: such ids are refused, since they make gymnasium import code.",
    )
    workdir: str = Field(".rlgen", description="Scratch space for trial files before upload.")
    api_token: SecretStr | None = Field(
        None, description="Bearer token `rlgen serve` requires on every route but /healthz."
    )


@cache
def get_settings() -> Settings:
    return Settings()
