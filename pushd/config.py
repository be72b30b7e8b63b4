"""Strict, typed configuration.

The file is TOML. Every section is a pydantic model with ``extra="forbid"`` and strict
types, so an unknown or misspelled key, a wrong type or an out-of-range value is an
error that names the key and the file.  Relative paths are resolved against the
directory of the config file, so the bundled ``config.toml`` runs as is from a clone.

Which settings a reload applies, and which need a restart, is listed in
``RESTART_REQUIRED`` (and in the README).
"""

from __future__ import annotations

import difflib
import os
import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

__all__ = [
    "RESTART_REQUIRED",
    "Config",
    "ConfigError",
    "ConfigProblem",
    "load_config",
    "parse_config",
]

Seconds = Annotated[float, Field(gt=0)]
PositiveInt = Annotated[int, Field(ge=1)]


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)


class DaemonSection(_Section):
    state_dir: str = "var/lib"
    """Directory for the database and generated keys (systemd: $STATE_DIRECTORY)."""
    shutdown_timeout: Seconds = 10.0
    log_level: Literal["debug", "info", "warning", "error"] = "info"
    log_format: Literal["auto", "json", "console"] = "auto"


class ControlSection(_Section):
    socket: str = "var/run/control.sock"
    mode: Annotated[int, Field(ge=0, le=0o777)] = 0o660
    group: str = ""
    allowed_uids: list[int] = Field(default_factory=list)
    allowed_gids: list[int] = Field(default_factory=list)
    max_frame: Annotated[int, Field(ge=1024, le=64 << 20)] = 1 << 20
    max_connections: Annotated[int, Field(ge=1, le=10_000)] = 64


class SupervisorSection(_Section):
    backoff_initial: Seconds = 0.5
    backoff_max: Seconds = 30.0
    max_crashes: PositiveInt = 5
    crash_window: Seconds = 60.0
    heartbeat_interval: Seconds = 2.0
    heartbeat_timeout: Seconds = 30.0

    @model_validator(mode="after")
    def _order(self) -> SupervisorSection:
        if self.backoff_max < self.backoff_initial:
            raise ValueError("backoff_max must be >= backoff_initial")
        if self.heartbeat_timeout <= self.heartbeat_interval:
            raise ValueError("heartbeat_timeout must be greater than heartbeat_interval")
        return self


class ChannelsSection(_Section):
    central: Annotated[int, Field(ge=1, le=1_000_000)] = 256
    analyzer: Annotated[int, Field(ge=1, le=1_000_000)] = 4096
    queue: Annotated[int, Field(ge=1, le=1_000_000)] = 1024


class StorageSection(_Section):
    path: str = "pushd.sqlite3"
    """Database file; relative to ``daemon.state_dir``."""
    batch_size: Annotated[int, Field(ge=1, le=100_000)] = 500


class ApnsSection(_Section):
    environment: Literal["simulator", "production", "sandbox", "custom"] = "simulator"
    host: str = ""
    port: Annotated[int, Field(ge=1, le=65535)] = 443
    auth: Literal["token", "certificate"] = "token"
    key_file: str = ""
    key_id: str = ""
    team_id: str = ""
    token_refresh: Annotated[float, Field(ge=1200, lt=3600)] = 1800.0  # used up to 2100 (apnsconf)
    cert_file: str = ""
    cert_key_file: str = ""
    cert_password: str = ""
    ca_file: str = ""
    connections: Annotated[int, Field(ge=1, le=64)] = 2
    max_streams: Annotated[int, Field(ge=1, le=10_000)] = 1000
    request_timeout: Seconds = 10.0
    connect_timeout: Seconds = 10.0
    ping_interval: Seconds = 60.0
    ping_timeout: Seconds = 10.0
    max_attempts: Annotated[int, Field(ge=1, le=20)] = 3

    @model_validator(mode="after")
    def _credentials(self) -> ApnsSection:
        if self.environment == "custom" and not self.host:
            raise ValueError("host is required when environment = 'custom'")
        if self.environment in ("production", "sandbox"):
            if self.auth == "token" and not (self.key_file and self.key_id and self.team_id):
                raise ValueError("token auth needs key_file, key_id and team_id")
            if self.auth == "certificate" and not self.cert_file:
                raise ValueError("certificate auth needs cert_file")
        return self


class SimulatorSection(_Section):
    host: str = "127.0.0.1"
    port: Annotated[int, Field(ge=0, le=65535)] = 0
    tls_dir: str = "sim"
    """Relative to ``daemon.state_dir``: the generated CA, certificate and signing key."""
    max_concurrent_streams: Annotated[int, Field(ge=1, le=100_000)] = 1000
    record: str = ""
    """If set, every request the simulator answers is appended there as a JSON line."""


class NodesSection(_Section):
    count: Annotated[int, Field(ge=1, le=256)] = 2
    batch: Annotated[int, Field(ge=1, le=10_000)] = 200
    lanes: Annotated[int, Field(ge=1, le=64)] = 4
    lease_seconds: Seconds = 60.0
    shard_by: Literal["device", "region"] = "device"
    region_attribute: str = "region"
    regions: list[str] = Field(default_factory=list)


class QueueSection(_Section):
    aging_seconds: Seconds = 60.0
    retry_initial: Seconds = 5.0
    retry_max: Seconds = 600.0
    max_attempts: Annotated[int, Field(ge=1, le=100)] = 8
    sweep_interval: Seconds = 5.0
    default_ttl: Seconds = 86_400.0
    retention: Annotated[float, Field(ge=3600)] = 7 * 86_400.0
    """Finished messages, their per-device outcomes, old events and closed follow-ups are
    deleted this long after they finished (seconds)."""


class CodesSection(_Section):
    current: str = "k1"
    keys: dict[str, str] = Field(default_factory=lambda: {"k1": "file:codes-k1.key"})
    """Key id -> secret. ``file:PATH`` (relative to state_dir; generated if missing), ``hex:...``."""


class AnalyzerSection(_Section):
    default_deadline: Seconds = 3600.0
    max_repushes: Annotated[int, Field(ge=0, le=20)] = 3


class ClassSpec(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)
    id: Annotated[str, Field(min_length=1, max_length=64)]
    description: str = ""
    rule: Any  # required: a class that says nothing would silently match every device


class Config(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)

    daemon: DaemonSection = DaemonSection()
    control: ControlSection = ControlSection()
    supervisor: SupervisorSection = SupervisorSection()
    channels: ChannelsSection = ChannelsSection()
    storage: StorageSection = StorageSection()
    apns: ApnsSection = ApnsSection()
    simulator: SimulatorSection = SimulatorSection()
    nodes: NodesSection = NodesSection()
    queue: QueueSection = QueueSection()
    codes: CodesSection = CodesSection()
    analyzer: AnalyzerSection = AnalyzerSection()
    classes: list[ClassSpec] = Field(default_factory=list)

    # Not part of the file: where it was read from, for resolving relative paths.
    source: Path | None = Field(default=None, exclude=True)

    # -- resolved paths ---------------------------------------------------------------

    def _base(self) -> Path:
        return self.source.parent if self.source else Path.cwd()

    def resolve(self, value: str, *, base: Path | None = None) -> Path:
        p = Path(os.path.expandvars(value)).expanduser()
        return p if p.is_absolute() else (base or self._base()) / p

    @property
    def state_dir(self) -> Path:
        env = os.environ.get("STATE_DIRECTORY")
        if env and not Path(self.daemon.state_dir).is_absolute():
            return Path(env.split(":")[0])
        return self.resolve(self.daemon.state_dir)

    @property
    def database_path(self) -> Path:
        return self.resolve(self.storage.path, base=self.state_dir)

    @property
    def socket_path(self) -> Path:
        env = os.environ.get("RUNTIME_DIRECTORY")
        if env and not Path(self.control.socket).is_absolute():
            return Path(env.split(":")[0]) / Path(self.control.socket).name
        return self.resolve(self.control.socket)

    def state_path(self, value: str) -> Path:
        return self.resolve(value, base=self.state_dir)


# Settings whose change a reload reports but cannot apply without a restart.
RESTART_REQUIRED: tuple[str, ...] = (
    "daemon.state_dir",
    "daemon.log_format",
    "storage.path",
    "control.socket",
    "control.mode",
    "control.group",
    "channels",
    "simulator",
    "nodes.lanes",
    # Each running actor beats at the interval it started with: a reload that shortened
    # the timeout (or the interval) would count healthy actors as wedged.
    "supervisor.heartbeat_interval",
    "supervisor.heartbeat_timeout",
)


@dataclass(frozen=True)
class ConfigProblem:
    key: str
    message: str

    def __str__(self) -> str:
        return f"{self.key}: {self.message}"


class ConfigError(Exception):
    """The config file is unreadable or invalid. ``problems`` names each bad key."""

    def __init__(self, file: Path | str, problems: list[ConfigProblem]) -> None:
        self.file = str(file)
        self.problems = problems
        lines = "\n".join(f"  {p}" for p in problems)
        super().__init__(f"invalid config {self.file}:\n{lines}")

    @property
    def keys(self) -> list[str]:
        return [p.key for p in self.problems]


def _key_path(loc: tuple[int | str, ...]) -> str:
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        else:
            out += f".{part}" if out else str(part)
    return out or "(top level)"


def _known_keys(model: type[BaseModel], loc: tuple[int | str, ...]) -> list[str]:
    """The valid key names at ``loc`` (for 'did you mean' hints)."""
    current: Any = model
    for part in loc:
        if isinstance(part, int):
            continue
        if not (isinstance(current, type) and issubclass(current, BaseModel)):
            return []
        field = current.model_fields.get(str(part))
        if field is None:
            return []
        ann = field.annotation
        args = getattr(ann, "__args__", ())
        current = args[0] if args and isinstance(args[0], type) else ann
    if isinstance(current, type) and issubclass(current, BaseModel):
        return [k for k in current.model_fields if k != "source"]
    return []


def _problems(exc: ValidationError) -> list[ConfigProblem]:
    problems = []
    for err in exc.errors(include_url=False):
        loc = tuple(err["loc"])
        key = _key_path(loc)
        if err["type"] == "extra_forbidden":
            hint = difflib.get_close_matches(str(loc[-1]), _known_keys(Config, loc[:-1]), n=1)
            msg = "unknown key" + (f" (did you mean '{hint[0]}'?)" if hint else "")
        else:
            msg = err["msg"]
            if msg.startswith("Value error, "):
                msg = msg[len("Value error, ") :]
        problems.append(ConfigProblem(key, msg))
    return problems


def parse_config(data: dict[str, Any], source: Path | str = "<memory>") -> Config:
    """Validate a parsed TOML document. Raises ConfigError naming every bad key."""
    try:
        cfg = Config.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(source, _problems(exc)) from None
    path = Path(source).resolve() if str(source) != "<memory>" else None
    cfg = cfg.model_copy(update={"source": path})
    _check_semantics(cfg, source)
    return cfg


def _check_semantics(cfg: Config, source: Path | str) -> None:
    """Checks that span several keys or need other modules (rules, code keys)."""
    # Imported here: actors/ never imports pushd, pushd may import actors.
    from actors.idcode import key_problem
    from actors.rules import Classifier, RuleError

    problems: list[ConfigProblem] = []
    try:
        Classifier.from_config([c.model_dump() for c in cfg.classes], path="classes")
    except RuleError as exc:
        problems.append(ConfigProblem(exc.path, exc.message))
    except ValueError as exc:
        problems.append(ConfigProblem("classes", str(exc)))
    if cfg.codes.current not in cfg.codes.keys:
        problems.append(ConfigProblem("codes.current", f"'{cfg.codes.current}' is not in codes.keys"))
    for kid, value in cfg.codes.keys.items():
        problem = key_problem(kid, value)  # the checks startup makes, but reading no file
        if problem is not None:
            problems.append(ConfigProblem(f"codes.keys.{kid}", problem))
    if cfg.nodes.shard_by == "region" and not cfg.nodes.regions:
        problems.append(ConfigProblem("nodes.regions", "required when shard_by = 'region'"))
    if problems:
        raise ConfigError(source, problems)


def load_config(path: Path | str) -> Config:
    """Read and validate a config file. Raises ConfigError (never a bare exception)."""
    p = Path(path)
    try:
        raw = p.read_bytes()
    except OSError as exc:
        raise ConfigError(p, [ConfigProblem("(file)", exc.strerror or str(exc))]) from None
    try:
        data = tomllib.loads(raw.decode("utf-8"))
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise ConfigError(p, [ConfigProblem("(syntax)", str(exc))]) from None
    return parse_config(data, p)


def changed_keys(old: Config, new: Config) -> list[str]:
    """Dotted section names whose values differ (for reload reports)."""
    out = []
    for name in Config.model_fields:
        if name == "source":
            continue
        a, b = getattr(old, name), getattr(new, name)
        if a == b:
            continue
        if isinstance(a, BaseModel):
            out += [f"{name}.{k}" for k in type(a).model_fields if getattr(a, k) != getattr(b, k)]
        else:
            out.append(name)
    return out


def needs_restart(changed: list[str]) -> list[str]:
    return [k for k in changed if any(k == r or k.startswith(r + ".") for r in RESTART_REQUIRED)]


def merge_for_reload(old: Config, new: Config) -> tuple[Config, list[str], list[str]]:
    """What a reload puts in force: ``new``, except the settings that need a restart,
    which keep their old values. Returns (effective config, applied keys, restart keys)."""
    changed = changed_keys(old, new)
    restart = needs_restart(changed)
    effective = new
    for key in restart:
        section, _, name = key.partition(".")
        if not name:
            effective = effective.model_copy(update={section: getattr(old, section)})
        else:
            part = getattr(effective, section).model_copy(update={name: getattr(getattr(old, section), name)})
            effective = effective.model_copy(update={section: part})
    applied = [k for k in changed if k not in restart]
    return effective, applied, restart
