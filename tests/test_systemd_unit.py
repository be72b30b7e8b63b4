"""systemd/: the unit's required directives, systemd's own verdict on it, the
sysusers/tmpfiles snippets, and pushd's stack under MemoryDenyWriteExecute.

The systemd tools are optional locally (tests skip without them); CI sets
PUSHD_REQUIRE_SYSTEMD_ANALYZE=1 so that a missing tool fails instead.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from pushd.config import DaemonSection

SYSTEMD_DIR = Path(__file__).resolve().parent.parent / "systemd"
UNIT = SYSTEMD_DIR / "pushd.service"
SYSUSERS = SYSTEMD_DIR / "pushd.sysusers.conf"
TMPFILES = SYSTEMD_DIR / "pushd.tmpfiles.conf"

Unit = dict[str, dict[str, list[str]]]


def parse_unit(text: str) -> Unit:
    """Sections -> key -> every value assigned, in order (systemd keys repeat)."""
    unit: Unit = {}
    section: dict[str, list[str]] | None = None
    logical = ""
    for raw in text.splitlines():
        line = raw.strip()
        if not logical and (not line or line[0] in "#;"):
            continue
        if line.endswith("\\"):
            logical += line[:-1] + " "
            continue
        line, logical = logical + line, ""
        if line.startswith("[") and line.endswith("]"):
            section = unit.setdefault(line[1:-1], {})
            continue
        key, sep, value = line.partition("=")
        assert sep and section is not None, f"not an assignment in a section: {raw!r}"
        section.setdefault(key.strip(), []).append(value.strip())
    return unit


def seconds(value: str) -> float:
    """The subset of systemd.time(7) spans this unit uses: 30, 30s, 2min, 1min 30s."""
    units = {"": 1.0, "s": 1.0, "sec": 1.0, "min": 60.0, "m": 60.0, "h": 3600.0, "ms": 0.001}
    total = 0.0
    for part in value.split():
        number = part.rstrip("abcdefghijklmnopqrstuvwxyz")
        total += float(number) * units[part[len(number) :]]
    return total


def require_tool(name: str) -> str:
    path = shutil.which(name)
    if path is None:
        if os.environ.get("PUSHD_REQUIRE_SYSTEMD_ANALYZE") == "1":
            pytest.fail(f"{name} not found but PUSHD_REQUIRE_SYSTEMD_ANALYZE=1")
        pytest.skip(f"{name} not installed (apt-get install systemd)")
    return path


@pytest.fixture(scope="module")
def service() -> dict[str, list[str]]:
    return parse_unit(UNIT.read_text())["Service"]


def one(service: dict[str, list[str]], key: str) -> str:
    values = service.get(key)
    assert values is not None, f"{key}= missing"
    assert len(values) == 1, f"{key}= assigned {len(values)} times"
    return values[0]


def test_parser_handles_repeats_and_continuations() -> None:
    unit = parse_unit("[A]\n# c\nX=1\nX=2\n; c\nY=a\\\n  b\n[B]\nZ=\n")
    assert unit == {"A": {"X": ["1", "2"], "Y": ["a b"]}, "B": {"Z": [""]}}


EXPECTED = {
    "Type": "notify",
    "NotifyAccess": "main",
    "WatchdogSec": "30",
    "ExecReload": "/bin/kill -HUP $MAINPID",
    "Restart": "on-failure",
    "StateDirectory": "pushd",
    "RuntimeDirectory": "pushd",
    "RuntimeDirectoryMode": "0750",
    "User": "pushd",
    "Group": "pushd",
    "NoNewPrivileges": "yes",
    "ProtectSystem": "strict",
    "ProtectHome": "yes",
    "PrivateTmp": "yes",
    "PrivateDevices": "yes",
    "ProtectKernelTunables": "yes",
    "ProtectKernelModules": "yes",
    "ProtectKernelLogs": "yes",
    "ProtectControlGroups": "yes",
    "ProtectClock": "yes",
    "ProtectHostname": "yes",
    "RestrictNamespaces": "yes",
    "RestrictRealtime": "yes",
    "RestrictSUIDSGID": "yes",
    "LockPersonality": "yes",
    "MemoryDenyWriteExecute": "yes",
    "CapabilityBoundingSet": "",
    "AmbientCapabilities": "",
    "SystemCallArchitectures": "native",
    "UMask": "0077",
    "LimitNOFILE": "65536",
}


@pytest.mark.parametrize(("key", "value"), sorted(EXPECTED.items()))
def test_required_directive(service: dict[str, list[str]], key: str, value: str) -> None:
    assert one(service, key) == value


def test_exec_start_runs_the_daemon_with_the_etc_config(service: dict[str, list[str]]) -> None:
    argv = one(service, "ExecStart").split()
    assert Path(argv[0]).is_absolute() and Path(argv[0]).name == "pushd"
    assert argv[1:] == ["run", "--config", "/etc/pushd/config.toml"]


def test_address_families(service: dict[str, list[str]]) -> None:
    assert one(service, "RestrictAddressFamilies").split() == ["AF_UNIX", "AF_INET", "AF_INET6"]


def test_system_call_filter_allow_then_deny(service: dict[str, list[str]]) -> None:
    assert service["SystemCallFilter"] == ["@system-service", "~@privileged @resources"]
    assert one(service, "SystemCallErrorNumber") == "EPERM"


def test_timeouts(service: dict[str, list[str]]) -> None:
    assert seconds(one(service, "RestartSec")) > 0
    # The drain must finish before systemd resorts to SIGKILL.
    assert seconds(one(service, "TimeoutStopSec")) >= DaemonSection().shutdown_timeout + 10


def test_fixed_user_not_dynamic(service: dict[str, list[str]]) -> None:
    assert "DynamicUser" not in service
    assert "ConfigurationDirectory" not in service  # it would be root-owned: see tmpfiles


def test_install_section() -> None:
    assert parse_unit(UNIT.read_text())["Install"]["WantedBy"] == ["multi-user.target"]


def test_sysusers_creates_the_service_user(service: dict[str, list[str]]) -> None:
    entries = [
        line.split()
        for line in SYSUSERS.read_text().splitlines()
        if line.strip() and not line.lstrip().startswith("#")
    ]
    assert [(e[0], e[1]) for e in entries] == [("u", one(service, "User"))]


def make_root(tmp_path: Path) -> Path:
    """A root with the unit, stub executables for its commands, and the stock units."""
    root = tmp_path / "root"
    (root / "etc/systemd/system").mkdir(parents=True)
    shutil.copy(UNIT, root / "etc/systemd/system/pushd.service")
    service = parse_unit(UNIT.read_text())["Service"]
    for key in ("ExecStart", "ExecReload"):
        stub = root / one(service, key).split()[0].lstrip("/")
        stub.parent.mkdir(parents=True, exist_ok=True)
        stub.write_text("#!/bin/sh\n")
        stub.chmod(0o755)
    for stock in (Path("/usr/lib/systemd/system"), Path("/lib/systemd/system")):
        if stock.is_dir():
            shutil.copytree(stock, root / "usr/lib/systemd/system", symlinks=True)
            break
    return root


def test_systemd_analyze_verify(tmp_path: Path) -> None:
    analyze = require_tool("systemd-analyze")
    root = make_root(tmp_path)
    result = subprocess.run(
        [analyze, "verify", "--man=no", f"--root={root}", "pushd.service"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    # verify exits 0 on unknown keys and bad values ("..., ignoring"): any
    # output at all is a finding.
    assert (result.returncode, result.stdout + result.stderr) == (0, "")


def test_systemd_analyze_verify_catches_a_typo(tmp_path: Path) -> None:
    analyze = require_tool("systemd-analyze")
    root = make_root(tmp_path)
    unit = root / "etc/systemd/system/pushd.service"
    unit.write_text(unit.read_text().replace("ProtectSystem=", "ProtectSytem="))
    result = subprocess.run(
        [analyze, "verify", "--man=no", f"--root={root}", "pushd.service"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert "ProtectSytem" in result.stderr


def colon_file(path: Path) -> dict[str, list[str]]:
    """/etc/passwd-style file: name -> fields."""
    return {line.split(":")[0]: line.split(":") for line in path.read_text().splitlines()}


def test_sysusers_and_tmpfiles_apply(tmp_path: Path) -> None:
    sysusers = require_tool("systemd-sysusers")
    tmpfiles = require_tool("systemd-tmpfiles")
    if os.geteuid() != 0:
        pytest.skip("systemd-tmpfiles --root needs root to chown")
    root = tmp_path / "root"
    (root / "etc").mkdir(parents=True)
    subprocess.run([sysusers, f"--root={root}", str(SYSUSERS)], check=True, timeout=60)
    passwd, group = colon_file(root / "etc/passwd"), colon_file(root / "etc/group")
    assert passwd["pushd"][6].endswith("/nologin")
    assert passwd["pushd"][3] == group["pushd"][2]
    subprocess.run([tmpfiles, f"--root={root}", "--create", str(TMPFILES)], check=True, timeout=60)
    st = (root / "etc/pushd").stat()
    assert oct(st.st_mode & 0o7777) == oct(0o750)
    assert (st.st_uid, st.st_gid) == (0, int(group["pushd"][2]))


PR_SET_MDWE = 65
PR_MDWE_REFUSE_EXEC_GAIN = 1

MDWE_PROBE = textwrap.dedent(
    f"""
    import ctypes, io, mmap, sqlite3, ssl, sys
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl({PR_SET_MDWE}, {PR_MDWE_REFUSE_EXEC_GAIN}, 0, 0, 0) != 0:
        sys.exit(77)
    try:  # MDWE is on: writable+executable memory is refused
        mmap.mmap(-1, 4096, prot=mmap.PROT_READ | mmap.PROT_WRITE | mmap.PROT_EXEC)
        sys.exit("W+X mapping allowed: MDWE not in force")
    except PermissionError:
        pass

    import h2.connection, httpx, msgpack, structlog, trio, trio_asyncio, aiosqlite
    from cryptography.hazmat.primitives import hashes
    from cryptography.hazmat.primitives.asymmetric import ec
    from pushd.logs import configure_logging
    from pushd.sdnotify import Notifier

    key = ec.generate_private_key(ec.SECP256R1())  # ES256, as for APNs tokens
    key.public_key().verify(key.sign(b"x", ec.ECDSA(hashes.SHA256())), b"x", ec.ECDSA(hashes.SHA256()))
    ssl.create_default_context()
    httpx.AsyncClient(http2=True)
    h2.connection.H2Connection()
    assert msgpack.unpackb(msgpack.packb({{"a": [1, 2]}})) == {{"a": [1, 2]}}
    db = sqlite3.connect(":memory:"); db.execute("create table t (x)"); db.close()
    buf = io.StringIO()
    configure_logging("info", "json", buf)
    structlog.get_logger().info("under mdwe")
    assert "under mdwe" in buf.getvalue()
    Notifier.from_environ({{}}).ready()

    async def main():
        async with trio.open_nursery() as nursery:
            nursery.start_soon(trio.sleep, 0.01)
    trio.run(main)
    print("ok")
    """
)


def test_stack_runs_under_memory_deny_write_execute() -> None:
    """MemoryDenyWriteExecute=yes: the kernel's PR_SET_MDWE gives the same refusal."""
    result = subprocess.run(
        [sys.executable, "-c", MDWE_PROBE], capture_output=True, text=True, timeout=120
    )
    if result.returncode == 77:
        pytest.skip("kernel without PR_SET_MDWE (Linux < 6.3)")
    assert (result.returncode, result.stdout.strip()) == (0, "ok"), result.stderr
