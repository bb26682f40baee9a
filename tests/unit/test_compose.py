"""docker-compose.yml and the Dockerfile, checked without a Docker engine.

The compose file is validated against the Compose specification's JSON schema
(kept beside the repository, in ``../shared/compose-spec.json``), then against
what this project needs of it: healthchecks everywhere, start order on health,
Redis private, the sandbox optional, each service the ``python -m services.NAME``
that ``make demo`` will also run, and an image that installs the same runtime
extras as ``make venv``.
"""

from __future__ import annotations

import importlib
import json
import os
import re
import shlex
import tomllib
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import yaml
from pydantic import AliasChoices
from pydantic_settings import BaseSettings

ROOT = Path(__file__).resolve().parents[2]
COMPOSE = ROOT / "docker-compose.yml"
DOCKERFILE = ROOT / "Dockerfile"
MAKEFILE = ROOT / "Makefile"
ENV_EXAMPLE = ROOT / ".env.example"
#: The Compose specification's JSON schema: the shared one beside the project when there
#: is one (the authority), else the copy kept with the tests (taken from it).
SHARED_SCHEMA = ROOT.parent / "shared" / "compose-spec.json"
SCHEMA = SHARED_SCHEMA if SHARED_SCHEMA.is_file() else ROOT / "tests" / "fixtures" / \
    "compose-spec.json"

#: Extras of `make venv` that only developers need: never in the image.
DEV_EXTRAS = frozenset({"test", "bench"})
#: Installed by `make venv` only when no redis-server is on PATH; in compose Redis
#: is its own container, so the image never needs the embedded one.
FALLBACK_EXTRAS = frozenset({"embedded-redis"})
#: Services that are not a `python -m services.NAME` of this project: Redis, and the
#: Redis Cluster of the `cluster` profile (six nodes and the service that forms it).
CLUSTER = frozenset({f"redis-node-{n}" for n in range(1, 7)} | {"redis-cluster"})
EXTERNAL = frozenset({"redis"}) | CLUSTER
#: Settings every project service must receive, interpolated with a default.
SHARED_ENV = ("REDIS_URL", "KUMEX_SYMBOLS", "KUMEX_BASE_URL")


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    data = yaml.safe_load(COMPOSE.read_text())
    assert isinstance(data, dict)
    return data


@pytest.fixture(scope="module")
def services(compose: dict[str, Any]) -> dict[str, dict[str, Any]]:
    found = compose["services"]
    assert isinstance(found, dict) and found
    return found


def _project(services: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
    return {name: svc for name, svc in services.items() if name not in EXTERNAL}


def _argv(command: str | list[str]) -> list[str]:
    return shlex.split(command) if isinstance(command, str) else list(command)


# --------------------------------------------------------------------------- schema


def test_compose_file_matches_the_compose_specification(compose: dict[str, Any]) -> None:
    schema = json.loads(SCHEMA.read_text())
    # The file says draft-07 (as "https://json-schema.org/draft-07/schema", without the
    # trailing "#" that jsonschema looks up), so name the validator explicitly.
    validator = jsonschema.Draft7Validator(schema)
    jsonschema.Draft7Validator.check_schema(schema)
    errors = sorted(validator.iter_errors(compose), key=lambda e: list(e.path))
    assert not errors, "\n".join(
        f"{'/'.join(map(str, e.path)) or '<root>'}: {e.message}" for e in errors)


# --------------------------------------------------------------------------- services


def test_expected_services_are_there(services: dict[str, dict[str, Any]]) -> None:
    assert {"redis", "sandbox", "feed", "book", "order_monitor", "strategy"} <= set(services)


def test_every_service_has_a_healthcheck(services: dict[str, dict[str, Any]]) -> None:
    for name, svc in services.items():
        check = svc.get("healthcheck")
        assert isinstance(check, dict), f"{name}: no healthcheck"
        assert not check.get("disable"), f"{name}: healthcheck disabled"
        test = check.get("test")
        assert test and _argv(test)[0] in {"CMD", "CMD-SHELL"}, f"{name}: bad test {test!r}"


def test_project_healthchecks_hit_the_service_own_port(
        services: dict[str, dict[str, Any]]) -> None:
    port_var = {"sandbox": "SANDBOX_PORT", "feed": "FEED_HTTP_PORT", "book": "BOOK_PORT",
                "order_monitor": "MONITOR_HTTP_PORT", "strategy": "STRATEGY_HTTP_PORT"}
    for name, var in port_var.items():
        env = services[name]["environment"]
        urls = [a for a in _argv(services[name]["healthcheck"]["test"]) if "/healthz" in a]
        assert urls == [f"http://127.0.0.1:{env[var]}/healthz"], name


def test_depends_on_waits_for_health(services: dict[str, dict[str, Any]]) -> None:
    for name, svc in services.items():
        deps = svc.get("depends_on", {})
        assert isinstance(deps, dict), f"{name}: depends_on must be the long form"
        for dep, how in deps.items():
            assert dep in services, f"{name} depends on unknown {dep}"
            assert how.get("condition") == "service_healthy", f"{name} -> {dep}"
    for name, svc in _project(services).items():
        if name != "sandbox":
            assert "redis" in svc.get("depends_on", {}), f"{name} must wait for redis"


def test_redis_is_not_published(services: dict[str, dict[str, Any]]) -> None:
    redis = services["redis"]
    assert not redis.get("ports"), "redis must stay on the compose network"
    assert redis["image"].split(":")[0] == "redis" and redis["image"].startswith("redis:7")
    assert "--appendonly" in _argv(redis["command"])
    assert any(str(v).startswith("redis-data:") for v in redis.get("volumes", []))


def test_the_cluster_profile_is_six_nodes_the_services_wait_for(
        services: dict[str, dict[str, Any]]) -> None:
    for name in CLUSTER:
        svc = services[name]
        assert svc.get("profiles") == ["cluster"], name
        assert svc["image"].startswith("redis:7"), name
        assert not svc.get("ports"), f"{name} must stay on the compose network"
    nodes = [services[f"redis-node-{n}"] for n in range(1, 7)]
    assert all("--cluster-enabled" in _argv(node["command"]) for node in nodes)
    form = " ".join(_argv(services["redis-cluster"]["command"]))
    assert "--cluster create" in form and "--cluster-replicas 1" in form
    assert set(services["redis-cluster"]["depends_on"]) == CLUSTER - {"redis-cluster"}
    assert "cluster_state:ok" in " ".join(_argv(services["redis-cluster"]["healthcheck"]["test"]))
    for name, svc in _project(services).items():
        if name == "sandbox":
            continue
        # Without the profile (one Redis) the dependency must not stop the stack.
        assert svc["depends_on"]["redis-cluster"].get("required") is False, name
        assert re.fullmatch(r"\$\{REDIS_CLUSTER:-false\}", svc["environment"]["REDIS_CLUSTER"])


def test_sandbox_is_an_optional_profile(services: dict[str, dict[str, Any]]) -> None:
    assert services["sandbox"].get("profiles") == ["sandbox"]
    for name, svc in services.items():
        dep = svc.get("depends_on", {}).get("sandbox")
        if dep is not None:
            # Without the profile (a real venue) the dependency must not stop the stack.
            assert dep.get("required") is False, name
    for name, svc in _project(services).items():
        assert "profiles" not in svc or name == "sandbox", f"{name} must always run"
    assert "COMPOSE_PROFILES=sandbox" in ENV_EXAMPLE.read_text().splitlines()


def test_each_command_is_python_m_an_existing_service(
        services: dict[str, dict[str, Any]]) -> None:
    for name, svc in _project(services).items():
        assert _argv(svc["command"]) == ["python", "-m", f"services.{name}"], name
        assert (ROOT / "services" / name / "__main__.py").is_file(), f"services/{name}"


def test_environment_is_a_mapping_with_interpolated_shared_settings(
        services: dict[str, dict[str, Any]]) -> None:
    for name, svc in _project(services).items():
        env = svc["environment"]
        assert isinstance(env, dict), f"{name}: environment must be a mapping"
        assert all(isinstance(v, str) for v in env.values()), f"{name}: quote every value"
        if name == "sandbox":
            continue
        for var in SHARED_ENV:
            assert re.fullmatch(rf"\$\{{{var}:-[^}}]+\}}", env[var]), f"{name}: {var}"


def _interpolated(value: str) -> str:
    """``${VAR:-default}`` -> default (what compose uses with nothing set)."""
    return re.sub(r"\$\{[A-Z_][A-Z0-9_]*:-([^}]*)\}", r"\1", value)


def _settings_class(name: str) -> type[BaseSettings]:
    module = importlib.import_module(f"services.{name}.settings")
    found = [obj for obj in vars(module).values()
             if isinstance(obj, type) and issubclass(obj, BaseSettings)
             and obj.__module__ == module.__name__]
    assert len(found) == 1, f"services.{name}.settings: {found}"
    return found[0]


def _env_names(cls: type[BaseSettings]) -> set[str]:
    """Every environment variable ``cls`` reads."""
    prefix = str(cls.model_config.get("env_prefix") or "")
    names: set[str] = set()
    for field_name, info in cls.model_fields.items():
        alias = info.validation_alias
        if isinstance(alias, AliasChoices):
            names |= {str(c) for c in alias.choices}
        elif isinstance(alias, str):
            names.add(alias)
        else:
            names.add((prefix + field_name).upper())
    return names


def test_environment_names_real_settings_with_valid_values(
        services: dict[str, dict[str, Any]], monkeypatch: pytest.MonkeyPatch) -> None:
    for name, svc in _project(services).items():
        cls = _settings_class(name)
        env = {key: _interpolated(value) for key, value in svc["environment"].items()}
        unknown = set(env) - _env_names(cls)
        assert not unknown, f"{name}: {sorted(unknown)} are not settings of {cls.__name__}"
        with monkeypatch.context() as patch:
            for key in list(os.environ):
                if key.startswith(("KUMEX_", "REDIS_", "LOG_", "BOOK_", "FEED_", "MONITOR_",
                                   "STRATEGY_", "SANDBOX_")):
                    patch.delenv(key)
            for key, value in env.items():
                patch.setenv(key, value)
            cls()  # raises on a bad value


def test_book_scales(services: dict[str, dict[str, Any]]) -> None:
    for name, svc in services.items():
        assert "container_name" not in svc, f"{name}: container_name stops --scale"
    book = services["book"]
    assert book["environment"]["BOOK_HOST"] == "0.0.0.0"
    # Each replica advertises its own address (the default, from its host name).
    assert "BOOK_PUBLIC_URL" not in book["environment"]
    (port,) = book["ports"]
    match = re.fullmatch(r"(?:[\d.]+:)?(\d+)-(\d+):8080", str(port))
    assert match, f"book must publish a host port range, got {port!r}"
    low, high = map(int, match.groups())
    assert low == 8080 and high - low + 1 >= 3
    published = [str(p) for n, s in services.items() if n != "book" for p in s.get("ports", [])]
    for spec in published:
        host_port = int(spec.rsplit(":", 2)[-2].split("-")[0])
        assert not low <= host_port <= high, f"{spec} clashes with the book's range"


def test_every_interpolated_variable_is_in_env_example() -> None:
    text = COMPOSE.read_text()
    used = set(re.findall(r"\$\{([A-Z_][A-Z0-9_]*)", text))
    documented = {line.split("=", 1)[0] for line in ENV_EXAMPLE.read_text().splitlines()
                  if line and not line.startswith("#") and "=" in line}
    assert used <= documented, f"not in .env.example: {sorted(used - documented)}"


# --------------------------------------------------------------------------- Dockerfile


def _instructions(text: str) -> list[tuple[str, str]]:
    """Dockerfile instructions as (KEYWORD, arguments), continuation lines joined."""
    out: list[tuple[str, str]] = []
    pending = ""
    for raw in text.splitlines():
        line = raw.strip()
        if not pending and (not line or line.startswith("#")):
            continue
        if line.startswith("#"):
            continue
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        full = (pending + line).strip()
        pending = ""
        keyword, _, args = full.partition(" ")
        out.append((keyword.upper(), args.strip()))
    return out


def _stages(text: str) -> list[list[tuple[str, str]]]:
    stages: list[list[tuple[str, str]]] = []
    for keyword, args in _instructions(text):
        if keyword == "FROM":
            stages.append([])
        if stages:
            stages[-1].append((keyword, args))
    return stages


def _extras_of(spec: str) -> frozenset[str]:
    """``.`` -> {}, ``.[a,b]`` -> {a, b}."""
    match = re.fullmatch(r"\.(?:\[([^\]]*)\])?", spec)
    assert match, f"not an install of the project: {spec!r}"
    return frozenset(e.strip() for e in (match.group(1) or "").split(",") if e.strip())


def _pip_install_specs(line: str) -> list[str]:
    """The project specs (``.``, ``.[x]``) of every ``pip install`` in a shell line."""
    lexer = shlex.shlex(line.rstrip("\\"), posix=True, punctuation_chars=True)
    lexer.whitespace_split = True
    commands: list[list[str]] = [[]]
    for token in lexer:
        if token in {"&&", "||", ";", "|", "&"}:
            commands.append([])
        else:
            commands[-1].append(token)
    specs: list[str] = []
    for words in commands:
        if "pip" not in words or "install" not in words:
            continue
        for word in words[words.index("install") + 1:]:
            if word.startswith(".") and not word.startswith("./"):
                specs.append(word)
    return specs


def _make_recipes(text: str) -> dict[str, tuple[list[str], list[str]]]:
    """target -> (prerequisites, recipe lines), for the simple rules of our Makefile."""
    rules: dict[str, tuple[list[str], list[str]]] = {}
    current: list[str] | None = None
    for line in text.splitlines():
        if line.startswith("\t") and current is not None:
            current.append(line.strip())
            continue
        match = re.match(r"^([^\s:=#][^:=]*?):(?!=)\s*(.*)$", line)
        if match:
            target, prereqs = match.group(1).strip(), match.group(2).split("#")[0].split()
            current = []
            rules[target] = (prereqs, current)
        elif line.strip() and not line.startswith("\t"):
            current = None
    return rules


def _make_venv_extras() -> frozenset[str]:
    rules = _make_recipes(MAKEFILE.read_text())
    assert "venv" in rules, "Makefile has no venv target"
    extras: set[str] = set()
    seen: set[str] = set()
    todo = ["venv"]
    while todo:
        target = todo.pop()
        if target in seen or target not in rules:
            continue
        seen.add(target)
        prereqs, recipe = rules[target]
        todo.extend(prereqs)
        for line in recipe:
            for spec in _pip_install_specs(line.lstrip("@")):
                extras |= _extras_of(spec)
    assert extras, "no pip install of the project found in the venv target"
    return frozenset(extras)


def _dockerfile_install_extras() -> frozenset[str]:
    stages = _stages(DOCKERFILE.read_text())
    specs = [spec for keyword, args in stages[0] if keyword == "RUN"
             for spec in _pip_install_specs(args)]
    assert len(specs) == 1, f"expected one install of the project in the builder, got {specs}"
    return _extras_of(specs[0])


def test_image_installs_the_runtime_extras_of_make_venv() -> None:
    make_extras = _make_venv_extras()
    declared = set(tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
                   .get("optional-dependencies", {}))
    assert make_extras <= declared, f"Makefile installs undeclared extras {make_extras}"
    assert _dockerfile_install_extras() == make_extras - DEV_EXTRAS - FALLBACK_EXTRAS


def test_dockerfile_is_multi_stage_slim_and_non_root() -> None:
    stages = _stages(DOCKERFILE.read_text())
    assert len(stages) >= 2
    text = DOCKERFILE.read_text()
    base = re.search(r"^ARG PYTHON_IMAGE=(\S+)$", text, re.M)
    assert base and base.group(1) == "python:3.11-slim"
    final = stages[-1]
    keywords = [k for k, _ in final]
    assert keywords[0] == "FROM" and "PYTHON_IMAGE" in final[0][1]
    # Only the venv from the builder; no compilers or package installs at run time.
    copies = [a for k, a in final if k == "COPY" and "--from=" in a]
    assert copies == ["--from=builder /opt/venv /opt/venv"]
    assert not any(k == "RUN" and re.search(r"apt-get install|pip install|gcc", a)
                   for k, a in final)
    user = [a for k, a in final if k == "USER"]
    assert user and user[-1] not in {"root", "0"}
    env = " ".join(a for k, a in final if k == "ENV")
    assert "PYTHONUNBUFFERED=1" in env
    (check,) = [a for k, a in final if k == "HEALTHCHECK"]
    # Exec form must be valid JSON, or Docker silently runs it through a shell.
    probe = json.loads(check[check.index("CMD") + 3:])
    assert probe[:2] == ["python", "-c"] and "/healthz" in probe[2] and "HEALTH_PORT" in probe[2]
    compile(probe[2], "<healthcheck>", "exec")
    (cmd,) = [a for k, a in final if k == "CMD"]
    assert json.loads(cmd) == ["python", "-m", "services.book"]


def test_dockerignore_keeps_the_context_small() -> None:
    patterns = {line.strip() for line in (ROOT / ".dockerignore").read_text().splitlines()
                if line.strip() and not line.startswith("#")}
    assert {".git", ".venv", "tests", "**/__pycache__", ".env"} <= patterns
    # What the image build needs must stay in the context.
    for needed in ("pyproject.toml", "README.md", "kumex_l3", "services"):
        assert needed not in patterns


def test_only_the_book_is_published_and_the_sandbox_control_on_loopback(
        services: dict[str, dict[str, Any]]) -> None:
    """Exposure: the book is the one public face; the sandbox's control API (faults,
    journal) only on this machine; the others (their /metrics, the strategy's /state)
    are reached on the compose network or with `docker compose exec`."""
    published = {name for name, spec in services.items() if spec.get("ports")}
    assert published == {"book", "sandbox"}
    assert all(str(p).startswith("127.0.0.1:") for p in services["sandbox"]["ports"])
    assert services["book"]["environment"]["BOOK_API_TOKEN"] == "${BOOK_API_TOKEN:-}"
    assert services["feed"]["deploy"]["replicas"] == "${FEED_REPLICAS:-2}"


def test_the_demo_runs_the_project_services_alone_with_the_cluster_profile(
        compose: dict[str, Any]) -> None:
    """``make demo`` with ``COMPOSE_PROFILES=sandbox,cluster`` starts a Redis Cluster of its
    own (kumex_l3.testing.devcluster) and runs the same services as with one Redis."""
    from services.demo import load_services

    seeds = "redis://127.0.0.1:7001/0,redis://127.0.0.1:7002/0"
    one = load_services(compose, {}, {"sandbox"}, redis_url="redis://127.0.0.1:7000/0")
    both = load_services(compose, {"REDIS_CLUSTER": "true"}, {"sandbox", "cluster"},
                         redis_url=seeds)
    assert [s.name for s in both] == [s.name for s in one]
    assert not {s.name for s in both} & EXTERNAL
    for service in both:
        if service.name != "sandbox":
            assert service.environment["REDIS_URL"] == seeds, service.name
            assert service.environment["REDIS_CLUSTER"] == "true", service.name
            assert "redis-cluster" not in service.depends_on, service.name
