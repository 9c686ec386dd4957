"""The Helm chart (infra/helm/llmpipe) as CI can check it without a cluster.

``helm lint``, then ``helm template`` piped through ``kubeconform -strict``: every rendered
resource validated against its schema, unknown fields refused. Kubernetes' own kinds use
the schemas of the ``kubernetes-validate`` package (a dev dependency, so nothing is
downloaded); KEDA's ``ScaledObject`` and Strimzi's ``KafkaTopic`` use the schemas written
from their CRDs into infra/helm/schemas/. Then what the chart says is checked against the
code: topics equal to topics/*.yaml (through ``llmpipe topics export --format strimzi``),
KEDA triggers on the topology's real consumer groups and topics, probes on the worker's
endpoints, settings that exist.

helm and kubeconform are Go programs that ``.ci/run`` builds from the Go module proxy;
without them these tests fail under CI=1 and are skipped elsewhere.
"""

from __future__ import annotations

import copy
import json
import os
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml
from typer.testing import CliRunner

from pipeline.cli.main import app
from pipeline.config import REPO_ROOT, Settings
from pipeline.contract import topology
from pipeline.transport.topics import load_specs

CHART = REPO_ROOT / "infra" / "helm" / "llmpipe"
CRD_SCHEMAS = REPO_ROOT / "infra" / "helm" / "schemas"
KUBE_VERSION = "1.33.0"
# Variables the chart sets that are not Settings fields: read by the CLI, not Settings.
CLI_VARIABLES = {"LLMPIPE_REVIEW_USERS", "LLMPIPE_REVIEW_SESSION_SECRET", "LLMPIPE_REVIEW_INSTANCE"}

# A release unlike the defaults: prefix, stages grouped, KEDA off, secrets, PostgreSQL review.
OTHER_VALUES: dict[str, Any] = {
    "topicPrefix": "prod_",
    "kafka": {"bootstrapServers": "kafka.example:9093", "strimziCluster": "main"},
    "settings": {"LLMPIPE_DELIVERY": "exactly_once", "LLMPIPE_MAX_IN_FLIGHT": 128},
    "secrets": {"LLMPIPE_MODEL_API_KEY": "sk-test", "LLMPIPE_REVIEW_DB": "postgresql://r@db/r"},
    "workers": {
        "processes": 2,
        "groups": [
            {"name": "edges", "stages": ["validate", "settle"], "replicas": 2},
            {"name": "model", "stages": ["model"], "keda": {"maxReplicaCount": 12}},
            {"name": "fallback", "stages": ["fallback"]},
        ],
    },
    "keda": {"enabled": False, "authenticationRef": "kafka-scram"},
    "review": {
        "replicas": 2,
        "usersSecret": "llmpipe-review-users",
        "persistence": {"enabled": False},
        "podDisruptionBudget": {"enabled": True},
    },
    "metrics": {"prometheus": False},
    "extraVolumes": [{"name": "kafka-tls", "secret": {"secretName": "kafka-client-tls"}}],
    "extraVolumeMounts": [{"name": "kafka-tls", "mountPath": "/etc/kafka-tls", "readOnly": True}],
    "topics": {"replicas": 3},
}
KEDA_GROUPED = {**OTHER_VALUES, "keda": {"enabled": True, "authenticationRef": "kafka-scram"}}


def _tool(name: str) -> str:
    gopath_bin = Path(os.environ.get("GOPATH") or Path.home() / "go") / "bin" / name
    found = shutil.which(name) or (str(gopath_bin) if gopath_bin.exists() else None)
    if found:
        return found
    message = f"{name} is not installed (.ci/run builds it with `go install`, see its chart step)"
    if os.environ.get("CI"):
        pytest.fail(message)
    pytest.skip(message)


@pytest.fixture(scope="module")
def helm() -> str:
    return _tool("helm")


@pytest.fixture(scope="module")
def kubeconform() -> str:
    return _tool("kubeconform")


@pytest.fixture(scope="module")
def kube_schemas(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """kubernetes-validate's schemas made standalone for kubeconform: its files point at
    one shared definitions file by an absolute URL kubeconform cannot resolve, so each
    kind gets the definitions inline (done once, for the kinds the chart renders)."""
    source = (
        Path(kubernetes_validate.__file__).parent
        / "kubernetes-json-schema"
        / f"v{KUBE_VERSION}-local-strict"
    )
    definitions = json.loads((source / "_definitions.json").read_text())["$defs"]
    root = tmp_path_factory.mktemp("kubernetes-json-schema")
    target = root / f"v{KUBE_VERSION}-standalone-strict"
    target.mkdir()
    for name in (
        "configmap-v1",
        "secret-v1",
        "service-v1",
        "persistentvolumeclaim-v1",
        "deployment-apps-v1",
        "poddisruptionbudget-policy-v1",
    ):
        text = (source / f"{name}.json").read_text().replace('"/api/_definitions.json#', '"#')
        schema = json.loads(text)
        schema.pop("$id", None)
        schema["$defs"] = definitions
        (target / f"{name}.json").write_text(json.dumps(schema))
    return root


def render(helm: str, values: dict[str, Any] | None = None, tmp: Path | None = None) -> str:
    args = [helm, "template", "rel", str(CHART), "--kube-version", KUBE_VERSION]
    if values is not None:
        assert tmp is not None
        path = tmp / "values.yaml"
        path.write_text(yaml.safe_dump(values))
        args += ["--values", str(path)]
    result = subprocess.run(args, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    return result.stdout


def documents(text: str) -> list[dict[str, Any]]:
    return [d for d in yaml.safe_load_all(text) if d]


def of_kind(docs: list[dict[str, Any]], kind: str) -> list[dict[str, Any]]:
    return [d for d in docs if d["kind"] == kind]


def validate(kubeconform: str, schemas: Path, text: str) -> list[dict[str, Any]]:
    """kubeconform's verdict per resource (``-summary`` counts come back as a check)."""
    result = subprocess.run(
        [
            kubeconform,
            "-strict",
            "-output",
            "json",
            "-verbose",
            "-kubernetes-version",
            KUBE_VERSION,
            "-schema-location",
            f"{schemas}/{{{{ .NormalizedKubernetesVersion }}}}-standalone{{{{ .StrictSuffix }}}}/"
            "{{ .ResourceKind }}{{ .KindSuffix }}.json",
            "-schema-location",
            f"{CRD_SCHEMAS}/"
            "{{ .Group }}/{{ .ResourceKind }}_{{ .ResourceAPIVersion }}.json",
            "-",
        ],
        input=text,
        capture_output=True,
        text=True,
        timeout=120,
    )
    report = json.loads(result.stdout)
    resources: list[dict[str, Any]] = report["resources"]
    assert len(resources) == len(documents(text)), "kubeconform did not see every resource"
    return resources


def test_helm_lint(helm: str) -> None:
    for values in (None, OTHER_VALUES):
        args = [helm, "lint", "--strict", "--kube-version", KUBE_VERSION, str(CHART)]
        if values is not None:
            args += ["--set-json", f"workers={json.dumps(values['workers'])}"]
        result = subprocess.run(args, capture_output=True, text=True, timeout=120)
        assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.parametrize(
    "values", [None, OTHER_VALUES, KEDA_GROUPED], ids=["defaults", "other", "keda-grouped"]
)
def test_every_rendered_resource_is_valid(
    helm: str, kubeconform: str, kube_schemas: Path, tmp_path: Path, values: dict[str, Any] | None
) -> None:
    text = render(helm, values, tmp_path)
    results = validate(kubeconform, kube_schemas, text)
    bad = [r for r in results if r["status"] != "statusValid"]
    assert not bad, json.dumps(bad, indent=1)[:4000]
    kinds = {d["kind"] for d in documents(text)}
    assert {"Deployment", "ConfigMap", "KafkaTopic"} <= kinds


def test_strict_validation_refuses_what_a_cluster_would(
    helm: str, kubeconform: str, kube_schemas: Path
) -> None:
    """The check can fail: a misspelt field in each kind of resource is reported."""
    docs = documents(render(helm))
    broken = []
    for kind, path, field in (
        ("Deployment", ("spec", "template", "spec"), "containerz"),
        ("ScaledObject", ("spec",), "maxReplicas"),
        ("KafkaTopic", ("spec",), "partition"),
        ("Service", ("spec",), "port"),
        ("PodDisruptionBudget", ("spec",), "maxUnavailble"),
    ):
        doc = copy.deepcopy(of_kind(docs, kind)[0])
        node = doc
        for key in path:
            node = node[key]
        node[field] = 3
        broken.append(doc)
    results = validate(kubeconform, kube_schemas, yaml.safe_dump_all(broken))
    assert [r["status"] for r in results] == ["statusInvalid"] * len(broken), results


def test_chart_topics_are_the_exported_topic_files(helm: str, tmp_path: Path) -> None:
    exported = CliRunner().invoke(
        app, ["topics", "export", "--format", "strimzi"], env={"LLMPIPE_TOPIC_PREFIX": ""}
    )
    assert exported.exit_code == 0, exported.output
    shipped = (CHART / "files" / "kafkatopics.yaml").read_text()
    assert shipped == exported.stdout, (
        "infra/helm/llmpipe/files/kafkatopics.yaml is stale: regenerate with "
        "`LLMPIPE_TOPIC_PREFIX= llmpipe topics export --format strimzi > "
        "infra/helm/llmpipe/files/kafkatopics.yaml`"
    )
    rendered = {
        d["spec"]["topicName"]: d
        for d in of_kind(documents(render(helm, OTHER_VALUES, tmp_path)), "KafkaTopic")
    }
    specs = load_specs(Settings().topics_dir)
    assert set(rendered) == {f"prod_{s.name}" for s in specs}
    for spec in specs:
        topic = rendered[f"prod_{spec.name}"]
        assert topic["metadata"]["labels"]["strimzi.io/cluster"] == "main"
        assert topic["metadata"]["name"] == f"prod-{spec.name}".replace("_", "-")
        assert topic["spec"]["partitions"] == spec.partitions
        assert topic["spec"]["replicas"] == 3
        assert topic["spec"]["config"] == spec.configs


def test_keda_scales_each_stage_on_its_real_consumer_group(helm: str, tmp_path: Path) -> None:
    stages = yaml.safe_load((CHART / "files" / "stages.yaml").read_text())
    assert stages == {name: s.input_topic for name, s in topology.STAGES.items()}
    settings = Settings(topic_prefix="prod_")
    for values, groups in ((None, None), (KEDA_GROUPED, KEDA_GROUPED["workers"]["groups"])):
        docs = documents(render(helm, values, tmp_path))
        scaled = of_kind(docs, "ScaledObject")
        deployments = {d["metadata"]["name"] for d in of_kind(docs, "Deployment")}
        triggers = [t for s in scaled for t in s["spec"]["triggers"]]
        assert {s["spec"]["scaleTargetRef"]["name"] for s in scaled} <= deployments
        prefix = settings if values else Settings(topic_prefix="")
        assert sorted(
            (t["metadata"]["consumerGroup"], t["metadata"]["topic"]) for t in triggers
        ) == sorted(
            (prefix.group(name), prefix.topic(s.input_topic)) for name, s in topology.STAGES.items()
        )
        assert all(t["type"] == "kafka" for t in triggers)
        if groups is not None:
            assert len(scaled) == len(groups)
            assert all(t["authenticationRef"] == {"name": "kafka-scram"} for t in triggers)


def _containers(
    docs: list[dict[str, Any]], component: str
) -> Iterator[tuple[dict[str, Any], dict[str, Any]]]:
    for d in of_kind(docs, "Deployment"):
        if d["metadata"]["labels"]["app.kubernetes.io/component"] == component:
            yield d, d["spec"]["template"]["spec"]["containers"][0]


def test_probes_commands_and_settings_are_real(helm: str, tmp_path: Path) -> None:
    known = {f"LLMPIPE_{name.upper()}" for name in Settings.model_fields} | CLI_VARIABLES
    runner = CliRunner()
    for values in (None, OTHER_VALUES):
        docs = documents(render(helm, values, tmp_path))
        (config,) = of_kind(docs, "ConfigMap")
        names = set(config["data"])
        for secret in of_kind(docs, "Secret"):
            names |= set(secret["stringData"])
        workers = list(_containers(docs, "worker"))
        assert workers
        stages = []
        for _, container in workers:
            env = {e["name"]: e.get("value") for e in container["env"]}
            names |= {n for n in env if n.startswith("LLMPIPE_")}
            port = next(p["containerPort"] for p in container["ports"] if p["name"] == "health")
            assert env["LLMPIPE_HEALTH_PORT"] == str(port)
            assert env["LLMPIPE_HEALTH_HOST"] == "0.0.0.0"
            assert container["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": "health"}
            assert container["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": "health"}
            args = container["args"]
            assert args[:2] == ["worker", "--stages"]
            stages += args[2].split(",")
        assert sorted(stages) == sorted(topology.STAGES)
        for _, container in _containers(docs, "review"):
            names |= {e["name"] for e in container["env"] if e["name"].startswith("LLMPIPE_")}
            assert container["readinessProbe"]["httpGet"]["path"] == "/healthz"
            result = runner.invoke(app, [*container["args"][:2], "--help"])
            assert result.exit_code == 0, result.output
        unknown = {n for n in names if n.startswith("LLMPIPE_")} - known
        assert not unknown, f"the chart sets variables llmpipe does not read: {unknown}"


@pytest.mark.parametrize(
    ("groups", "message"),
    [
        (
            [{"name": "a", "stages": ["validate"]}, {"name": "b", "stages": ["validate"]}],
            "in two worker groups",
        ),
        ([{"name": "a", "stages": ["validat"]}], "unknown stage"),
    ],
)
def test_a_wrong_worker_group_fails_the_render(
    helm: str, tmp_path: Path, groups: list[dict[str, Any]], message: str
) -> None:
    path = tmp_path / "values.yaml"
    path.write_text(yaml.safe_dump({"workers": {"groups": groups}}))
    result = subprocess.run(
        [
            helm,
            "template",
            "rel",
            str(CHART),
            "--kube-version",
            KUBE_VERSION,
            "--values",
            str(path),
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode != 0
    assert message in result.stderr


def test_topics_export_names_cluster_namespace_and_prefix() -> None:
    """Usable on its own (`| kubectl apply -f -`), no broker needed; a wrong format is one
    line and exit 2."""
    runner = CliRunner()
    args = ["topics", "export", "--cluster", "east", "--namespace", "kafka"]
    result = runner.invoke(app, args, env={"LLMPIPE_TOPIC_PREFIX": "Team_A."})
    assert result.exit_code == 0, result.output
    docs = documents(result.stdout)
    specs = load_specs(Settings().topics_dir)
    assert [d["spec"]["topicName"] for d in docs] == [f"Team_A.{s.name}" for s in specs]
    for doc in docs:
        assert doc["apiVersion"] == "kafka.strimzi.io/v1" and doc["kind"] == "KafkaTopic"
        assert doc["metadata"]["namespace"] == "kafka"
        assert doc["metadata"]["labels"] == {"strimzi.io/cluster": "east"}
        name = doc["metadata"]["name"]
        assert name == name.lower() and "_" not in name
    wrong = runner.invoke(app, ["topics", "export", "--format", "kustomize"])
    assert wrong.exit_code == 2
    assert "unknown --format 'kustomize'" in wrong.output
