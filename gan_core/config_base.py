"""The base of every config section, the error a bad config raises, and how a pydantic error becomes one
(see gan_core.config)."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, ValidationError


class ConfigError(ValueError):
    """A config file or override that does not fit the schema; the message names each bad key."""


class _Section(BaseModel):
    # Unknown keys are errors (a typo must not silently fall back to a default); inf and nan are refused
    # (`optim.g_lr=inf` would train nothing); frozen, so every change goes through validation again.
    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)


def validation_error(err: ValidationError, source: str, keys: set[str] | None = None) -> ConfigError:
    """One ConfigError listing every problem of a pydantic error by dotted key (the config's and sweep files').

    Args:
        err: pydantic's error.
        source: what was validated, for the first line.
        keys: every dotted key of the schema, to list the valid ones next to an unknown key.
    """
    return ConfigError(f"{source} is invalid:\n" + "\n".join(_describe(e, keys or set()) for e in err.errors()))


def _describe(error: dict[str, Any], keys: set[str]) -> str:
    # Union members add their tag to the location (`scheduler.asha.grace_period`), dict keys a `[key]` marker.
    loc = [str(part) for part in error["loc"] if part != "[key]"]
    path = ".".join(loc) or "<top level>"
    if error["type"] == "extra_forbidden":
        parent = ".".join(loc[:-1])
        valid = sorted({k[len(parent) + 1 :].split(".")[0] for k in keys if k.startswith(f"{parent}.")} if parent
                       else {k.split(".")[0] for k in keys})
        return f"  {path}: unknown key" + (f" (valid here: {', '.join(valid)})" if valid else "")
    got = error.get("input")
    shown = "" if isinstance(got, (dict, list)) or error["type"].startswith("value_error") else f" (got {got!r})"
    return f"  {path}: {error['msg'].removeprefix('Value error, ')}{shown}"
