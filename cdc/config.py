"""One validated settings object for `cdc run`: flags > environment (CDC_*) > TOML file.

Every field is also an environment variable (CDC_ + the name in upper case, e.g. CDC_SINK)
and a key of the file given with --config (top level or under [cdc]: one namespace; a key that is
not a setting is refused with the nearest one named). Booleans in the environment are strict:
true/false, 1/0, yes/no, on/off; anything else is refused, never read as false.
"""

from __future__ import annotations

import difflib
import os
import tomllib
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from .checkpoint import default_slot
from .errors import ConfigError
from .events import Lsn


class Settings(BaseModel):
    model_config = ConfigDict(extra="forbid")

    dsn: str | None = None
    mode: Literal["auto", "stream", "poll"] = "auto"
    plugin: Literal["wal2json", "pgoutput"] = "wal2json"
    publication: str | None = Field(None, min_length=1, max_length=63)
    failover_slot: bool = False
    # Empty: the consumer's own (checkpoint.default_slot), filled in once the consumer is known.
    slot: str = Field("", max_length=63, pattern=r"^[a-z0-9_]*$")
    consumer: str = Field("default", min_length=1)
    sink: str = "stdout"
    endpos: str | None = None
    chunk_events: int = Field(10_000, ge=1)
    status_interval: float = Field(10.0, gt=0)
    checkpoint_interval: float = Field(1.0, gt=0)
    poll_interval: float = Field(0.1, gt=0)
    stale_threshold: float = Field(3.0, gt=0)
    startup_wait: float = Field(120.0, ge=0)
    http_host: str = "127.0.0.1"
    http_port: int | None = Field(None, ge=0, le=65535)
    ready_max_lag_seconds: float | None = Field(None, gt=0)
    ready_max_lag_bytes: int | None = Field(None, gt=0)
    reconcile: bool = False
    record_deliveries: bool = False
    delivery_retention_hours: float = Field(168.0, gt=0)
    heartbeat_interval: float = Field(10.0, ge=0)
    max_attempts: int = Field(5, ge=1)
    on_poison: Literal["stop", "dead-letter"] = "stop"
    webhook_secret: str | None = None
    # --sink nats://...: the JetStream stream, the subject template, credentials (see jetstream.py).
    nats_stream: str = Field("CDC", min_length=1, pattern=r"^[^.*> \t]+$")
    nats_subject: str = "cdc.events.{stream_id}"
    nats_token: str | None = None
    nats_creds: str | None = None
    nats_tls_ca: str | None = None
    nats_replicas: int = Field(1, ge=1, le=5)
    nats_partitions: int = Field(1, ge=1, le=4096)
    standby: bool = False
    workers: int = Field(1, ge=1, le=256)
    log_format: Literal["text", "json"] = "text"
    log_level: Literal["debug", "info", "warning", "error"] = "info"
    preset: Literal["cdc", "marten", "eventsourcing"] | None = None
    # The events table and its columns, over the preset's (see presets.py). A column set to
    # "none" does not exist: that field is left null.
    table: str | None = None
    seq_column: str | None = None
    stream_column: str | None = None
    version_column: str | None = None
    type_column: str | None = None
    data_column: str | None = None
    metadata_column: str | None = None
    time_column: str | None = None
    xid_column: str | None = None
    numbers: Literal["float", "decimal"] = "float"
    data_encoding: Literal["jsonb", "bytea", "text"] | None = None
    metadata_encoding: Literal["jsonb", "bytea", "text"] | None = None

    @model_validator(mode="after")
    def _own_slot(self) -> Settings:
        if not self.slot:
            self.slot = default_slot(self.consumer)
        return self

    @field_validator("endpos")
    @classmethod
    def _lsn(cls, v: str | None) -> str | None:
        if v is not None and v != "now":
            Lsn.parse(v)
        return v

    @field_validator("sink")
    @classmethod
    def _sink(cls, v: str) -> str:
        kind, _, arg = v.partition(":")
        if kind in ("stdout", "null") and not arg or kind in ("jsonl", "webhook", "python") and arg:
            return v
        if kind in ("nats", "tls") and arg.startswith("//") and len(arg) > 2:
            return v
        raise ValueError("use stdout, null, jsonl:PATH, webhook:URL, python:MODULE:FUNCTION or nats://HOST:PORT")


ENV_PREFIX = "CDC_"


_TRUE, _FALSE = ("1", "true", "yes", "on"), ("0", "false", "no", "off")


def _coerce_env(name: str, value: str) -> Any:
    field = Settings.model_fields[name]
    if field.annotation is bool:
        word = value.strip().lower()
        if word in _TRUE:
            return True
        if word in _FALSE:
            return False
        raise ConfigError(f"{ENV_PREFIX}{name.upper()}={value!r} is not a boolean: use true or false (or 1/0, yes/no, on/off)")
    return value


def _nearest(name: str) -> str:
    close = difflib.get_close_matches(name, list(Settings.model_fields), n=1, cutoff=0.6)
    return f" (did you mean {close[0]}?)" if close else " (see `cdc run --help`: keys are the long flags, with _ for -)"


def _read_file(path: str) -> dict[str, Any]:
    """The TOML file's settings: top-level keys and a `[cdc]` table are one namespace (a key in
    both is refused, as is any key that is not a setting, with the nearest one named)."""
    try:
        with open(path, "rb") as f:
            data = tomllib.load(f)
    except OSError as err:
        raise ConfigError(f"cannot read config file {path!r}: {err.strerror}") from None
    except tomllib.TOMLDecodeError as err:
        raise ConfigError(f"config file {path!r} is not valid TOML: {err}") from None
    section = data.pop("cdc", {})
    if not isinstance(section, dict):
        raise ConfigError(f"config file {path!r}: cdc must be a table ([cdc]), not a {type(section).__name__}")
    out: dict[str, Any] = {}
    for where, items in (("top level", data), ("[cdc]", section)):
        for key, value in items.items():
            name = key.replace("-", "_")
            if isinstance(value, dict):
                raise ConfigError(f"config file {path!r}: [{key}] is not a settings table; put settings at the top "
                                  "level or under [cdc]")
            if name not in Settings.model_fields:
                raise ConfigError(f"config file {path!r}: unknown setting {key!r} at {where}{_nearest(name)}")
            if name in out:
                raise ConfigError(f"config file {path!r}: {key!r} is set both at the top level and under [cdc]")
            out[name] = value
    return out


def load(flags: dict[str, Any], config_file: str | None = None) -> Settings:
    """Merge the three sources and validate; ConfigError names the bad setting."""
    merged: dict[str, Any] = {}
    source: dict[str, str] = {}
    if config_file:
        for name, value in _read_file(config_file).items():
            merged[name], source[name] = value, f"in {config_file}"
    for name in Settings.model_fields:
        value = os.environ.get(ENV_PREFIX + name.upper())
        if value is not None and value != "":
            merged[name], source[name] = _coerce_env(name, value), f"from {ENV_PREFIX}{name.upper()}"
    for name, value in flags.items():
        if value is not None:
            merged[name], source[name] = value, f"from --{name.replace('_', '-')}"
    try:
        return Settings(**merged)
    except ValidationError as err:
        first = err.errors()[0]
        where = ".".join(str(p) for p in first["loc"]) or "settings"
        if first["type"] == "extra_forbidden":
            raise ConfigError(f"unknown setting {where}{_nearest(where)}") from None
        value = first.get("input")
        shown = "***" if "secret" in where or where == "dsn" else repr(value)
        message = str(first["msg"]).removeprefix("Value error, ").removeprefix("Assertion failed, ")
        origin = f" ({source[where]})" if where in source else ""
        raise ConfigError(f"invalid setting {where}={shown}{origin}: {message}") from None
