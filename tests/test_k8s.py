"""The KubeRay manifests, checked at the schema level: they parse, carry the fields KubeRay
requires, request GPUs the way the resource model expects, use the image the Dockerfile builds
for this version of the package, and run a command and a job file that actscope accepts."""

from __future__ import annotations

import copy
import gzip
import json
import re
import shlex
import tomllib
from pathlib import Path

import pytest
import yaml

from actscope.jobs.cli import app
from actscope.storage.spec import JobSpec

K8S = Path(__file__).resolve().parent.parent / "k8s"


def _docs() -> dict[str, dict]:
    docs = {}
    for path in sorted(K8S.glob("*.yaml")):
        for doc in yaml.safe_load_all(path.read_text()):
            docs[doc["kind"]] = doc
    return docs


def _version() -> str:
    return tomllib.loads((K8S.parent / "pyproject.toml").read_text())["project"]["version"]


def _cluster_specs(docs):
    yield "RayCluster", docs["RayCluster"]["spec"]
    yield "RayJob", docs["RayJob"]["spec"]["rayClusterSpec"]


def test_manifests_parse_with_the_required_fields():
    docs = _docs()
    assert set(docs) == {"RayCluster", "RayJob", "ConfigMap"}
    for kind in ("RayCluster", "RayJob"):
        assert docs[kind]["apiVersion"] == "ray.io/v1"
        assert docs[kind]["metadata"]["name"]
    for kind, spec in _cluster_specs(docs):
        assert spec["enableInTreeAutoscaling"] is True, kind
        assert spec["headGroupSpec"]["template"]["spec"]["containers"], kind
        for group in spec["workerGroupSpecs"]:
            assert {"groupName", "minReplicas", "maxReplicas", "template"} <= set(group), kind
            assert group["minReplicas"] <= group.get("replicas", 0) <= group["maxReplicas"], kind


def test_gpu_workers_and_a_cpu_head():
    import ray

    for kind, spec in _cluster_specs(_docs()):
        assert spec["rayVersion"] == ray.__version__ or spec["rayVersion"].split(".")[0] == ray.__version__.split(".")[0]
        head = spec["headGroupSpec"]["template"]["spec"]["containers"][0]
        assert "nvidia.com/gpu" not in head["resources"]["limits"], kind
        for group in spec["workerGroupSpecs"]:
            pod = group["template"]["spec"]
            limits = pod["containers"][0]["resources"]["limits"]
            assert limits["nvidia.com/gpu"] == "1", kind  # one GPU per pod: one ShardWorker each
            assert pod["containers"][0]["resources"]["requests"] == limits, kind
            assert any(t["key"] == "nvidia.com/gpu" for t in pod["tolerations"]), kind
            # Placed by the GPU request alone: nvidia.com/gpu.present exists only where NVIDIA's
            # feature discovery labels the nodes.
            assert "nvidia.com/gpu.present" not in str(pod.get("nodeSelector", {})), kind


def test_images_are_the_ones_the_dockerfile_builds_for_this_version():
    dockerfile = (K8S / "Dockerfile").read_text()
    tag = re.search(r"-t (\S+)", dockerfile).group(1)
    assert tag == f"actscope:{_version()}"
    ray_base = re.search(r"FROM rayproject/ray:(\S+?)-", dockerfile).group(1)
    for kind, spec in _cluster_specs(_docs()):
        assert spec["rayVersion"] == ray_base, kind
        pods = [spec["headGroupSpec"]["template"]["spec"]] + [g["template"]["spec"] for g in spec["workerGroupSpecs"]]
        assert {c["image"] for p in pods for c in p["containers"]} == {tag}, kind


def test_the_rayjob_runs_the_configmaps_job_file_with_a_real_command():
    docs = _docs()
    argv = shlex.split(docs["RayJob"]["spec"]["entrypoint"])
    assert argv[0] == "actscope"
    commands = {c.name or c.callback.__name__ for c in app.registered_commands}
    assert argv[1] in commands
    head = docs["RayJob"]["spec"]["rayClusterSpec"]["headGroupSpec"]["template"]["spec"]
    mount = head["containers"][0]["volumeMounts"][0]
    volume = next(v for v in head["volumes"] if v["name"] == mount["name"])
    assert volume["configMap"]["name"] == docs["ConfigMap"]["metadata"]["name"]
    job_path = Path(argv[2])
    assert str(job_path.parent) == mount["mountPath"] and job_path.name in docs["ConfigMap"]["data"]
    spec = JobSpec.from_dict(yaml.safe_load(docs["ConfigMap"]["data"][job_path.name]), source="k8s/job-configmap.yaml")
    assert "://" in spec.store  # every pod must reach the store: object storage
    assert spec.device == "cuda"
    # `auto` counts the GPUs present at the start; the example asks for what the group grows to.
    group = docs["RayJob"]["spec"]["rayClusterSpec"]["workerGroupSpecs"][0]
    assert spec.workers == group["maxReplicas"] * int(group["template"]["spec"]["containers"][0]["resources"]["limits"]["nvidia.com/gpu"])


@pytest.mark.parametrize("name", ["raycluster.yaml", "rayjob.yaml", "job-configmap.yaml"])
def test_no_credentials_in_the_manifests(name):
    text = (K8S / name).read_text()
    assert not re.search(r"(?i)(secret_access_key|access_key_id)\s*:", text)
    for doc in yaml.safe_load_all(text):
        for container in _containers(doc):
            assert "env" not in container or all("value" not in e for e in container["env"] if "KEY" in e["name"])


def _containers(doc):
    spec = doc.get("spec", {})
    spec = spec.get("rayClusterSpec", spec)
    if "headGroupSpec" not in spec:
        return []
    pods = [spec["headGroupSpec"]["template"]["spec"]] + [g["template"]["spec"] for g in spec["workerGroupSpecs"]]
    return [c for p in pods for c in p["containers"]]



# -- against KubeRay's own CRD schemas and Kubernetes' core schemas ------------------------------

CRDS = json.loads(gzip.decompress((Path(__file__).parent / "data" / "kuberay-v1.7.0-crds.json.gz").read_bytes()))


def _unknown(value, schema: dict, path: str = "") -> list[str]:
    """Fields a structural schema does not declare (the API server drops them, or with strict
    field validation refuses them): a typo in a manifest is silently lost otherwise."""
    if schema.get("x-kubernetes-preserve-unknown-fields"):
        return []
    if isinstance(value, list):
        return [u for i, v in enumerate(value) for u in _unknown(v, schema.get("items", {}), f"{path}[{i}]")]
    if not isinstance(value, dict):
        return []
    props, extra = schema.get("properties"), schema.get("additionalProperties")
    found = []
    for key, v in value.items():
        if props is not None and key in props:
            found += _unknown(v, props[key], f"{path}.{key}")
        elif isinstance(extra, dict):
            found += _unknown(v, extra, f"{path}.{key}")
        elif props is not None:
            found.append(f"{path}.{key}")
    return found


def _check_crd(doc: dict) -> list[str]:
    import jsonschema

    schema = CRDS["schemas"][doc["kind"]]
    errors = [f"{'/'.join(map(str, e.absolute_path))}: {e.message}" for e in jsonschema.Draft7Validator(schema).iter_errors(doc)]
    return errors + [f"{path}: not in the schema" for path in _unknown(doc, schema)]


def _pod_templates(doc: dict):
    spec = doc["spec"].get("rayClusterSpec", doc["spec"])
    yield "head", spec["headGroupSpec"]["template"]
    for group in spec["workerGroupSpecs"]:
        yield group["groupName"], group["template"]


def test_manifests_match_kuberays_crds_and_kubernetes_core_schemas():
    kv = pytest.importorskip("kubernetes_validate")
    docs = _docs()
    for kind in ("RayCluster", "RayJob"):
        assert _check_crd(docs[kind]) == [], kind
        for name, template in _pod_templates(docs[kind]):
            # Each pod template as a core PodTemplate, strictly (unknown fields are errors).
            pod = {"apiVersion": "v1", "kind": "PodTemplate", "metadata": {"name": name}, "template": template}
            kv.validate(pod, kv.latest_version(), strict=True)
    kv.validate(docs["ConfigMap"], kv.latest_version(), strict=True)
    # The checks see a typo and a wrong type.
    broken = copy.deepcopy(docs["RayJob"])
    broken["spec"]["shutdownAfterJobFinish"] = True
    broken["spec"]["rayClusterSpec"]["workerGroupSpecs"][0]["maxReplicas"] = "16"
    problems = _check_crd(broken)
    assert any("shutdownAfterJobFinish: not in the schema" in p for p in problems), problems
    assert any("maxReplicas" in p and "integer" in p for p in problems), problems


def test_the_image_installs_the_object_store_filesystem_and_a_small_context():
    dockerfile = (K8S / "Dockerfile").read_text()
    extras = re.search(r"pip install [^\n]*actscope\[([a-z0-9,]+)\]", dockerfile).group(1).split(",")
    store = JobSpec.from_dict(yaml.safe_load(_docs()["ConfigMap"]["data"]["job.yaml"]), source="k8s").store
    assert {"s3": "s3", "gs": "gcs"}[store.split("://")[0]] in extras
    optional = tomllib.loads((K8S.parent / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    assert set(extras) <= set(optional)
    ignored = (K8S.parent / ".dockerignore").read_text().split()
    assert {".git", ".venv", "*.zarr", "tests"} <= set(ignored) and "README.md" not in ignored
