"""The ``pushd`` command: ``pushd run`` starts the daemon; the other subcommands work
offline (``check-config``, ``sim``)."""

from __future__ import annotations

import argparse
import io
import os
import sys
from pathlib import Path

__all__ = ["default_config_path", "main"]

EXIT_OK = 0
EXIT_FAILURE = 1
EXIT_USAGE = 2


def default_config_path() -> Path:
    """``$PUSHD_CONFIG``, else ``./config.toml`` if present, else ``/etc/pushd/config.toml``."""
    env = os.environ.get("PUSHD_CONFIG")
    if env:
        return Path(env)
    local = Path("config.toml")
    return local if local.exists() else Path("/etc/pushd/config.toml")


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="pushd", description="Push-notification daemon for iOS apps.")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")
    run = sub.add_parser("run", help="run the daemon in the foreground")
    run.add_argument("--config", type=Path, default=None, help="config file (default: %(default)s)")
    check = sub.add_parser("check-config", help="validate a config file and exit")
    check.add_argument("--config", type=Path, default=None)
    sub.add_parser("sim", help="run the bundled APNs simulator (see `pushd sim --help`)", add_help=False)
    return p


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == "sim":
        from apns.simulator import main as sim_main

        return sim_main(argv[1:])
    args = _parser().parse_args(argv)

    from pushd.config import ConfigError, load_config

    path = args.config or default_config_path()
    try:
        config = load_config(path)
    except ConfigError as exc:
        print(f"pushd: {exc}", file=sys.stderr)
        return EXIT_USAGE
    if args.command == "check-config":
        print(f"{path}: ok")
        return EXIT_OK
    return _run(config)


def _run(config: object) -> int:
    import trio

    from pushd import logs
    from pushd.config import Config
    from pushd.daemon import Daemon

    assert isinstance(config, Config)
    # One log line per event reaches journald (a pipe) at once, not when a buffer fills.
    if isinstance(sys.stdout, io.TextIOWrapper):
        sys.stdout.reconfigure(line_buffering=True)
    logs.configure_logging(config.daemon.log_level, config.daemon.log_format)
    daemon = Daemon(config)
    try:
        return trio.run(daemon.run)
    except KeyboardInterrupt:
        return 130
    except Exception as exc:  # startup failures: say what and where, exit non-zero
        import structlog

        structlog.get_logger("pushd").critical("pushd failed", error=f"{type(exc).__name__}: {exc}", exc_info=exc)
        return EXIT_FAILURE


if __name__ == "__main__":
    sys.exit(main())
