"""Where things live: the embedded one-machine profile and its cluster overrides.

Every setting is an environment variable so the same code runs on a laptop and a
cluster (docs/design.md, "Embedded defaults and the cluster"); nothing else needs to change.
:class:`Settings` (pydantic-settings) reads and validates them; the functions below
(``home()``, ``storage_root()``, ``tracking_uri()``, …) read the environment again at each
call, so a changed variable (a test's ``monkeypatch.setenv``) takes effect at once. A bad
value raises :class:`SettingsError` with one line naming the variable and the accepted forms.

| variable                  | embedded default                         | cluster example                  |
|---------------------------|------------------------------------------|----------------------------------|
| CONDGEN_HOME              | ./.condgen                               | —                                |
| CONDGEN_STORAGE           | file://$CONDGEN_HOME/store               | s3://bucket/condgen              |
| MLFLOW_TRACKING_URI       | sqlite:///$CONDGEN_HOME/mlflow.db        | http://mlflow:5000               |
| CONDGEN_ARTIFACTS         | $CONDGEN_HOME/mlartifacts                | (server-side, e.g. s3://…)       |
| CONDGEN_RAY_STORAGE       | $CONDGEN_HOME/ray_results                | s3://bucket/condgen/ray_results  |
| RAY_ADDRESS               | (unset: local Ray)                       | ray://head:10001 or auto         |
| CONDGEN_RAY_DASHBOARD     | off                                      | 1                                |
| PREFECT_API_URL           | (unset: ephemeral Prefect)               | http://prefect:4200/api          |
| CONDGEN_S3_ENDPOINT_URL   | (unset: AWS)                             | http://minio:9000                |
| CONDGEN_S3_RETRY_SECONDS  | 15 (how long an S3 call retries a lost connection) | 120                    |
| CONDGEN_INGEST_MAX_SAMPLE_MEMBERS | 16 (members of one tar sample)   | 32                               |
| CONDGEN_INGEST_MAX_SAMPLE_BYTES   | 33554432 (32 MiB, one tar sample) | 134217728                       |
| CONDGEN_API_KEY           | (unset: no key)                          | from a Secret                    |
| CONDGEN_WATERMARK_KEY     | (unset: unsigned provenance records)     | from a Secret                    |
| CONDGEN_PROVENANCE_KEY    | (the old name of CONDGEN_WATERMARK_KEY)  | —                                |
| CONDGEN_DENYLIST          | (the built-in list)                      | /etc/condgen/denylist.txt        |
| CONDGEN_WORKDIR           | (the checkout)                           | /opt/condgen                     |
| CONDGEN_DEBUG             | off                                      | —                                |
"""
from __future__ import annotations

import os
import re
from pathlib import Path

from pydantic import Field, SecretStr, ValidationError, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

_SCHEME = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]*)://")
_RAY_ADDRESS = re.compile(r"^(auto|local|(ray|http|https|anyscale)://\S+|([\w.-]+|\[[0-9A-Fa-f:]+\]):\d{1,5})$")
_TRACKING_SCHEMES = re.compile(r"^(https?|file|sqlite|postgresql|mysql|mssql|databricks(-uc)?)(\+\w+)?$")


S3_RETRY_SECONDS = 15.0  # survives the ~10 s restart of an S3 endpoint (tests/test_faults.py)
MAX_S3_RETRY_SECONDS = 86_400.0
MAX_SAMPLE_MEMBERS = 16  # one WebDataset sample: image, cls, json, txt and a few side-cars
MAX_SAMPLE_BYTES = 32 * 1024 * 1024  # two 16 MiB members (the per-file cap of ingestion)


class SettingsError(ValueError):
    """A setting's environment variable holds a value condgen cannot use (one line: the variable, the fix)."""


def _storage_uri(value: str | None, accepted: str = "file://…, s3://bucket/prefix or a path") -> str | None:
    if value is None:
        return None
    m = _SCHEME.match(value)
    if m and m.group(1) not in ("file", "s3"):
        raise ValueError(f"must be {accepted}, got {value!r}")
    if value.startswith("s3://") and not value[5:].split("/", 1)[0]:
        raise ValueError(f"an s3:// URI needs a bucket (s3://bucket/prefix), got {value!r}")
    return value


def _http_url(value: str | None) -> str | None:
    if value is not None and not re.match(r"^https?://[^/\s]+", value):
        raise ValueError(f"must be an http:// or https:// URL, got {value!r}")
    return value


class Settings(BaseSettings):
    """condgen's environment, validated. Unset (or empty) variables take the embedded defaults."""

    model_config = SettingsConfigDict(case_sensitive=True, env_ignore_empty=True, extra="ignore")

    home: Path = Field(Path(".condgen"), validation_alias="CONDGEN_HOME")
    storage: str | None = Field(None, validation_alias="CONDGEN_STORAGE")
    ray_storage: str | None = Field(None, validation_alias="CONDGEN_RAY_STORAGE")
    artifacts: str | None = Field(None, validation_alias="CONDGEN_ARTIFACTS")
    tracking_uri: str | None = Field(None, validation_alias="MLFLOW_TRACKING_URI")
    ray_address: str | None = Field(None, validation_alias="RAY_ADDRESS")
    ray_dashboard: bool = Field(False, validation_alias="CONDGEN_RAY_DASHBOARD")
    prefect_api_url: str | None = Field(None, validation_alias="PREFECT_API_URL")
    s3_endpoint_url: str | None = Field(None, validation_alias="CONDGEN_S3_ENDPOINT_URL")
    s3_retry_seconds: float = Field(S3_RETRY_SECONDS, validation_alias="CONDGEN_S3_RETRY_SECONDS")
    ingest_max_sample_members: int = Field(MAX_SAMPLE_MEMBERS, validation_alias="CONDGEN_INGEST_MAX_SAMPLE_MEMBERS")
    ingest_max_sample_bytes: int = Field(MAX_SAMPLE_BYTES, validation_alias="CONDGEN_INGEST_MAX_SAMPLE_BYTES")
    api_key: SecretStr | None = Field(None, validation_alias="CONDGEN_API_KEY")
    watermark_key: SecretStr | None = Field(None, validation_alias="CONDGEN_WATERMARK_KEY")
    provenance_key: SecretStr | None = Field(None, validation_alias="CONDGEN_PROVENANCE_KEY")  # its old name
    denylist: Path | None = Field(None, validation_alias="CONDGEN_DENYLIST")
    workdir: Path | None = Field(None, validation_alias="CONDGEN_WORKDIR")
    debug: bool = Field(False, validation_alias="CONDGEN_DEBUG")

    @field_validator("storage", "ray_storage")
    @classmethod
    def _storage(cls, value: str | None) -> str | None:
        return _storage_uri(value)

    @field_validator("artifacts")
    @classmethod
    def _artifacts(cls, value: str | None) -> str | None:
        if value is not None and not (_SCHEME.match(value) or "://" not in value):
            raise ValueError(f"must be a URI (file://…, s3://…) or a path, got {value!r}")
        return value

    @field_validator("tracking_uri")
    @classmethod
    def _tracking(cls, value: str | None) -> str | None:
        m = _SCHEME.match(value or "")
        if m and not _TRACKING_SCHEMES.match(m.group(1)):
            raise ValueError(f"must be sqlite:///path, http(s)://host, postgresql://…, mysql://…, file://… or a "
                             f"path, got a {m.group(1)}:// URI")
        return value

    @field_validator("ray_address")
    @classmethod
    def _ray(cls, value: str | None) -> str | None:
        if value is not None and not _RAY_ADDRESS.match(value):
            raise ValueError(f"must be auto, local, ray://host:port or host:port, got {value!r}")
        return value

    @field_validator("prefect_api_url", "s3_endpoint_url")
    @classmethod
    def _url(cls, value: str | None) -> str | None:
        return _http_url(value)

    @field_validator("s3_retry_seconds", mode="before")
    @classmethod
    def _retry_seconds(cls, value: object) -> float:
        try:
            seconds = float(value)  # type: ignore[arg-type]
        except (TypeError, ValueError):
            seconds = float("nan")
        if not 0 <= seconds <= MAX_S3_RETRY_SECONDS:  # also refuses nan
            raise ValueError(f"must be a number of seconds from 0 to {MAX_S3_RETRY_SECONDS:.0f}, got {value!r}")
        return seconds

    @field_validator("ingest_max_sample_members", "ingest_max_sample_bytes", mode="before")
    @classmethod
    def _positive_int(cls, value: object) -> int:
        text = str(value).strip()
        if not re.fullmatch(r"[1-9][0-9]{0,11}", text):
            raise ValueError(f"must be a whole number >= 1, got {value!r}")
        return int(text)

    @field_validator("denylist")
    @classmethod
    def _file(cls, value: Path | None) -> Path | None:
        if value is not None and not value.is_file():
            raise ValueError(f"must be an existing file (one denied word a line), got '{value}'")
        return value


_FIELDS_BY_ENV = {f.validation_alias: name for name, f in Settings.model_fields.items()}
_cache: dict[tuple[str | None, ...], Settings] = {}


def load() -> Settings:
    """The settings the environment holds now (validated; cached per set of values)."""
    key = tuple(os.environ.get(env) for env in _FIELDS_BY_ENV)
    if key not in _cache:
        if len(_cache) > 64:
            _cache.clear()
        try:
            _cache[key] = Settings()
        except ValidationError as exc:
            raise SettingsError(_one_line(exc)) from None
    return _cache[key]


def _one_line(exc: ValidationError) -> str:
    err = exc.errors()[0]
    env = str(err["loc"][0]) if err["loc"] else "settings"
    msg = str(err["msg"]).removeprefix("Value error, ")
    if "got " not in msg and "KEY" not in env:  # never echo a secret
        msg += f", got {err.get('input')!r}"
    return f"{env}: {msg}"


def home() -> Path:
    return load().home.resolve()


def storage_root() -> str:
    return load().storage or (home() / "store").as_uri()


def tracking_uri() -> str:
    return load().tracking_uri or f"sqlite:///{home() / 'mlflow.db'}"


def artifact_root() -> str:
    return load().artifacts or (home() / "mlartifacts").as_uri()


def ray_storage() -> str:
    """Ray Train's run storage (checkpoints, run state). Every node must reach it: on a
    multi-node cluster an ``s3://`` prefix or a shared mount, never a node-local disk."""
    return load().ray_storage or str(home() / "ray_results")


def ray_address() -> str:
    """``RAY_ADDRESS`` when set (a cluster), else ``"local"``: a fresh local instance, never a
    stray cluster some other process left running on this machine."""
    return load().ray_address or "local"


def ray_dashboard() -> bool:
    """Ray's dashboard is opt-in (``CONDGEN_RAY_DASHBOARD=1``)."""
    return load().ray_dashboard


def s3_endpoint_url() -> str | None:
    """An S3-compatible endpoint (MinIO, Ceph, moto); None is AWS."""
    return load().s3_endpoint_url


def s3_retry_seconds() -> float:
    """How long one S3 operation retries a refused or dropped connection before it gives up
    with ``tasks.io.s3.StorageUnavailable`` (``CONDGEN_S3_RETRY_SECONDS``, default 15 s)."""
    return load().s3_retry_seconds


def ingest_sample_limits() -> tuple[int, int]:
    """(members, bytes) one WebDataset sample may have at ingestion (the two
    ``CONDGEN_INGEST_MAX_SAMPLE_*`` settings)."""
    s = load()
    return s.ingest_max_sample_members, s.ingest_max_sample_bytes
