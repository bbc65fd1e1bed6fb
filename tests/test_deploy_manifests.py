"""The deployment files, checked with no engine and no network: the Kubernetes manifests against the
Kubernetes JSON schemas (kubernetes-validate, strict: unknown fields are errors; its schemas ship in the
package, and the test forbids any connection, so nothing is fetched), and both deployments' tiers equal to
the built-in ones. The manifests were not run on a Kubernetes cluster here; the swarm stack is deployed for
real by tests/test_swarm.py.
"""

from __future__ import annotations

import json
import socket
from pathlib import Path

import kubernetes_validate
import pytest
import yaml

from pool.model.tiers import default_tiers, load_tiers_file

DEPLOY = Path(__file__).resolve().parent.parent / "deploy"
K8S_VERSION = "1.30"


@pytest.fixture
def no_network(monkeypatch):
    """Any connection attempt fails the test: the schemas must come from the package, not from a URL."""
    def refuse(*args, **kwargs):
        raise AssertionError(f"network access attempted: {args}")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)


def manifests() -> list[dict]:
    docs = []
    for path in sorted((DEPLOY / "k8s").glob("*.yaml")):
        docs += [doc for doc in yaml.safe_load_all(path.read_text()) if doc]
    return docs


def test_manifests_follow_the_kubernetes_schemas(no_network):
    docs = manifests()
    kinds = sorted((d["kind"], d["metadata"]["name"]) for d in docs)
    assert kinds == [("ConfigMap", "warmpool-tiers"), ("DaemonSet", "warmpool-worker"),
                     ("Deployment", "warmpool-api"), ("Secret", "warmpool-keys"), ("Service", "redis"),
                     ("Service", "warmpool-api"), ("StatefulSet", "redis")]
    for doc in docs:
        kubernetes_validate.validate(doc, K8S_VERSION, strict=True)


def test_the_validator_really_rejects_bad_manifests(no_network):
    """So that the check above means something: a misspelt field, a wrong type, a missing required field."""
    daemonset = next(d for d in manifests() if d["kind"] == "DaemonSet")
    spec = daemonset["spec"]["template"]["spec"]
    broken = [
        {**daemonset, "spec": {**daemonset["spec"], "selectr": {}}},
        {**daemonset, "spec": {**daemonset["spec"], "template": {**daemonset["spec"]["template"], "spec": {
            **spec, "terminationGracePeriodSeconds": "sixty"}}}},
        {**daemonset, "spec": {k: v for k, v in daemonset["spec"].items() if k != "selector"}},
    ]
    for doc in broken:
        with pytest.raises(kubernetes_validate.ValidationError):
            kubernetes_validate.validate(doc, K8S_VERSION, strict=True)


def test_the_deployments_ship_the_built_in_tiers(tmp_path):
    config = next(d for d in manifests() if d["kind"] == "ConfigMap")
    k8s_tiers = tmp_path / "k8s-tiers.json"
    k8s_tiers.write_text(config["data"]["tiers.json"])
    assert load_tiers_file(k8s_tiers) == default_tiers()
    assert load_tiers_file(DEPLOY / "swarm" / "tiers.json") == default_tiers()
    assert json.loads(config["data"]["tiers.json"]) == json.loads((DEPLOY / "swarm" / "tiers.json").read_text())


def test_the_manifests_keep_redis_durable_and_the_workers_on_every_node():
    docs = {d["kind"]: d for d in manifests()}
    redis = docs["StatefulSet"]["spec"]["template"]["spec"]["containers"][0]
    assert redis["args"][:2] == ["--appendonly", "yes"]
    worker = docs["DaemonSet"]["spec"]["template"]["spec"]
    socket_volume = {"name": "docker-socket", "hostPath": {"path": "/var/run/docker.sock", "type": "Socket"}}
    assert socket_volume in worker["volumes"]
    stack = yaml.safe_load((DEPLOY / "swarm" / "stack.yml").read_text())
    assert stack["services"]["worker"]["deploy"]["mode"] == "global"
    # A worker in a container cannot loop-mount disk scratch where its node's engine sees it.
    assert {"name": "WARMPOOL_SCRATCH", "value": "memory"} in worker["containers"][0]["env"]
    assert stack["services"]["worker"]["environment"]["WARMPOOL_SCRATCH"] == "memory"
    assert stack["services"]["redis"]["command"][:2] == ["--appendonly", "yes"]
