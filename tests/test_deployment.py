"""The deployment material, proven without a Docker engine (these machines have none).

- The Dockerfile's two stages agree (Debian release, Python, shebang, extraction root, binary
  path), read statically; and they are *run*: the build stage's instructions in a
  debootstrapped Debian root (what debian:13-slim is), the runtime stage's instructions on a
  root holding exactly the packages of distroless python3-debian13, unpacked the way
  distroless unpacks them (no maintainer scripts, so no shell and no /usr/bin/env). `serve`
  and admin commands then run from it as uid 10001 on a read-only root, with the /dev,
  /dev/shm and /proc Docker gives a container, in their own mount and PID namespaces.
- `docker-compose config` accepts both compose files, and the parsed result keeps Ollama,
  Postgres and Redis unpublished and internal; `caddy adapt` accepts the Caddyfile example.

The two Debian roots are cached in $NEURONETZ_CI_CACHE (default /var/cache/neuronetz-ci),
under a hash of everything that defines them (release, packages, mirror, architecture and
the code below that builds them), so a change to any of those builds them anew. A missing
tool or privilege skips with the reason; under CI (CI=true) it fails, so that a green CI
cannot hide a check that never ran.
"""

from __future__ import annotations

import contextlib
import fcntl
import getpass
import hashlib
import inspect
import json
import os
import platform
import posixpath
import re
import secrets
import shlex
import shutil
import signal
import subprocess
import tempfile
import time
import urllib.error
import urllib.request
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any, NoReturn
from urllib.parse import urlsplit, urlunsplit

import pytest

from neuronetz import envfile
from tests.support import ROOT, free_port, http_status

DOCKERFILE = ROOT / "Dockerfile"
CACHE = Path(os.environ.get("NEURONETZ_CI_CACHE", "/var/cache/neuronetz-ci"))
MIRROR = os.environ.get("NEURONETZ_DEBIAN_MIRROR", "http://deb.debian.org/debian")
CODENAMES = {12: "bookworm", 13: "trixie", 14: "forky"}
# What /usr/bin/python3 is on each distroless python3 image (distroless python3/python.bzl).
DISTROLESS_PYTHON = {12: "3.11", 13: "3.13"}
# The packages distroless python3-debianN is made of, one per line (sources cited there).
DISTROLESS_PACKAGE_LISTS = ROOT / "ops" / "rootfs"
# Ollama keeps its models and keys under $HOME/.ollama (envconfig.Models in Ollama's source
# defaults to that home's .ollama/models), and its image sets no USER: it runs as root, whose
# home in the image is this one.
OLLAMA_IMAGE_HOME = "/root"
# Where each image keeps its data inside its container (paths in the images, not on this
# machine), as the images' public documentation gives them:
IMAGE_DATA_DIRECTORIES = {
    "postgres": "/var/lib/postgresql/data",  # PGDATA, https://hub.docker.com/_/postgres
    "redis": "/data",  # persistent storage, https://hub.docker.com/_/redis
    "ollama": f"{OLLAMA_IMAGE_HOME}/.ollama",  # the volume Ollama's Docker instructions mount
}
# The users, groups and environment of every distroless image (distroless common/BUILD.bazel,
# static/static.bzl, python3/python.bzl).
DISTROLESS_PASSWD = (
    "root:x:0:0:root:/root:/sbin/nologin\n"
    "nobody:x:65534:65534:nobody:/nonexistent:/sbin/nologin\n"
    "nonroot:x:65532:65532:nonroot:/home/nonroot:/sbin/nologin\n"
)
DISTROLESS_GROUP = "root:x:0:\nnobody:x:65534:\ntty:x:5:\nstaff:x:50:\nnonroot:x:65532:\n"
DISTROLESS_ENV = {
    "PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
    "SSL_CERT_FILE": "/etc/ssl/certs/ca-certificates.crt",
    "LANG": "C.UTF-8",
}
# Docker's default environment for a RUN in a Debian image.
DEBIAN_ENV = {"PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin", "HOME": "/root"}
# The device nodes Docker puts into a container's /dev.
DEVICES = ("null", "zero", "full", "random", "urandom", "tty")


def unavailable(reason: str) -> NoReturn:
    """Skip for a reason of the machine's; under CI fail, because CI must be able to do it."""
    if os.environ.get("CI"):
        pytest.fail(f"{reason} -- CI must install or allow it (see .ci/run)")
    pytest.skip(reason)


def require_tool(tool: str, package: str) -> str:
    path = shutil.which(tool)
    if path is None:
        unavailable(f"`{tool}` is not installed (Debian package {package})")
    return path


def run(
    command: list[str], *, timeout: float = 120, check: bool = True, **kwargs: Any
) -> subprocess.CompletedProcess[str]:
    result = subprocess.run(command, capture_output=True, text=True, timeout=timeout, check=False, **kwargs)
    if check and result.returncode != 0:
        raise AssertionError(
            f"{shlex.join(command)[:500]} exited {result.returncode}\n"
            f"stdout: {result.stdout[-3000:]}\nstderr: {result.stderr[-3000:]}"
        )
    return result


# --- the Dockerfile, parsed -----------------------------------------------------------------


@dataclass(frozen=True)
class Instruction:
    keyword: str
    value: str

    def exec_form(self) -> list[str]:
        """The JSON array of an exec-form ENTRYPOINT/CMD; shell form is an error here:
        distroless has no shell to run it."""
        try:
            words = json.loads(self.value)
        except ValueError:
            words = None
        assert isinstance(words, list), f"{self.keyword} must be exec form (a JSON array), got {self.value!r}"
        assert all(isinstance(word, str) for word in words)
        return [str(word) for word in words]


@dataclass(frozen=True)
class Copy:
    stage: str | None
    sources: list[str]
    destination: str

    @classmethod
    def parse(cls, value: str) -> Copy:
        words = shlex.split(value)
        flags = dict(word[2:].split("=", 1) for word in words if word.startswith("--"))
        unknown = set(flags) - {"from"}
        assert not unknown, f"COPY flags the emulation does not know: {unknown}"
        paths = [word for word in words if not word.startswith("--")]
        return cls(flags.get("from"), paths[:-1], paths[-1])


@dataclass
class Stage:
    base: str
    name: str | None
    instructions: list[Instruction] = field(default_factory=list)

    def all(self, keyword: str) -> list[Instruction]:
        return [i for i in self.instructions if i.keyword == keyword]

    def one(self, keyword: str) -> Instruction:
        found = self.all(keyword)
        assert len(found) == 1, f"expected exactly one {keyword} in the stage FROM {self.base}, found {len(found)}"
        return found[0]

    def copies(self) -> list[Copy]:
        return [Copy.parse(i.value) for i in self.all("COPY")]


def parse_dockerfile(text: str) -> list[Stage]:
    """Stages with their instructions, line continuations joined, comments dropped."""
    lines: list[str] = []
    pending = ""
    for raw in text.splitlines():
        stripped = raw.strip()
        if stripped.startswith("#") or (not stripped and not pending):
            continue
        if stripped.endswith("\\"):
            pending += stripped[:-1].strip() + " "
            continue
        lines.append((pending + stripped).strip())
        pending = ""
    assert not pending, "the Dockerfile ends inside a line continuation"
    stages: list[Stage] = []
    for line in lines:
        keyword, _, value = line.partition(" ")
        keyword, value = keyword.upper(), value.strip()
        if keyword == "FROM":
            words = value.split()
            name = words[2] if len(words) == 3 and words[1].lower() == "as" else None
            stages.append(Stage(words[0], name))
        else:
            assert stages, f"{keyword} before the first FROM"
            stages[-1].instructions.append(Instruction(keyword, value))
    return stages


@dataclass(frozen=True)
class Plan:
    """What the Dockerfile says, in the terms the tests check."""

    build: Stage
    runtime: Stage
    release: int  # the Debian release of the build stage
    runtime_release: int  # ... and of the runtime stage
    build_packages: list[str]
    python: str  # build.py --python: the shebang
    extraction_root: str  # build.py --root
    binary: str  # build.py --output: the binary's path in both stages

    @property
    def codename(self) -> str:
        return CODENAMES[self.release]


def read_plan() -> Plan:
    stages = parse_dockerfile(DOCKERFILE.read_text())
    assert len(stages) == 2, "the Dockerfile has a build stage and a runtime stage"
    build, runtime = stages
    slim = re.fullmatch(r"debian:(\d+)-slim(@sha256:[0-9a-f]{64})?", build.base)
    distroless = re.fullmatch(r"gcr\.io/distroless/python3-debian(\d+)(:[\w.-]+)?(@sha256:[0-9a-f]{64})?", runtime.base)
    assert slim, f"the build stage must be debian:N-slim with Debian's python3, got {build.base}"
    assert distroless, f"the runtime stage must be distroless python3-debianN, got {runtime.base}"
    assert build.name, "the build stage needs a name for COPY --from"
    installs = [i.value for i in build.all("RUN") if "apt-get install" in i.value]
    assert len(installs) == 1, "one RUN installs the build stage's packages"
    after_install = installs[0].split("apt-get install", 1)[1].split("&&", 1)[0]
    packages = [word for word in after_install.split() if not word.startswith("-")]
    builds = [i.value for i in build.all("RUN") if "build.py" in i.value]
    assert len(builds) == 1, "one RUN builds the binary with build.py"
    words = shlex.split(builds[0])
    options = {word: words[index + 1] for index, word in enumerate(words) if word.startswith("--")}
    return Plan(
        build=build,
        runtime=runtime,
        release=int(slim.group(1)),
        runtime_release=int(distroless.group(1)),
        build_packages=packages,
        python=options.get("--python", ""),
        extraction_root=options.get("--root", ""),
        binary=options.get("--output", ""),
    )


def test_dockerfile_stages_agree_on_debian_python_shebang_and_extraction_root() -> None:
    plan = read_plan()
    assert plan.release == plan.runtime_release, f"build {plan.build.base} and run {plan.runtime.base}: one release"
    assert plan.release in DISTROLESS_PYTHON, f"no distroless python3 image for Debian {plan.release}"
    # Debian's own python3 in the build stage is the interpreter distroless runs: same path,
    # same minor; the patch level follows from building both from the same release (proven
    # by the emulation below, which compares the two interpreters' versions).
    assert "python3" in plan.build_packages
    assert "python3-venv" in plan.build_packages, "build.py makes a venv for shiv"
    assert plan.python == "/usr/bin/python3", "the shebang must name the interpreter: distroless has no /usr/bin/env"
    assert plan.extraction_root.startswith("/"), "a fixed extraction root (--root) is baked into the binary"
    copies = plan.runtime.copies()
    copied = {(c.stage, source, c.destination.rstrip("/") or "/") for c in copies for source in c.sources}
    # The extraction and the binary keep their paths: shiv finds its extraction by the
    # binary's file name and the root baked into it, so a rename would extract again.
    assert (plan.build.name, plan.extraction_root, plan.extraction_root) in copied
    assert (plan.build.name, plan.binary, plan.binary) in copied
    assert posixpath.basename(plan.binary) == "neuronetz-gateway"
    assert posixpath.dirname(plan.binary) in DISTROLESS_ENV["PATH"].split(":"), "on PATH for `docker exec`"
    # Every python3.X path in either stage (the standard library's .pyc files) is the
    # runtime's Python.
    instructions = " ".join(i.value for i in plan.build.instructions + plan.runtime.instructions)
    assert set(re.findall(r"python(3\.\d+)", instructions)) == {DISTROLESS_PYTHON[plan.release]}
    compile_runs = [i.value for i in plan.build.all("RUN") if "compileall" in i.value]
    assert any(
        "--invalidation-mode unchecked-hash" in run_ and plan.extraction_root in run_ for run_ in compile_runs
    ), "the extraction's .pyc files must not depend on timestamps a COPY may change"


def test_dockerfile_runtime_stage_runs_the_binary_as_10001_without_a_shell() -> None:
    plan = read_plan()
    runtime = plan.runtime
    assert runtime.one("USER").value == "10001:10001"
    assert runtime.one("ENTRYPOINT").exec_form() == [plan.binary]
    assert runtime.one("CMD").exec_form() == ["serve"]
    options, _, command = runtime.one("HEALTHCHECK").value.partition("CMD ")
    assert Instruction("HEALTHCHECK", command).exec_form() == [plan.binary, "healthcheck"]
    assert "--start-period" in options, "serve may wait for Postgres and migrate before /healthz answers"
    assert not runtime.all("RUN"), "the runtime image has no shell to RUN anything with"
    assert runtime.one("WORKDIR").value == "/app", "the gateway reads ./.env, mounted at /app/.env"
    # The build stage writes the user into passwd/group files that replace the image's.
    passwd_copies = [c for c in runtime.copies() if any(s.endswith("/etc/passwd") for s in c.sources)]
    assert passwd_copies, "the gateway user's passwd entry reaches the image"
    assert passwd_copies[0].destination == "/etc/"
    assert "gateway:x:10001:10001:" in " ".join(i.value for i in plan.build.all("RUN"))


def dockerignore_excludes(patterns: list[str], path: str) -> bool:
    """Docker's rule: the last pattern matching the path or one of its parents decides."""
    excluded = False
    parts = path.split("/")
    prefixes = ["/".join(parts[: i + 1]) for i in range(len(parts))]
    for pattern in patterns:
        negated = pattern.startswith("!")
        body = pattern.lstrip("!").strip("/")
        regex = re.escape(body).replace(r"\*\*/", "(?:.*/)?").replace(r"\*", "[^/]*").replace(r"\?", "[^/]")
        if any(re.fullmatch(regex, prefix) for prefix in prefixes):
            excluded = not negated
    return excluded


def read_dockerignore() -> list[str]:
    lines = (ROOT / ".dockerignore").read_text().splitlines()
    return [line.strip() for line in lines if line.strip() and not line.strip().startswith("#")]


def test_dockerignore_keeps_secrets_and_local_state_out_of_the_build_context() -> None:
    patterns = read_dockerignore()
    for path in [".env", ".env.tmp", ".git/config", ".venv/bin/python", "neuronetz-gateway", ".build/x", "build/lib"]:
        assert dockerignore_excludes(patterns, path), f"{path} must not reach the build context"
    assert dockerignore_excludes(patterns, "neuronetz/__pycache__/app.cpython-313.pyc")
    for source in {s for c in read_plan().build.copies() if c.stage is None for s in c.sources}:
        source = source.rstrip("/")
        assert (ROOT / source).exists(), f"COPY {source}: not in the repository"
        assert not dockerignore_excludes(patterns, source), f"COPY {source}: excluded by .dockerignore"
    assert not dockerignore_excludes(patterns, "neuronetz/app.py")
    assert not dockerignore_excludes(patterns, "migrations/0001_tenants_and_keys.sql")


# --- compose ----------------------------------------------------------------------------------


def compose_config(file: str, env: dict[str, str], *profiles: str) -> subprocess.CompletedProcess[str]:
    """`docker-compose config` with exactly `env` as the .env file (never the developer's),
    with `profiles` active."""
    binary = require_tool("docker-compose", "docker-compose")
    with tempfile.NamedTemporaryFile("w", suffix=".env") as env_file:
        env_file.write("".join(f"{key}={value}\n" for key, value in env.items()))
        env_file.flush()
        return run(
            [binary, "-f", file, *(f"--profile={p}" for p in profiles), "--env-file", env_file.name, "config"],
            cwd=ROOT,
            env={"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HOME": os.environ.get("HOME", "/root")},
            check=False,
            timeout=60,
        )


def load_yaml(text: str) -> dict[str, Any]:
    yaml = pytest.importorskip("yaml", reason="PyYAML reads docker-compose's output")
    loaded = yaml.safe_load(text)
    assert isinstance(loaded, dict)
    return loaded


PRODUCTION_ENV = {
    "NEURONETZ_DOMAIN": "gateway.example.com",
    "ACME_EMAIL": "ops@example.com",
    "POSTGRES_PASSWORD": "pg-" + "x" * 20,
    "GATEWAY_SECRET": "s" * 64,
}


def operator_env(**changes: str) -> dict[str, str]:
    """The .env an operator writes: .env.example with the required values filled in."""
    return {**envfile.read(ROOT / ".env.example"), **PRODUCTION_ENV, **changes}


@pytest.fixture(scope="module")
def production() -> dict[str, Any]:
    result = compose_config("docker-compose.yml", operator_env())
    assert result.returncode == 0, result.stderr
    return load_yaml(result.stdout)


def published(service: dict[str, Any]) -> list[tuple[str, int, str]]:
    """(host address, host port, protocol) for each published port, long or short syntax."""
    ports: list[tuple[str, int, str]] = []
    for port in service.get("ports", []):
        if isinstance(port, dict):
            ports.append((port.get("host_ip", "0.0.0.0"), int(port["published"]), port.get("protocol", "tcp")))
            continue
        spec, _, protocol = str(port).partition("/")
        parts = spec.rsplit(":", 2)
        host = parts[0] if len(parts) == 3 else "0.0.0.0"
        ports.append((host, int(parts[-2]) if len(parts) > 1 else int(parts[-1]), protocol or "tcp"))
    return ports


def mounts(service: dict[str, Any]) -> dict[str, str]:
    """Container path -> source (a named volume or an absolute host path)."""
    found: dict[str, str] = {}
    for volume in service.get("volumes", []):
        if isinstance(volume, dict):
            found[volume["target"]] = volume.get("source", "")
        else:
            source, target, *_ = str(volume).split(":")
            found[target] = source
    return found


def default_services(config: dict[str, Any]) -> dict[str, Any]:
    """The services `docker compose up` starts: those of no profile. docker-compose 1.x's
    `config` lists every service, whatever the --profile; Compose v2 only the active ones."""
    return {name: service for name, service in config["services"].items() if not service.get("profiles")}


def test_production_compose_publishes_only_caddy_and_hides_ollama_postgres_redis(production: dict[str, Any]) -> None:
    services = default_services(production)
    networks: dict[str, Any] = production["networks"]
    assert set(services) == {"caddy", "gateway", "postgres", "redis", "ollama"}
    for name, service in services.items():
        assert "network_mode" not in service, f"{name}: network_mode would bypass the networks below"
        assert service.get("restart") in {"always", "unless-stopped"}, f"{name} must come back after a reboot"
    assert {(port, protocol) for _, port, protocol in published(services["caddy"])} == {
        (80, "tcp"),
        (443, "tcp"),
        (443, "udp"),
    }
    for name in ("gateway", "postgres", "redis", "ollama"):
        assert not published(services[name]), f"{name} must not publish a port: only Caddy faces the network"
    for name in ("postgres", "redis", "ollama"):
        joined = set(services[name]["networks"])
        assert joined, f"{name} must be on an explicit network"
        assert all(networks[n].get("internal") is True for n in joined), f"{name} may only sit on internal networks"
    # Nobody but the gateway shares a network with Ollama, Postgres or Redis.
    for network in services["ollama"]["networks"]:
        members = {name for name, service in services.items() if network in service["networks"]}
        assert members <= {"ollama", "gateway", "postgres", "redis"}, f"{network}: {members}"
    assert not set(services["caddy"]["networks"]) & set(services["ollama"]["networks"])


def test_production_compose_gateway_runs_as_10001_read_only_with_backends_from_its_env_file(
    production: dict[str, Any],
) -> None:
    services: dict[str, Any] = production["services"]
    gateway = services["gateway"]
    assert gateway["user"] == "10001:10001"
    assert gateway["read_only"] is True
    assert gateway["cap_drop"] == ["ALL"]
    environment: dict[str, str] = gateway["environment"]
    # OLLAMA_BACKENDS is re-read from /app/.env while the gateway runs; the process
    # environment would win over the file and freeze it.
    assert "OLLAMA_BACKENDS" not in environment
    assert "env_file" not in gateway
    assert mounts(gateway)["/app"] == str(ROOT), "the directory holding .env, so renames are seen"
    assert environment["GATEWAY_SECRET"] == PRODUCTION_ENV["GATEWAY_SECRET"]
    assert PRODUCTION_ENV["POSTGRES_PASSWORD"] in environment["DATABASE_URL"]
    assert urlsplit(environment["DATABASE_URL"]).hostname == "postgres"
    assert urlsplit(environment["REDIS_URL"]).hostname == "redis"
    assert environment["GATEWAY_HOST"] == "0.0.0.0"
    # Caddy's X-Forwarded-For is believed exactly on the subnet Caddy reaches the gateway on.
    proxy = next(n for n in gateway["networks"] if n in services["caddy"]["networks"])
    assert environment["GATEWAY_TRUSTED_PROXIES"] == production["networks"][proxy]["ipam"]["config"][0]["subnet"]
    assert gateway["depends_on"]["postgres"]["condition"] == "service_healthy"
    assert gateway["depends_on"]["redis"]["condition"] == "service_healthy"
    assert services["caddy"]["depends_on"]["gateway"]["condition"] == "service_healthy"
    for name in ("caddy", "postgres", "redis", "ollama"):
        assert services[name]["healthcheck"]["test"][0] == "CMD", f"{name} needs a healthcheck"
    # Data lives in named volumes, never in a container: mounted where each image keeps it.
    for name, path in IMAGE_DATA_DIRECTORIES.items():
        assert mounts(services[name])[path] in production["volumes"], f"{name}: {path} must be a named volume"
    assert {"/data", "/config"} <= set(mounts(services["caddy"])), "Caddy keeps its certificates"
    assert mounts(services["caddy"])["/etc/caddy/Caddyfile"] == str(ROOT / "ops/caddy/Caddyfile.example")


def test_production_compose_refuses_to_start_without_its_secrets() -> None:
    for missing in ("POSTGRES_PASSWORD", "GATEWAY_SECRET", "NEURONETZ_DOMAIN", "ACME_EMAIL"):
        result = compose_config("docker-compose.yml", operator_env(**{missing: ""}))
        assert result.returncode != 0, f"config accepted a missing {missing}"
        assert missing in result.stderr


def test_dev_compose_serves_the_gateway_on_loopback_8080_without_caddy_or_ollama() -> None:
    result = compose_config("docker-compose.dev.yml", envfile.read(ROOT / ".env.example"))
    assert result.returncode == 0, result.stderr
    services: dict[str, Any] = load_yaml(result.stdout)["services"]
    assert set(services) == {"gateway", "postgres", "redis"}
    assert published(services["gateway"]) == [("127.0.0.1", 8080, "tcp")]
    assert not published(services["postgres"])
    assert not published(services["redis"])
    gateway = services["gateway"]
    assert gateway["user"] == "10001:10001"
    assert gateway["read_only"] is True
    assert "OLLAMA_BACKENDS" not in gateway["environment"]
    assert mounts(gateway)["/app"] == str(ROOT)


# --- Caddy ------------------------------------------------------------------------------------


def test_caddyfile_example_terminates_tls_for_the_domain_and_streams_to_the_gateway(
    production: dict[str, Any],
) -> None:
    caddy = require_tool("caddy", "caddy")
    environment: dict[str, str] = production["services"]["caddy"]["environment"]
    result = run(
        [caddy, "adapt", "--config", "ops/caddy/Caddyfile.example", "--adapter", "caddyfile"],
        cwd=ROOT,
        env={"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HOME": "/nonexistent", **environment},
    )
    assert "not formatted" not in result.stderr, "run `caddy fmt --overwrite ops/caddy/Caddyfile.example`"
    adapted = json.loads(result.stdout)
    (server,) = adapted["apps"]["http"]["servers"].values()
    assert server["listen"] == [":443"]
    (route,) = server["routes"]
    assert route["match"] == [{"host": [PRODUCTION_ENV["NEURONETZ_DOMAIN"]]}]
    handlers = [h for r in route["handle"][0]["routes"] for h in r["handle"]]
    assert not [h for h in handlers if h["handler"] == "encode"], "compression buffers token streams"
    (proxy,) = [h for h in handlers if h["handler"] == "reverse_proxy"]
    assert proxy["flush_interval"] == -1, "streamed chunks must reach the client at once"
    assert proxy["upstreams"] == [{"dial": "gateway:8080"}]
    (policy,) = adapted["apps"]["tls"]["automation"]["policies"]
    assert policy["subjects"] == [PRODUCTION_ENV["NEURONETZ_DOMAIN"]]
    assert policy["issuers"][0] == {"module": "acme", "email": PRODUCTION_ENV["ACME_EMAIL"]}, "Let's Encrypt first"


# --- the Debian roots the emulation runs on ----------------------------------------------------


def distroless_packages(release: int) -> list[str]:
    listing = DISTROLESS_PACKAGE_LISTS / f"distroless-python3-debian{release}.packages"
    lines = [line.strip() for line in listing.read_text().splitlines()]
    return [line for line in lines if line and not line.startswith("#")]


def debian_architecture() -> str:
    machine = platform.machine()
    return {"x86_64": "amd64", "aarch64": "arm64", "riscv64": "riscv64"}.get(machine, machine)


def create_roots(recipe: dict[str, Any], target: Path) -> None:
    """debootstrap the build root (debian:N-slim plus the build stage's packages), and
    unpack the distroless package list into the runtime root from inside it: its own apt and
    dpkg-deb, the same mirror and moment, so both roots carry the same Python build."""
    partial = target.with_name(target.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir(parents=True)
    build, runtime = partial / "build", partial / "runtime"
    run(
        [
            "debootstrap",
            "--variant=minbase",
            f"--arch={recipe['architecture']}",
            "--include=" + ",".join(recipe["build_packages"]),
            recipe["suite"],
            str(build),
            recipe["mirror"],
        ],
        timeout=1500,
    )
    unpack = " && ".join(
        [
            "set -e",
            "mkdir -p /tmp/debs /distroless",
            "cd /tmp/debs",
            "apt-get -qq -o APT::Sandbox::User=root update",
            "apt-get -qq -o APT::Sandbox::User=root download " + " ".join(recipe["runtime_packages"]),
            'for deb in *.deb; do dpkg-deb -x "$deb" /distroless; done',
            # A debian:N-slim image has no package lists until apt-get update.
            "rm -rf /tmp/debs /var/lib/apt/lists/*",
        ]
    )
    run(["chroot", str(build), "/bin/sh", "-c", unpack], timeout=900)
    (build / "distroless").rename(runtime)
    for alias in ("python", "python3"):
        (runtime / "usr/bin" / alias).symlink_to(f"/usr/bin/python{recipe['python']}")
    (runtime / "etc/passwd").write_text(DISTROLESS_PASSWD)
    (runtime / "etc/group").write_text(DISTROLESS_GROUP)
    (runtime / "etc/nsswitch.conf").write_text("passwd: compat\ngroup: compat\nhosts: files dns\n")
    (runtime / "tmp").chmod(0o1777)
    (runtime / "home/nonroot").mkdir(mode=0o700, parents=True)
    os.chown(runtime / "home/nonroot", 65532, 65532)
    certificates = sorted((runtime / "usr/share/ca-certificates").rglob("*.crt"))
    (runtime / "etc/ssl/certs").mkdir(parents=True, exist_ok=True)
    (runtime / "etc/ssl/certs/ca-certificates.crt").write_text("".join(c.read_text() for c in certificates))
    # distroless ships a prebuilt ld.so.cache; build ours with the root's own static ldconfig.
    run(["chroot", str(runtime), "/usr/sbin/ldconfig"])
    (partial / "recipe.json").write_text(json.dumps(recipe, indent=2))
    partial.rename(target)


@dataclass(frozen=True)
class Roots:
    build: Path
    runtime: Path


def cached_roots(plan: Plan) -> Roots:
    recipe = {
        "suite": plan.codename,
        "mirror": MIRROR,
        "architecture": debian_architecture(),
        "build_packages": sorted(plan.build_packages),
        "runtime_packages": sorted(distroless_packages(plan.release)),
        "python": DISTROLESS_PYTHON[plan.release],
        "users": [DISTROLESS_PASSWD, DISTROLESS_GROUP],
        "recipe": inspect.getsource(create_roots),
    }
    key = hashlib.sha256(json.dumps(recipe, sort_keys=True).encode()).hexdigest()[:16]
    home = CACHE / "rootfs"
    home.mkdir(parents=True, exist_ok=True)
    target = home / f"{plan.codename}-{key}"
    with (home / ".lock").open("w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # two runs at once build it once
        if not target.is_dir():
            create_roots(recipe, target)
            for stale in home.iterdir():
                if stale.is_dir() and stale != target:
                    shutil.rmtree(stale, ignore_errors=True)
    return Roots(target / "build", target / "runtime")


# --- running the Dockerfile on them ---------------------------------------------------------


@dataclass
class Image:
    root: Path
    build_root: Path
    user: str
    workdir: str
    env: dict[str, str]
    entrypoint: list[str]
    cmd: list[str]
    healthcheck: list[str]
    timings: dict[str, float] = field(default_factory=dict)


def copy_into(source: Path, destination: Path) -> None:
    """Docker's COPY for one source: a directory's contents, or a file (into a directory
    when the destination ends with /). Modes and timestamps kept, owner root."""
    if source.is_dir():
        shutil.copytree(source, destination, symlinks=True, dirs_exist_ok=True)
        copied = [destination, *destination.rglob("*")]
    else:
        destination.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(source, destination, follow_symlinks=False)
        copied = [destination]
    for path in copied:
        os.lchown(path, 0, 0)


def context_copy(patterns: list[str], source: str, destination: Path) -> None:
    """COPY from the build context, honouring .dockerignore."""
    base = ROOT / source.rstrip("/")
    files = [base] if base.is_file() else sorted(p for p in base.rglob("*") if p.is_file())
    for file in files:
        relative = file.relative_to(ROOT).as_posix()
        if dockerignore_excludes(patterns, relative):
            continue
        target = destination / file.relative_to(base) if base.is_dir() else destination
        copy_into(file, target)


def in_root(root: Path, path: str, workdir: str) -> Path:
    return root / posixpath.join(workdir, path).lstrip("/")


def resolve_in_root(root: Path, path: str) -> Path:
    """`path` inside `root` with its symlinks resolved there (distroless links python3 to
    the absolute /usr/bin/python3.13), not on the host."""
    current = PurePosixPath("/")
    for _ in range(40):
        target = root / posixpath.normpath(str(current / path)).lstrip("/")
        if not target.is_symlink():
            return target
        link = os.readlink(target)
        current, path = PurePosixPath(posixpath.dirname(posixpath.normpath(str(current / path)))), link
    raise AssertionError(f"too many symlinks resolving {path}")


def build_stage_command(root: Path, workdir: str, env: dict[str, str], script: str, pip_cache: Path) -> list[str]:
    """A RUN: `/bin/sh -c script` in the root with the /proc, /dev/shm Docker gives a build
    (shiv's --compile-pyc extraction needs /dev/shm), a persistent pip cache like a
    BuildKit cache mount, and the host's CA bundle for pip (these machines reach PyPI through
    a TLS-inspecting proxy whose CA only the host trusts)."""
    quoted = shlex.quote(str(root))
    # pip's cache for root inside the build root (pip's documentation, "Caching": ~/.cache/pip),
    # kept between runs so that emulating the Dockerfile's pip install does not download again.
    cache = shlex.quote(str(root / "root" / ".cache" / "pip"))
    setup = [
        "set -e",
        f"mount -t proc proc {quoted}/proc",
        f"mount -t tmpfs -o nosuid,nodev,mode=1777 shm {quoted}/dev/shm",
        f"mkdir -p {cache} && mount --bind {shlex.quote(str(pip_cache))} {cache}",
    ]
    extra = {}
    host_ca = Path("/etc/ssl/certs/ca-certificates.crt")
    if host_ca.is_file():
        setup.append(f": > {quoted}/run/host-ca.crt && mount --bind {host_ca} {quoted}/run/host-ca.crt")
        extra["PIP_CERT"] = "/run/host-ca.crt"
    assignments = " ".join(shlex.quote(f"{k}={v}") for k, v in {**env, **extra}.items())
    setup.append(
        f"exec env -i {assignments} unshare --root={quoted} --wd={shlex.quote(workdir)} "
        f"/bin/sh -c {shlex.quote(script)}"
    )
    return ["unshare", "--mount", "--propagation", "private", "/bin/sh", "-c", "\n".join(setup)]


def apply_env(env: dict[str, str], value: str) -> None:
    """ENV KEY=VALUE ... (the only form used here; the legacy `ENV KEY VALUE` is refused)."""
    for assignment in shlex.split(value):
        name, equals, setting = assignment.partition("=")
        assert equals, f"ENV {value}: write KEY=VALUE"
        env[name] = setting


def build_image(plan: Plan, roots: Roots, directory: Path) -> Image:
    """Run the Dockerfile's instructions as Docker would, stage by stage. An instruction
    the emulation does not know fails here, so the Dockerfile cannot drift past the test."""
    timings: dict[str, float] = {}
    patterns = read_dockerignore()
    pip_cache = CACHE / "pip"
    pip_cache.mkdir(parents=True, exist_ok=True)
    started = time.monotonic()
    build = directory / "build"
    run(["cp", "-a", "--reflink=auto", str(roots.build), str(build)])
    workdir, env = "/", dict(DEBIAN_ENV)
    for instruction in plan.build.instructions:
        keyword, value = instruction.keyword, instruction.value
        if keyword == "RUN" and "apt-get install" in value:
            continue  # the cached build root was bootstrapped with exactly these packages
        if keyword == "RUN":
            run(build_stage_command(build, workdir, env, value, pip_cache), timeout=900)
        elif keyword == "WORKDIR":
            workdir = posixpath.join(workdir, value)
            in_root(build, workdir, "/").mkdir(parents=True, exist_ok=True)
        elif keyword == "COPY":
            copy = Copy.parse(value)
            assert copy.stage is None, "the build stage copies from the context only"
            for source in copy.sources:
                destination = in_root(build, copy.destination, workdir)
                if copy.destination.endswith("/") and (ROOT / source).is_file():
                    destination = destination / posixpath.basename(source)
                context_copy(patterns, source, destination)
        elif keyword == "ENV":
            apply_env(env, value)
        else:
            raise AssertionError(f"the emulation does not know {keyword} in the build stage")
    timings["build stage"] = time.monotonic() - started
    started = time.monotonic()
    image = Image(directory / "image", build, "0:0", "/", dict(DISTROLESS_ENV), [], [], [], timings)
    run(["cp", "-a", "--reflink=auto", str(roots.runtime), str(image.root)])
    for instruction in plan.runtime.instructions:
        keyword, value = instruction.keyword, instruction.value
        if keyword == "COPY":
            copy = Copy.parse(value)
            assert copy.stage == plan.build.name, "the runtime stage copies from the build stage only"
            for source in copy.sources:
                destination = in_root(image.root, copy.destination, image.workdir)
                if copy.destination.endswith("/") and in_root(build, source, "/").is_file():
                    destination = destination / posixpath.basename(source)
                copy_into(in_root(build, source, "/"), destination)
        elif keyword == "WORKDIR":
            image.workdir = posixpath.join(image.workdir, value)
            in_root(image.root, image.workdir, "/").mkdir(parents=True, exist_ok=True)
        elif keyword == "ENV":
            apply_env(image.env, value)
        elif keyword == "USER":
            image.user = value
        elif keyword == "ENTRYPOINT":
            image.entrypoint = instruction.exec_form()
        elif keyword == "CMD":
            image.cmd = instruction.exec_form()
        elif keyword == "HEALTHCHECK":
            image.healthcheck = Instruction(keyword, value.partition("CMD ")[2]).exec_form()
        elif keyword != "EXPOSE":
            raise AssertionError(f"the emulation does not know {keyword} in the runtime stage")
    timings["runtime stage"] = time.monotonic() - started
    return image


def container_command(
    image: Image, argv: list[str], env: dict[str, str], app: Path, user: str | None = None
) -> list[str]:
    """`docker run --read-only -v APP:/app` for `argv`, on the host's network: the image
    root bind-mounted read-only, a fresh /dev with Docker's device nodes and a tmpfs
    /dev/shm, its own PID namespace (the command is PID 1) with /proc, then chroot, the
    image's WORKDIR, and the user with no supplementary groups."""
    root = shlex.quote(str(image.root))
    uid, _, gid = (user or image.user).partition(":")
    setup = [
        "set -e",
        f"mount --bind {root} {root}",
        f"mount -o remount,bind,ro {root}",
        f"mount -t tmpfs -o nosuid,mode=755,size=64k tmpfs {root}/dev",
        *(f": > {root}/dev/{name} && mount --bind /dev/{name} {root}/dev/{name}" for name in DEVICES),
        f"mkdir {root}/dev/shm && mount -t tmpfs -o nosuid,nodev,noexec,mode=1777,size=64m shm {root}/dev/shm",
        f"ln -s /proc/self/fd {root}/dev/fd",
        f"mount --bind {shlex.quote(str(app))} {root}/app",
    ]
    home = next(
        (
            line.split(":")[5]
            for line in (image.root / "etc/passwd").read_text().splitlines()
            if line.split(":")[2] == uid
        ),
        "/",
    )
    environment = {**image.env, "HOME": home, "HOSTNAME": "neuronetz-emulated", **env}
    assignments = " ".join(shlex.quote(f"{k}={v}") for k, v in environment.items())
    setup.append(
        f"exec env -i {assignments} unshare --pid --fork --kill-child --mount-proc=/proc "
        f"--root={root} --wd={shlex.quote(image.workdir)} --setgid={gid or uid} --setuid={uid} -- " + shlex.join(argv)
    )
    return ["unshare", "--mount", "--propagation", "private", "/bin/sh", "-c", "\n".join(setup)]


def emulation_available() -> None:
    if os.geteuid() != 0:
        unavailable("the image emulation needs root (chroot, mount, namespaces)")
    require_tool("debootstrap", "debootstrap")
    for tool in ("unshare", "chroot", "mount"):
        require_tool(tool, "util-linux/coreutils")
    probe = run(["unshare", "--mount", "--pid", "--fork", "true"], check=False)
    if probe.returncode != 0:
        unavailable(f"this machine cannot create mount/PID namespaces: {probe.stderr.strip()}")


@pytest.fixture(scope="module")
def image(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Image]:
    emulation_available()
    plan = read_plan()
    started = time.monotonic()
    roots = cached_roots(plan)
    rootfs_seconds = time.monotonic() - started
    directory = tmp_path_factory.mktemp("image")
    built = build_image(plan, roots, directory)
    built.timings = {"debian roots (cached unless new)": rootfs_seconds, **built.timings}
    yield built
    shutil.rmtree(directory, ignore_errors=True)


@dataclass
class Container:
    image: Image
    app: Path
    env: dict[str, str]
    port: int
    process: subprocess.Popen[bytes]
    log: Path
    started_in: float

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def exec(
        self, *argv: str, user: str | None = None, env: dict[str, str] | None = None
    ) -> subprocess.CompletedProcess[str]:
        """`docker exec`: another process on the same image, mounts and environment."""
        command = container_command(self.image, list(argv), {**self.env, **(env or {})}, self.app, user)
        return run(command, check=False, timeout=60)

    def pid(self) -> int:
        """The host's PID of the container's PID 1 (unshare's only child)."""
        children = Path(f"/proc/{self.process.pid}/task/{self.process.pid}/children").read_text().split()
        assert len(children) == 1, children
        return int(children[0])


def database_url_with_user(url: str) -> str:
    """The container's passwd knows only its own users: name the database role."""
    parts = urlsplit(url)
    if parts.username:
        return url
    return urlunsplit(parts._replace(netloc=f"{getpass.getuser()}@{parts.netloc}"))


@pytest.fixture(scope="module")
def container(image: Image, database_url: str, redis_url: str, redis_prefix: str) -> Iterator[Container]:
    app = Path(tempfile.mkdtemp(prefix="neuronetz-app-"))
    port = free_port()
    # As in compose: the port and the (empty) backends come from /app/.env, the secrets and
    # service URLs from the environment.
    (app / ".env").write_text(f"GATEWAY_PORT={port}\nOLLAMA_BACKENDS=\n")
    # The README's permissions: .env holds secrets, so only root and the gateway's group read it.
    os.chown(app / ".env", 0, 10001)
    (app / ".env").chmod(0o640)
    app.chmod(0o755)
    env = {
        "DATABASE_URL": database_url_with_user(database_url),
        "REDIS_URL": redis_url,
        "REDIS_KEY_PREFIX": redis_prefix,
        "GATEWAY_SECRET": secrets.token_hex(32),
    }
    log = app.parent / f"{app.name}.log"
    command = container_command(image, [*image.entrypoint, *image.cmd], env, app)
    started = time.monotonic()
    with log.open("wb") as output:
        process = subprocess.Popen(command, stdout=output, stderr=subprocess.STDOUT)
    running = Container(image, app, env, port, process, log, 0.0)
    try:
        deadline = time.monotonic() + 60
        while http_status(running.url + "/healthz", timeout=0.5) != 200:
            assert process.poll() is None, f"serve exited with {process.returncode}:\n{log.read_text()}"
            assert time.monotonic() < deadline, f"no /healthz within 60 s:\n{log.read_text()}"
            time.sleep(0.02)
        running.started_in = time.monotonic() - started
        yield running
    finally:
        if process.poll() is None:
            with contextlib.suppress(FileNotFoundError, AssertionError, ValueError):
                os.kill(running.pid(), signal.SIGTERM)
            try:
                process.wait(40)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
        shutil.rmtree(app, ignore_errors=True)
        log.unlink(missing_ok=True)


EMULATION = pytest.mark.timeout(1800)


@EMULATION
def test_image_has_no_shell_and_the_binary_names_its_interpreter(image: Image) -> None:
    root = image.root
    for absent in ("bin/sh", "bin/bash", "usr/bin/env", "usr/bin/dash"):
        assert not (root / absent).exists(), f"/{absent} is not in distroless; the emulation must not have it"
    binary = in_root(root, image.entrypoint[0], "/")
    shebang = binary.read_bytes().split(b"\n", 1)[0].decode()
    plan = read_plan()
    assert shebang == f"#!{plan.python}"
    assert resolve_in_root(root, plan.python).is_file(), f"{plan.python} is in the runtime image"
    with zipfile.ZipFile(binary) as archive:
        environment = json.loads(archive.read("environment.json"))
    assert environment["root"] == plan.extraction_root
    extracted = list((root / plan.extraction_root.lstrip("/")).glob("neuronetz-gateway_*/site-packages/neuronetz"))
    assert len(extracted) == 1, "exactly one extraction, under the binary's own name"


@EMULATION
def test_build_and_runtime_images_carry_the_same_python(image: Image) -> None:
    def version(root: Path, python: str) -> str:
        return run(["chroot", str(root), python, "-c", "import sys; print(sys.version)"]).stdout.strip()

    built_with = version(image.build_root, "/usr/bin/python3")
    runs_on = version(image.root, "/usr/bin/python3")
    assert built_with == runs_on, "environment markers depend on the full version (redis: async-timeout < 3.11.3)"
    assert runs_on.startswith(DISTROLESS_PYTHON[read_plan().release] + ".")


def pyc_flags(directory: Path) -> set[int]:
    """PEP 552 flags of every .pyc below `directory`, after checking each source has one:
    0 = timestamp, 0b01 = hash-based and unchecked, 0b11 = hash-based and checked."""
    sources = list(directory.rglob("*.py"))
    uncompiled = [s for s in sources if not list(s.parent.glob(f"__pycache__/{s.stem}.cpython-*.pyc"))]
    assert sources, f"no sources in {directory}"
    assert not uncompiled, f"no .pyc beside {uncompiled[:5]}"
    return {int.from_bytes(path.read_bytes()[4:8], "little") for path in directory.rglob("*.pyc")}


@EMULATION
def test_bytecode_is_used_as_it_is_on_the_read_only_root(image: Image) -> None:
    plan = read_plan()
    # The extraction's are unchecked: valid whatever a COPY does to the files' timestamps.
    assert pyc_flags(in_root(image.root, plan.extraction_root, "/")) == {1}
    # The standard library's are checked against the source, which may come from another
    # build of the python3.13 package than the build stage's.
    assert pyc_flags(image.root / f"usr/lib/python{DISTROLESS_PYTHON[plan.release]}") == {3}
    app = Path(tempfile.mkdtemp(prefix="neuronetz-app-"))
    app.chmod(0o755)
    try:
        result = run(container_command(image, [*image.entrypoint, "selfcheck"], {"PYTHONVERBOSE": "1"}, app))
    finally:
        shutil.rmtree(app, ignore_errors=True)
    loaded_from_source = re.findall(r"code object from '(/\S+\.py)'", result.stderr)
    assert not loaded_from_source, f"compiled at start instead of read from .pyc: {loaded_from_source[:5]}"
    assert re.search(r"__pycache__/cli\.cpython-\d+\.pyc matches .*/neuronetz/cli\.py", result.stderr)


@EMULATION
def test_image_serves_healthz_as_10001_on_a_read_only_root(container: Container) -> None:
    with urllib.request.urlopen(container.url + "/healthz", timeout=5) as response:
        assert response.status == 200
        assert json.loads(response.read()) == {"status": "ok"}
    # No backend is configured: not ready, by design (README, Development).
    assert http_status(container.url + "/readyz") == 503
    status = Path(f"/proc/{container.pid()}/status").read_text()
    assert re.search(r"^Uid:\s+10001\s+10001\s+10001\s+10001$", status, re.MULTILINE), status
    assert re.search(r"^Gid:\s+10001\s+10001\s+10001\s+10001$", status, re.MULTILINE), status
    assert re.search(r"^Groups:\s*$", status, re.MULTILINE), "no supplementary groups"
    probe = (
        "for path in ('/probe', '/tmp/probe', '/app/probe', '/opt/neuronetz/probe', '/dev/shm/probe'):\n"
        "    try:\n"
        "        open(path, 'w').close()\n"
        "        print(path, 'writable')\n"
        "    except OSError as exc:\n"
        "        print(path, exc.strerror)\n"
    )
    who = container.exec(
        "/usr/bin/python3", "-c", "import getpass, grp; print(getpass.getuser(), grp.getgrgid(10001)[0])"
    )
    assert who.stdout.split() == ["gateway", "gateway"], who.stderr
    result = container.exec("/usr/bin/python3", "-c", probe)
    assert result.returncode == 0, result.stderr
    outcome = dict(line.split(" ", 1) for line in result.stdout.strip().splitlines())
    assert outcome == {
        "/probe": "Read-only file system",
        "/tmp/probe": "Read-only file system",
        "/app/probe": "Permission denied",
        "/opt/neuronetz/probe": "Read-only file system",
        "/dev/shm/probe": "writable",
    }


@EMULATION
def test_image_healthcheck_command_follows_the_server(container: Container) -> None:
    assert container.exec(*container.image.healthcheck).returncode == 0
    elsewhere = container.exec(*container.image.healthcheck, env={"GATEWAY_PORT": str(free_port())})
    assert elsewhere.returncode == 1
    assert "Traceback" not in elsewhere.stderr


@EMULATION
def test_admin_commands_run_in_the_image_and_the_key_authenticates(container: Container) -> None:
    binary = container.image.entrypoint
    tenant = f"deploy-{secrets.token_hex(3)}"
    created = container.exec(*binary, "create-tenant", "--name", tenant)
    assert created.returncode == 0, created.stderr
    keyed = container.exec(*binary, "create-key", "--tenant", tenant, "--name", "first")
    assert keyed.returncode == 0, keyed.stderr
    key = keyed.stdout.strip()
    assert re.fullmatch(r"nz_[a-z0-9]{8}[A-Za-z0-9_-]{32,}", key), keyed.stdout
    listed = container.exec(*binary, "list-keys", "--tenant", tenant, "--json")
    assert listed.returncode == 0, listed.stderr
    assert key[:11] in listed.stdout, "the key's public prefix is listed"
    assert key not in listed.stdout, "the secret never is"
    assert http_status(container.url + "/api/tags") == 401
    request = urllib.request.Request(container.url + "/api/tags", headers={"Authorization": f"Bearer {key}"})
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            authenticated = response.status
    except urllib.error.HTTPError as exc:
        authenticated = exc.code
    # Past authentication; with no backend configured the gateway answers 503.
    assert authenticated == 503


@EMULATION
def test_add_backend_needs_root_in_the_container_and_then_edits_the_mounted_env_file(container: Container) -> None:
    binary = container.image.entrypoint
    before = (container.app / ".env").read_text()
    refused = container.exec(*binary, "add-backend", "http://ollama:11434")
    assert refused.returncode == 1
    assert "Traceback" not in refused.stderr
    assert "OLLAMA_BACKENDS=" in refused.stderr + refused.stdout, "the line to paste by hand"
    assert (container.app / ".env").read_text() == before
    try:
        # The README's `docker exec -u "$(stat -c %u:%g .env)"`: the owner may write the
        # mounted directory, and the rewritten file keeps the group the gateway reads it by.
        added = container.exec(*binary, "add-backend", "http://ollama:11434", user="0:10001")
        assert added.returncode == 0, added.stderr
        assert "OLLAMA_BACKENDS=http://ollama:11434" in (container.app / ".env").read_text()
        still_readable = container.exec("/usr/bin/python3", "-c", "print(open('/app/.env').read())")
        assert "OLLAMA_BACKENDS=http://ollama:11434" in still_readable.stdout, still_readable.stderr
    finally:
        (container.app / ".env").write_text(before)


@EMULATION
def test_report_image_size_and_start_time(image: Image, container: Container) -> None:
    """Not a check: the numbers the README and the issue ask for, printed with -s."""
    plan = read_plan()
    binary = in_root(image.root, plan.binary, "/").stat().st_size
    extracted = sum(p.stat().st_size for p in in_root(image.root, plan.extraction_root, "/").rglob("*") if p.is_file())
    assert binary > 0
    assert extracted > binary
    print(f"\nimage content: binary {binary / 1e6:.1f} MB + extraction {extracted / 1e6:.1f} MB")
    print(f"emulated container: first /healthz 200 after {container.started_in:.2f} s")
    for phase, seconds in image.timings.items():
        print(f"{phase}: {seconds:.1f} s")


@EMULATION
def test_image_stops_cleanly_on_sigterm_as_pid_1(container: Container) -> None:
    # Last in this file: it ends the container the tests above shared.
    os.kill(container.pid(), signal.SIGTERM)
    assert container.process.wait(40) == 0, container.log.read_text()
