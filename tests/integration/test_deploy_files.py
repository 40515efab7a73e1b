"""The deploy files, checked by the tools that run here: the compose file by docker-compose,
the systemd unit by systemd-analyze, the Kubernetes manifests against the Kubernetes
schemas (kubernetes-validate, offline), and the NATS config by nats-server itself. Each
also covers every service ``autoserve run`` knows, and every environment variable the
code reads is documented in deploy/README.md."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from autoserve_cli.services import SERVICES
from autoserve_runtime import nats_server_binary
from autoserve_runtime.observability import DEFAULT_PORTS

from ..conftest import plant_secret

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"
BIN = Path(sys.executable).parent


def run(*command: str, cwd: Path | None = None, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(command, capture_output=True, text=True, timeout=120, cwd=cwd, env=env)


@pytest.fixture(scope="module")
def deploy_copy(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """deploy/ as an operator has it after ``deploy/make-secrets.sh``."""
    root = tmp_path_factory.mktemp("checkout")
    shutil.copytree(DEPLOY, root / "deploy", ignore=shutil.ignore_patterns("secrets"))
    (root / "examples").mkdir()
    shutil.copy(ROOT / "examples" / "demo.yaml", root / "examples" / "demo.yaml")
    made = run("sh", str(root / "deploy" / "make-secrets.sh"))
    assert made.returncode == 0, made.stderr
    for password in (root / "deploy" / "secrets").glob("*.password"):  # the session's log scan looks for them
        plant_secret(password.read_text(), f"deploy secret {password.name}", allowed_in=[root / "deploy" / "secrets"])
    return root / "deploy"


def test_make_secrets_gives_the_nats_config_every_password_it_needs(deploy_copy: Path) -> None:
    secrets = deploy_copy / "secrets"
    assert secrets.stat().st_mode & 0o077 == 0
    assert all(p.stat().st_mode & 0o077 == 0 for p in secrets.iterdir())
    env = dict(line.split("=", 1) for line in (secrets / "nats.env").read_text().splitlines())
    wanted = set(re.findall(r"\$(AUTOSERVE_[A-Z]+_PASSWORD)", (DEPLOY / "nats" / "nats-server.conf").read_text()))
    assert wanted == set(env)
    checked = run(nats_server_binary(), "-c", str(deploy_copy / "nats" / "nats-server.conf"), "-t", env=env)
    assert checked.returncode == 0, checked.stderr
    # Rerunning keeps the passwords (a running system's users stay valid).
    before = (secrets / "detector.password").read_text()
    assert run("sh", str(deploy_copy / "make-secrets.sh")).returncode == 0
    assert (secrets / "detector.password").read_text() == before


def test_the_compose_file_is_valid_and_runs_every_service_with_its_own_user(deploy_copy: Path) -> None:
    compose = deploy_copy / "compose" / "compose.yaml"
    checked = run("docker-compose", "-f", str(compose), "config", "-q")
    assert checked.returncode == 0, checked.stderr
    resolved = yaml.safe_load(run("docker-compose", "-f", str(compose), "config").stdout)
    services = resolved["services"]
    assert {"nats", "clickhouse", "nginx"} <= set(services)
    for name in SERVICES:
        spec = services[name]
        assert spec["command"] == [name]
        env = spec["environment"]
        assert env["AUTOSERVE_NATS_USER"] == name
        assert env["AUTOSERVE_NATS_PASSWORD_FILE"] == f"/run/secrets/{name}_password"
        assert env["AUTOSERVE_METRICS_PORT"] == str(DEFAULT_PORTS[name])
        assert "AUTOSERVE_NATS_PASSWORD" not in env  # secrets as files, never in the environment
        assert [s if isinstance(s, str) else s["source"] for s in spec["secrets"]] == [f"{name}_password"]
        assert "/readyz" in " ".join(spec["healthcheck"]["test"])
    assert any("nats-server.conf" in str(v) for v in services["nats"]["volumes"])


def test_the_systemd_unit_template_verifies_for_every_service(tmp_path: Path) -> None:
    unit = (DEPLOY / "systemd" / "autoserve@.service").read_text()
    assert "ExecStart=/opt/autoserve/bin/autoserve run %i" in unit
    # Installed where the unit expects it; here, the virtual environment's command.
    (tmp_path / "autoserve@.service").write_text(unit.replace("/opt/autoserve/bin/autoserve", str(BIN / "autoserve")))
    for name in SERVICES:
        checked = run("systemd-analyze", "verify", str(tmp_path / f"autoserve@{name}.service"))
        assert checked.returncode == 0 and checked.stderr.strip() == "", (name, checked.stderr)
    # The check is real: a mistake is reported.
    (tmp_path / "autoserve@.service").write_text(unit.replace("KillMode=mixed", "KillMode=sometimes"))
    broken = run("systemd-analyze", "verify", str(tmp_path / "autoserve@detector.service"))
    assert "Failed to parse kill mode" in broken.stderr


def test_the_kubernetes_manifests_match_their_schemas_and_probe_each_service() -> None:
    manifest = DEPLOY / "k8s" / "autoserve.yaml"
    checked = run(str(BIN / "kubernetes-validate"), "--strict", str(manifest))
    assert checked.returncode == 0 and "ERROR" not in checked.stdout + checked.stderr, checked.stdout + checked.stderr
    assert checked.stdout.count("passed") == len(list(yaml.safe_load_all(manifest.read_text())))
    deployments = {
        d["metadata"]["name"]: d for d in yaml.safe_load_all(manifest.read_text()) if d["kind"] == "Deployment"
    }
    assert set(deployments) == {f"autoserve-{name}" for name in SERVICES}
    for name in SERVICES:
        pod = deployments[f"autoserve-{name}"]["spec"]["template"]["spec"]
        (container,) = pod["containers"]
        assert container["args"] == [name]
        env = {e["name"]: e.get("value") for e in container["env"]}
        assert env["AUTOSERVE_NATS_USER"] == name and env["AUTOSERVE_METRICS_PORT"] == str(DEFAULT_PORTS[name])
        (health,) = [p for p in container["ports"] if p["name"] == "health"]
        assert health["containerPort"] == DEFAULT_PORTS[name]
        assert container["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": "health"}
        assert container["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": "health"}
        (secret,) = [v for v in pod["volumes"] if "secret" in v]
        assert secret["secret"]["items"] == [{"key": name, "path": "nats-password"}]


def test_the_image_definition_installs_every_service_and_runs_one_by_command() -> None:
    dockerfile = (DEPLOY / "Dockerfile").read_text()
    assert "ARG BASE=python:3.11-slim" in dockerfile and "FROM ${BASE} AS runtime" in dockerfile
    assert 'ENTRYPOINT ["autoserve", "run"]' in dockerfile
    assert "-c constraints.txt" in dockerfile
    for name in SERVICES:
        assert f"./services/{name}" in dockerfile, name


def test_every_environment_variable_the_code_reads_is_in_the_deploy_readme() -> None:
    from autoserve_events import EVENTS_STREAM, PROBES_STREAM

    read: set[str] = set()
    for path in [*ROOT.glob("libs/*/src/**/*.py"), *ROOT.glob("services/*/src/**/*.py"), *ROOT.glob("cli/src/**/*.py")]:
        read |= set(re.findall(r"[\"'](AUTOSERVE_[A-Z0-9_]+)[\"']", path.read_text()))
    # NatsAuth.from_env reads AUTOSERVE_NATS_<NAME>, and <NAME>_FILE for secrets.
    bus = (ROOT / "libs" / "runtime" / "src" / "autoserve_runtime" / "bus.py").read_text()
    read |= {f"AUTOSERVE_NATS_{n}" for n in re.findall(r'(?:get|secret)\("([A-Z_]+)"\)', bus)}
    read |= {f"AUTOSERVE_NATS_{n}_FILE" for n in re.findall(r'secret\("([A-Z_]+)"\)', bus)}
    read -= {EVENTS_STREAM, PROBES_STREAM}
    readme = (DEPLOY / "README.md").read_text()
    table = set(re.findall(r"^\| `(AUTOSERVE_[A-Z0-9_]+)`", readme, re.M))
    assert len(read) > 25  # the scan found the variables
    missing = sorted(read - table)
    assert missing == [], f"add these to the table in deploy/README.md: {missing}"
