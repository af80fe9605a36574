"""The node's configuration: one validated schema, loaded from YAML.

Every default lives in ``config/node.yaml`` (with a comment per key); the schema below holds the
same values so that a config file may leave any key out. A test keeps the two equal.

Paths (``storage.root``, ``model.path``, ``rules``, a relative SQLite file in ``database.url``, TLS files):
a relative path WRITTEN in a config file is resolved against the directory of that file, so the node
behaves the same whatever the working directory. The files the project ships (``model.path``, the bundled
model; ``rules``, the shipped series rules) keep resolving to the shipped files when a site's file leaves
them out, wherever that file lives: their defaults are written in ``config/node.yaml`` and resolve there.
Data folders left out (``storage.root``, ``database.url``) resolve against the site's file, as if its
defaults (``../var/...``) were written in it: each config keeps its own data.
"""

from __future__ import annotations

import errno
import ipaddress
import re
import socket
from pathlib import Path
from typing import Annotated, Literal

import yaml
from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    SecretStr,
    field_validator,
    model_validator,
)

from dicom_node.paths import CONFIG_DIR, DEFAULT_CONFIG
from dicom_node.yaml_files import YamlFileError, load_yaml_model

AE_TITLE_PATTERN = r"^[\x20-\x5b\x5d-\x7e]{1,16}$"  # printable ASCII without backslash, 1-16 chars

Port = Annotated[int, Field(ge=1, le=65535)]


class ConfigError(YamlFileError):
    """A configuration problem, phrased as one line: ``FILE: KEY: what was expected``."""


class _Section(BaseModel):
    # Unknown keys are errors: a misspelt key silently falling back to a default is how a
    # node ends up answering on the wrong AE title.
    model_config = ConfigDict(extra="forbid", frozen=True)


def check_ae_title(value: str) -> str:
    """``value`` without its padding spaces; ``ValueError`` unless it is an AE title (1-16 printable ASCII
    characters, no backslash). The one check of every AE title the node reads (config, command line)."""
    if not re.fullmatch(AE_TITLE_PATTERN, value) or not value.strip():
        raise ValueError("expected an AE title of 1-16 printable ASCII characters, no backslash")
    return value.strip()


AETitle = Annotated[str, AfterValidator(check_ae_title)]


class AllowedCaller(_Section):
    """One peer allowed to open associations: its calling AE title, and optionally its IP address."""

    ae_title: AETitle
    host: str | None = None

    @field_validator("host")
    @classmethod
    def _ip(cls, value: str | None) -> str | None:
        if value is not None:
            _check_ip(value)
        return value


class TlsSection(_Section):
    """DICOM TLS for the listener (and for sending, when a destination sets ``tls: true``)."""

    enabled: bool = False
    certificate: Path | None = None
    private_key: Path | None = None
    ca_certificates: Path | None = None
    require_client_certificate: bool = False

    @model_validator(mode="after")
    def _complete(self) -> TlsSection:
        if self.enabled and (self.certificate is None or self.private_key is None):
            raise ValueError("tls.enabled needs tls.certificate and tls.private_key")
        if self.require_client_certificate and self.ca_certificates is None:
            raise ValueError("tls.require_client_certificate needs tls.ca_certificates")
        return self


def _check_ip(value: str) -> str:
    try:
        ipaddress.ip_address(value)
    except ValueError:
        raise ValueError("expected an IPv4 or IPv6 address such as 0.0.0.0 or 127.0.0.1") from None
    return value


class NodeSection(_Section):
    ae_title: AETitle = "ILD_NODE"
    port: Port = 11112
    bind_address: str = "0.0.0.0"
    allowed_callers: list[AllowedCaller] = []
    tls: TlsSection = TlsSection()
    acse_timeout_seconds: float = Field(default=30.0, gt=0)
    dimse_timeout_seconds: float = Field(default=60.0, gt=0)
    network_timeout_seconds: float = Field(default=120.0, gt=0)
    max_associations: int = Field(default=16, ge=1)

    @field_validator("bind_address")
    @classmethod
    def _ip(cls, value: str) -> str:
        return _check_ip(value)


class StorageSection(_Section):
    root: Path = Path("../var/storage")
    min_free_gb: float = Field(default=2.0, ge=0)


class DatabaseSection(_Section):
    url: str = "sqlite:///../var/node.db"
    busy_timeout_seconds: float = Field(default=30.0, gt=0)

    @field_validator("url")
    @classmethod
    def _scheme(cls, value: str) -> str:
        if not re.match(r"^(sqlite|postgresql)(\+\w+)?://", value):
            raise ValueError("expected a SQLAlchemy URL starting with sqlite:/// or postgresql://")
        return value


class CompletionSection(_Section):
    series_quiet_seconds: float = Field(default=30.0, gt=0)
    study_quiet_seconds: float = Field(default=60.0, gt=0)
    max_wait_seconds: float = Field(default=1800.0, gt=0)
    start_when_roles_complete: bool = True
    late_instances: Literal["reprocess", "ignore"] = "reprocess"


class QueueSection(_Section):
    max_attempts: int = Field(default=3, ge=1)
    lease_seconds: float = Field(default=300.0, gt=0)
    poll_seconds: float = Field(default=1.0, gt=0)
    shutdown_grace_seconds: float = Field(default=30.0, ge=0)
    workers: int = Field(default=1, ge=0, le=64)
    worker_threads: int | None = Field(default=None, ge=1)
    worker_nice: int = Field(default=10, ge=0, le=19)


class SendSection(_Section):
    retry_initial_seconds: float = Field(default=10.0, gt=0)
    retry_max_seconds: float = Field(default=600.0, gt=0)
    max_attempts: int = Field(default=50, ge=1)
    timeout_seconds: float = Field(default=30.0, gt=0)


class Destination(_Section):
    name: str = Field(min_length=1)
    ae_title: AETitle
    host: str = Field(min_length=1)
    port: Port
    tls: bool = False


class ModelSection(_Section):
    path: Path = Path("../models/ild-demo.safetensors")
    device: str = "auto"
    #: stored = the checkpoint's threshold (its threshold_rule); youden = its validation Youden point (the method's)
    threshold: Literal["stored", "youden"] = "stored"

    @field_validator("device")
    @classmethod
    def _device(cls, value: str) -> str:
        if not re.fullmatch(r"auto|cpu|cuda(:\d+)?", value):
            raise ValueError("expected one of auto, cpu, cuda, cuda:N")
        return value


class OutputsSection(_Section):
    #: Also a Secondary Capture series (outlines burned into key images, a summary) for viewers without SEG support
    secondary_capture: bool = False


class WebSection(_Section):
    enabled: bool = True
    host: str = "127.0.0.1"
    port: Port = 8080
    # None: the dashboard and API are open (keep host on loopback then); else a shared secret they require.
    token: SecretStr | None = None  # SecretStr: `config show` and reprs print ****

    @field_validator("token")
    @classmethod
    def _token(cls, value: SecretStr | None) -> SecretStr | None:
        if value is not None and len(value.get_secret_value().strip()) < 16:
            raise ValueError("expected a secret of at least 16 characters, e.g. from `openssl rand -hex 16`")
        return value


class LoggingSection(_Section):
    level: str = "INFO"

    @field_validator("level")
    @classmethod
    def _level(cls, value: str) -> str:
        if value.upper() not in {"DEBUG", "INFO", "WARNING", "ERROR"}:
            raise ValueError("expected one of DEBUG, INFO, WARNING, ERROR")
        return value.upper()


class NodeConfig(_Section):
    """The whole node configuration (see ``config/node.yaml`` for what each key means)."""

    node: NodeSection = NodeSection()
    storage: StorageSection = StorageSection()
    database: DatabaseSection = DatabaseSection()
    completion: CompletionSection = CompletionSection()
    queue: QueueSection = QueueSection()
    destinations: list[Destination] = []
    send: SendSection = SendSection()
    model: ModelSection = ModelSection()
    outputs: OutputsSection = OutputsSection()
    web: WebSection = WebSection()
    rules: Path = Path("series_rules.yaml")
    logging: LoggingSection = LoggingSection()

    @model_validator(mode="after")
    def _distinct(self) -> NodeConfig:
        names = [d.name for d in self.destinations]
        if len(names) != len(set(names)):
            raise ValueError("expected unique destination names")
        if self.web.enabled and self.node.port == self.web.port:
            raise ValueError("expected node.port and web.port to differ")
        return self

    def resolved(self, base: Path, shipped: Path = CONFIG_DIR) -> NodeConfig:
        """Return a copy whose relative paths are absolute: against ``base`` (the config file's directory) where
        the file wrote them; the shipped model and rules left out of the file against ``shipped`` (the folder of
        ``config/node.yaml``, where their defaults are written)."""

        def absolute(p: Path, written: bool = True) -> Path:
            return p if p.is_absolute() else ((base if written else shipped) / p).resolve()

        model_written = "model" in self.model_fields_set and "path" in self.model.model_fields_set

        url = self.database.url
        prefix = "sqlite:///"
        if url.startswith(prefix) and url != prefix + ":memory:" and not url[len(prefix):].startswith("/"):
            url = prefix + str(absolute(Path(url[len(prefix):])))
        return self.model_copy(
            update={
                "storage": self.storage.model_copy(update={"root": absolute(self.storage.root)}),
                "node": self.node.model_copy(update={"tls": self.node.tls.model_copy(update={
                    k: absolute(v) for k in ("certificate", "private_key", "ca_certificates")
                    if (v := getattr(self.node.tls, k)) is not None})}),
                "database": self.database.model_copy(update={"url": url}),
                "model": self.model.model_copy(update={"path": absolute(self.model.path, model_written)}),
                "rules": absolute(self.rules, "rules" in self.model_fields_set),
            }
        )


def load_config(path: Path | str = DEFAULT_CONFIG) -> NodeConfig:
    """Read, validate and resolve a YAML config file.

    Raises ``ConfigError`` with a single line naming the file, the key and what was expected.
    """
    path = Path(path)
    config = load_yaml_model(path, NodeConfig, what="config file", reference="config/node.yaml", error=ConfigError)
    return config.resolved(path.resolve().parent)


def check_files(config: NodeConfig, config_path: Path | str) -> None:
    """Fail with ``ConfigError`` if the files the node reads at start-up are missing or unusable: the model
    checkpoint (loaded on the CPU, as the worker would) and the series rules. ``serve`` and ``config check`` both
    run this, so a config that checks OK starts."""
    from dicom_node.rules import RulesError, load_rules
    from pipeline.checkpoint import CheckpointError, load_checkpoint, select_threshold

    if not config.model.path.is_file():
        raise ConfigError(f"{config_path}: model.path: {config.model.path} does not exist (the bundled model is "
                          "rebuilt by `make model`)")
    try:
        _, meta = load_checkpoint(config.model.path)
    except CheckpointError as exc:
        raise ConfigError(f"{config_path}: model.path: {exc}") from None
    try:
        select_threshold(meta, config.model.threshold)
    except ValueError as exc:
        raise ConfigError(f"{config_path}: model.{exc}") from None
    try:
        load_rules(config.rules)
    except RulesError as exc:
        raise ConfigError(f"{config_path}: rules: {exc}") from None


def port_problem(host: str, port: int) -> str | None:
    """Why a listener could not bind ``host:port`` ("already in use", ...), or None when it could."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as sock:
        # Like the real listener: a port in TIME_WAIT is free, one with a listener is not.
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError as exc:
            return "already in use" if exc.errno == errno.EADDRINUSE else (exc.strerror or str(exc))
    return None


def check_ports_free(config: NodeConfig, config_path: Path | str) -> None:
    """Fail with ``ConfigError`` if the DICOM or web port cannot be bound (checked at start-up)."""
    checks = [("node.port", config.node.bind_address, config.node.port)]
    if config.web.enabled:
        checks.append(("web.port", config.web.host, config.web.port))
    for key, host, port in checks:
        reason = port_problem(host, port)
        if reason is not None:
            raise ConfigError(f"{config_path}: {key}: expected a free TCP port, but {host}:{port} is {reason}")


def to_yaml(config: NodeConfig) -> str:
    """The resolved configuration as YAML (what `dicom-node config show` prints)."""
    return yaml.safe_dump(config.model_dump(mode="json"), sort_keys=False)
