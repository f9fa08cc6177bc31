"""The deploy files (deploy/helm, deploy/k8s) agree with the code: commands name modules that
exist, every CB_* variable is a settings field, ports and task queues are the settings' own,
and the Helm values register exactly workflows.search_attributes.ALL."""

from __future__ import annotations

import ast
import importlib.util
import json
import sys
from collections.abc import Iterator
from datetime import date
from pathlib import Path
from typing import Any

import pytest
from temporalio.api.enums.v1 import IndexedValueType

from carriers.gate import MAX_LOCAL_SHARE, CarrierGates
from carriers.loader import default_registry
from settings import PROJECT_ROOT, Settings
from workflows import search_attributes

yaml = pytest.importorskip("yaml", reason="PyYAML is needed to read deploy/ (pip install pyyaml)")

DEPLOY = PROJECT_ROOT / "deploy"
K8S_FILES = sorted((DEPLOY / "k8s").glob("*.yaml"))
HELM_VALUES = DEPLOY / "helm" / "temporal-values.yaml"
ENV_PREFIX = "CB_"
# the Secrets deploy/README.md tells operators to create
SECRETS = {"carrier-billing-secrets", "carrier-billing-codec"}
CODEC_MODULE = "codec.server"


def _load_all(path: Path) -> list[dict[str, Any]]:
    return [doc for doc in yaml.safe_load_all(path.read_text(encoding="utf-8")) if doc is not None]


def _objects() -> list[dict[str, Any]]:
    return [doc for path in K8S_FILES for doc in _load_all(path)]


def _find(kind: str, name: str) -> dict[str, Any]:
    for doc in _objects():
        if doc["kind"] == kind and doc["metadata"]["name"] == name:
            return doc
    raise AssertionError(f"no {kind} {name} in deploy/k8s")


def _containers() -> Iterator[tuple[str, dict[str, Any]]]:
    for doc in _objects():
        if doc["kind"] == "Deployment":
            for container in doc["spec"]["template"]["spec"]["containers"]:
                yield doc["metadata"]["name"], container


def _helm() -> dict[str, Any]:
    values = yaml.safe_load(HELM_VALUES.read_text(encoding="utf-8"))
    assert isinstance(values, dict)
    return values


def _configmap() -> dict[str, str]:
    data = _find("ConfigMap", "carrier-billing-config")["data"]
    assert all(isinstance(v, str) for v in data.values()), "ConfigMap values must be strings"
    return dict(data)


def _field(env_name: str) -> str:
    assert env_name.startswith(ENV_PREFIX), env_name
    return env_name[len(ENV_PREFIX):].lower()


def _codec_settings_fields() -> set[str] | None:
    if importlib.util.find_spec(CODEC_MODULE) is None:
        return None
    from codec.server import CodecServerSettings
    return set(CodecServerSettings.model_fields)


def _env_cases() -> list[tuple[str, str]]:
    return [(deployment, env["name"]) for deployment, container in _containers()
            for env in container.get("env", []) if env["name"].startswith(ENV_PREFIX)]


def _argparse_default(path: Path, option: str) -> Any:
    """The ``default=`` of ``parser.add_argument(option, ...)`` in a module's source."""
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)
                and node.func.attr == "add_argument" and node.args
                and isinstance(node.args[0], ast.Constant) and node.args[0].value == option):
            for keyword in node.keywords:
                if keyword.arg == "default":
                    return ast.literal_eval(keyword.value)
    raise AssertionError(f"{path.name} has no {option} argument with a default")


def _option(command: list[str], option: str) -> str:
    assert option in command, f"{option} missing from {command}"
    return command[command.index(option) + 1]


@pytest.mark.parametrize("path", [*K8S_FILES, HELM_VALUES], ids=lambda p: p.name)
def test_every_file_parses_and_every_object_is_named(path: Path) -> None:
    docs = _load_all(path)
    assert docs, f"{path.name} is empty"
    if path == HELM_VALUES:
        return
    for doc in docs:
        assert {"apiVersion", "kind", "metadata"} <= set(doc), doc
        assert doc["metadata"]["name"]
        if doc["kind"] != "Namespace":
            assert doc["metadata"]["namespace"] == "carrier-billing", doc["metadata"]


def test_the_three_processes_are_deployed() -> None:
    assert {name for name, _ in _containers()} == {"billing-worker", "callback-receiver",
                                                   "codec-server"}


@pytest.mark.parametrize("deployment", ["billing-worker", "callback-receiver", "codec-server"])
def test_container_command_points_at_code_that_exists(deployment: str) -> None:
    (container,) = [c for name, c in _containers() if name == deployment]
    command = container["command"]
    assert command[0] == "python", command
    if command[1] == "-m":
        module = command[2]
        if module == CODEC_MODULE and importlib.util.find_spec(CODEC_MODULE) is None:
            pytest.skip(f"{CODEC_MODULE} does not exist yet (being built): command not checked")
        assert importlib.util.find_spec(module) is not None, f"no module {module}"
    else:
        script = PROJECT_ROOT / command[1]
        assert script.is_file(), f"{deployment} runs {command[1]}, which does not exist"
        assert 'if __name__ == "__main__":' in script.read_text(encoding="utf-8")


@pytest.mark.parametrize(("deployment", "env_name"), _env_cases())
def test_env_variable_is_a_settings_field(deployment: str, env_name: str) -> None:
    field = _field(env_name)
    if deployment == "codec-server":
        fields = _codec_settings_fields()
        if fields is None:
            pytest.skip(f"{CODEC_MODULE} does not exist yet: {env_name} not checked")
        assert field in fields, f"{env_name} is not a field of codec.server.CodecServerSettings"
        return
    if field not in Settings.model_fields and field.startswith("codec_"):
        codec_fields = _codec_settings_fields()
        if codec_fields is not None and field in codec_fields:
            pytest.skip(f"settings.Settings has no {field} yet (the codec's keys join it with the "
                        "codec integration); the worker ignores it until then")
    assert field in Settings.model_fields, f"{deployment}: {env_name} is not a settings field"


@pytest.mark.parametrize("key", sorted(_configmap()) if K8S_FILES else [])
def test_configmap_key_is_a_settings_field(key: str) -> None:
    assert _field(key) in Settings.model_fields, f"ConfigMap key {key} is not a settings field"


def test_configmap_values_are_valid_settings(monkeypatch: pytest.MonkeyPatch) -> None:
    for key, value in _configmap().items():
        monkeypatch.setenv(key, value)
    settings = Settings(_env_file=None)
    defaults = Settings.model_fields
    # clients outside the cluster (starter.py, the bench) use the defaults: the same queue
    assert settings.task_queue == defaults["task_queue"].default
    assert settings.callback_port == defaults["callback_port"].default
    assert settings.callback_base_url.startswith("https://")
    assert settings.deployment_id != defaults["deployment_id"].default, "production is not 'dev'"


def test_secrets_are_referenced_never_written() -> None:
    assert not [doc for doc in _objects() if doc["kind"] == "Secret"], \
        "secrets are created by the operator (deploy/README.md), never committed"
    readme = (DEPLOY / "README.md").read_text(encoding="utf-8")
    for deployment, container in _containers():
        for env in container.get("env", []):
            ref = env.get("valueFrom", {}).get("secretKeyRef")
            if ref is None:
                continue
            assert ref["name"] in SECRETS, f"{deployment}: unknown Secret {ref['name']}"
            assert ref["key"] == env["name"], f"{deployment}: {env['name']} <- key {ref['key']}"
            assert ref["name"] in readme and ref["key"] in readme, \
                f"deploy/README.md does not tell how to create {ref['name']}/{ref['key']}"


def test_carrier_secrets_reach_worker_and_callback_receiver() -> None:
    for deployment in ("billing-worker", "callback-receiver"):
        (container,) = [c for name, c in _containers() if name == deployment]
        names = {e["name"] for e in container["env"]}
        assert {"CB_CARRIER_SECRETS", "CB_DATABASE_URL"} <= names, deployment
        assert {"configMapRef": {"name": "carrier-billing-config"}} in container["envFrom"]


def test_callback_receiver_port_is_the_settings_port() -> None:
    port = Settings.model_fields["callback_port"].default
    (container,) = [c for name, c in _containers() if name == "callback-receiver"]
    assert [p["containerPort"] for p in container["ports"]] == [port]
    assert _configmap()["CB_CALLBACK_PORT"] == str(port)
    service = _find("Service", "callback-receiver")
    assert [p["targetPort"] for p in service["spec"]["ports"]] == [port]


def test_codec_server_port_is_the_module_default() -> None:
    (container,) = [c for name, c in _containers() if name == "codec-server"]
    port = int(_option(container["command"], "--port"))
    assert port == 8081
    assert [p["containerPort"] for p in container["ports"]] == [port]
    assert [p["targetPort"] for p in _find("Service", "codec-server")["spec"]["ports"]] == [port]
    # off loopback the server demands a bearer token
    assert _option(container["command"], "--host") == "0.0.0.0"
    assert "CB_CODEC_SERVER_TOKEN" in {e["name"] for e in container["env"]}
    origins = next(e["value"] for e in container["env"] if e["name"] == "CB_CODEC_CORS_ORIGINS")
    assert all(o.startswith("https://") for o in json.loads(origins))
    spec = importlib.util.find_spec(CODEC_MODULE)
    if spec is None or spec.origin is None:
        pytest.skip(f"{CODEC_MODULE} does not exist yet: its default port not checked")
    assert _argparse_default(Path(spec.origin), "--port") == port


def test_callback_receiver_listens_beyond_loopback() -> None:
    tree = ast.parse((PROJECT_ROOT / "callback_receiver.py").read_text(encoding="utf-8"))
    for node in ast.walk(tree):
        if (isinstance(node, ast.Call) and getattr(node.func, "attr", None) == "TCPSite"
                and len(node.args) > 1 and isinstance(node.args[1], ast.Constant)):
            assert node.args[1].value not in ("127.0.0.1", "localhost", "::1")


def test_services_pdbs_and_hpa_select_their_pods() -> None:
    labels = {doc["metadata"]["name"]: doc["spec"]["template"]["metadata"]["labels"]
              for doc in _objects() if doc["kind"] == "Deployment"}
    for doc in _objects():
        if doc["kind"] == "Service":
            selector = doc["spec"]["selector"]
        elif doc["kind"] == "PodDisruptionBudget":
            selector = doc["spec"]["selector"]["matchLabels"]
        else:
            continue
        assert any(selector.items() <= pod.items() for pod in labels.values()), doc["metadata"]
        ports = {p["containerPort"] for name, c in _containers() for p in c.get("ports", [])
                 if selector.items() <= labels[name].items()}
        if doc["kind"] == "Service":
            assert {p["targetPort"] for p in doc["spec"]["ports"]} <= ports
    hpa = _find("HorizontalPodAutoscaler", "billing-worker")
    target = hpa["spec"]["scaleTargetRef"]
    assert (target["kind"], target["name"]) == ("Deployment", "billing-worker")
    deployment = _find("Deployment", "billing-worker")
    assert hpa["spec"]["minReplicas"] <= deployment["spec"]["replicas"] <= hpa["spec"]["maxReplicas"]


def test_each_pods_share_of_a_carriers_local_calls_assumes_the_most_pods() -> None:
    """Local charges are paced per pod (carriers/gate.py): sized for the autoscaler's maximum,
    all pods together stay within each carrier's rate however many run."""
    data = _configmap()
    hpa = _find("HorizontalPodAutoscaler", "billing-worker")
    assert int(data["CB_WORKER_PROCESSES"]) >= hpa["spec"]["maxReplicas"]
    assert 0.0 <= float(data["CB_LOCAL_CALL_SHARE"]) <= MAX_LOCAL_SHARE
    settings = Settings(local_call_share=float(data["CB_LOCAL_CALL_SHARE"]),
                        worker_processes=int(data["CB_WORKER_PROCESSES"]), _env_file=None)
    CarrierGates(default_registry(), settings.max_concurrent_activities_per_carrier,
                 settings.local_call_share, settings.worker_processes)


def test_helm_values_register_exactly_the_search_attributes() -> None:
    (job,) = [o for o in _helm()["extraObjects"] if o["metadata"]["name"] == "billing-search-attributes"]
    script = "\n".join(job["spec"]["template"]["spec"]["containers"][0]["args"])
    (loop,) = [line for line in script.splitlines() if line.strip().startswith("for spec in")]
    registered = dict(spec.split(":") for spec in loop.split(" in ", 1)[1].split(";")[0].split())
    # the CLI's type names: KEYWORD -> Keyword, KEYWORD_LIST -> KeywordList
    expected = {key.name: IndexedValueType.Name(IndexedValueType.ValueType(int(key.indexed_value_type)))
                .removeprefix("INDEXED_VALUE_TYPE_").title().replace("_", "")
                for key in search_attributes.ALL}
    assert registered == expected
    namespace = _configmap()["CB_TEMPORAL_NAMESPACE"]
    assert script.count(f"--namespace {namespace}") == 2
    assert job["spec"]["template"]["spec"]["containers"][0]["env"] == [
        {"name": "TEMPORAL_ADDRESS", "value": "temporal-frontend:7233"}]


def test_helm_values_cluster_settings() -> None:
    server = _helm()["server"]
    persistence = server["config"]["persistence"]
    shards = persistence["numHistoryShards"]
    assert shards > 0 and shards & (shards - 1) == 0, "a power of two"
    capacity = (PROJECT_ROOT / "docs" / "capacity.md").read_text(encoding="utf-8")
    assert f"{shards:,}" in capacity, "docs/capacity.md must derive the shard count"
    stores = persistence["datastores"]
    assert {"cassandra", "sql"} & set(stores[persistence["defaultStore"]])
    assert "elasticsearch" in stores[persistence["visibilityStore"]]
    for service in ("frontend", "history", "matching", "worker"):
        assert server[service]["replicaCount"] >= 2, service
    namespaces = [n["name"] for n in server["config"]["namespaces"]["namespace"]]
    assert _configmap()["CB_TEMPORAL_NAMESPACE"] in namespaces
    address = _configmap()["CB_TEMPORAL_ADDRESS"]
    assert address.split(".")[0] == "temporal-frontend"
    assert address.rsplit(":", 1)[1] == "7233"


def test_temporal_ui_decodes_through_the_codec_server() -> None:
    env = {e["name"]: e["value"] for e in _helm()["web"]["additionalEnv"]}
    assert env["TEMPORAL_CODEC_ENDPOINT"].startswith("https://")
    _find("Service", "codec-server")


def test_capacity_document_quotes_the_model() -> None:
    # loaded from its file: scripts/ is not a package
    spec = importlib.util.spec_from_file_location("capacity_model",
                                                  PROJECT_ROOT / "scripts" / "capacity_model.py")
    assert spec is not None and spec.loader is not None
    capacity_model = importlib.util.module_from_spec(spec)
    sys.modules.setdefault("capacity_model", capacity_model)  # its dataclasses look it up
    spec.loader.exec_module(capacity_model)
    build, report = capacity_model.build, capacity_model.report

    model = build(date(2027, 1, 15))
    assert sum(model.by_utc_hour) == pytest.approx(100_000_000)
    peak = f"{model.peak_per_second:,.0f} charges/s"
    capacity = (PROJECT_ROOT / "docs" / "capacity.md").read_text(encoding="utf-8")
    assert peak in capacity, f"docs/capacity.md does not quote the model's peak ({peak})"
    assert report(model).splitlines()[0] in capacity
