"""The base of every config section, and the error a bad config raises (see gan_core.config)."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict


class ConfigError(ValueError):
    """A config file or override that does not fit the schema; the message names each bad key."""


class _Section(BaseModel):
    # Unknown keys are errors (a typo must not silently fall back to a default); inf and nan are refused
    # (`optim.g_lr=inf` would train nothing); frozen, so every change goes through validation again.
    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)
