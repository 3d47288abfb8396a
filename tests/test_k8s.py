"""Every manifest in k8s/ validates: KubeRay kinds against the CRD schemas in
../shared/schemas/kuberay (read from there), pod templates and core kinds against the
Kubernetes schemas (kubernetes-validate, strict); rayVersion equals the installed Ray."""

import os
from pathlib import Path
from typing import Any

import jsonschema
import kubernetes_validate
import pytest
import ray
import yaml

ROOT = Path(__file__).parents[1]
SCHEMAS = Path(os.environ.get("POSMINE_KUBERAY_SCHEMAS", ROOT.parent / "shared" / "schemas" / "kuberay"))
DOCS = [(p.name, i, d) for p in sorted((ROOT / "k8s").glob("*.yaml"))
        for i, d in enumerate(yaml.safe_load_all(p.read_text())) if d]
CRDS = {"RayCluster": "ray.io_rayclusters.yaml", "RayJob": "ray.io_rayjobs.yaml"}


def _crd_schema(kind: str, version: str) -> dict[str, Any]:
    crd = yaml.safe_load((SCHEMAS / CRDS[kind]).read_text())
    [v] = [v for v in crd["spec"]["versions"] if v["name"] == version]
    return v["schema"]["openAPIV3Schema"]


def _pod_templates(doc: dict[str, Any]) -> list[dict[str, Any]]:
    spec = doc["spec"].get("rayClusterSpec", doc["spec"])
    return [spec["headGroupSpec"]["template"]] + [g["template"] for g in spec["workerGroupSpecs"]]


def test_manifests_exist() -> None:
    kinds = {d["kind"] for _, _, d in DOCS}
    assert {"RayCluster", "RayJob"} <= kinds


@pytest.mark.parametrize("name, i, doc", DOCS, ids=[f"{n}#{i}" for n, i, _ in DOCS])
def test_manifest_validates(name: str, i: int, doc: dict[str, Any]) -> None:
    if doc["kind"] not in CRDS:
        kubernetes_validate.validate(doc, kubernetes_validate.latest_version(), strict=True)
        return
    group, version = doc["apiVersion"].split("/")
    assert group == "ray.io"
    jsonschema.validate(doc, _crd_schema(doc["kind"], version))
    cluster = doc["spec"].get("rayClusterSpec", doc["spec"])
    assert cluster["rayVersion"] == ray.__version__
    for template in _pod_templates(doc):
        pod = {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "t"}, "spec": template["spec"]}
        kubernetes_validate.validate(pod, kubernetes_validate.latest_version(), strict=True)
        assert template["spec"]["securityContext"]["runAsNonRoot"] is True
        for c in template["spec"]["containers"]:
            assert c["securityContext"]["allowPrivilegeEscalation"] is False
            assert c["resources"]["requests"] == c["resources"]["limits"]
            assert {"secretRef": {"name": "posmine-s3"}} in c.get("envFrom", [])
            assert "AWS_SECRET_ACCESS_KEY" not in str(c.get("env", ""))


def test_schema_rejects_a_bad_manifest() -> None:
    doc = next(d for _, _, d in DOCS if d["kind"] == "RayCluster")
    bad = {**doc, "spec": {**doc["spec"], "workerGroupSpecs": [
        {**doc["spec"]["workerGroupSpecs"][0], "maxReplicas": "many"}]}}
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(bad, _crd_schema("RayCluster", "v1"))


def test_gpu_group_requests_gpus() -> None:
    doc = next(d for _, _, d in DOCS if d["kind"] == "RayCluster")
    [gpu] = [g for g in doc["spec"]["workerGroupSpecs"] if g["groupName"] == "gpu"]
    assert gpu["template"]["spec"]["containers"][0]["resources"]["limits"]["nvidia.com/gpu"] == "1"
