"""The Kubernetes manifests in deploy/k8s validate offline, and typos in them fail.

KubeRay resources (RayJob, RayCluster) are checked against the operator's CRD schemas in
../shared/schemas/kuberay/, made strict (see strict_schema); the PersistentVolumeClaims against
Kubernetes' own schemas from the `kubernetes-validate` package. Each manifest's entrypoint must name
the real module and a config that loads, and its GPU worker pods must hold what that config asks for.
"""

from __future__ import annotations

import copy
import functools
import shlex
from pathlib import Path

import jsonschema
import pytest
import yaml

from system.config import load_config
from system.resources import check_cluster_resources

ROOT = Path(__file__).resolve().parents[2]
K8S = ROOT / "deploy" / "k8s"
KUBE_VERSION = "1.31"  # Kubernetes release the built-in manifests are checked against
# KubeRay's own rule (ValidateRayJobSpec in the operator, not the CRD): submission modes it knows.
SUBMISSION_MODES = ("K8sJobMode", "HTTPMode", "InteractiveMode", "SidecarMode")


def _find_kuberay_schemas():
    for shared in (ROOT.parent / "shared", ROOT / "shared"):
        crds = shared / "schemas" / "kuberay"
        if (crds / "ray.io_rayjobs.yaml").is_file() and (crds / "ray.io_rayclusters.yaml").is_file():
            return crds
    return None


CRDS = _find_kuberay_schemas()
needs_crds = pytest.mark.skipif(
    CRDS is None, reason=f"KubeRay CRD schemas not found in {ROOT.parent / 'shared'} or {ROOT / 'shared'}"
)


def load_docs(name: str) -> list:
    return [d for d in yaml.safe_load_all((K8S / name).read_text()) if d]


def load_one(name: str) -> dict:
    (doc,) = load_docs(name)
    return doc


def strict_schema(node):
    """A copy of a CRD schema that rejects unknown fields.

    A CRD's openAPIV3Schema leaves additionalProperties unset: the API server prunes unknown fields
    from structural schemas instead of rejecting them, so `kubectl apply` of a RayJob with
    `shutdownAfterJobFinish: true` succeeds and silently drops the setting. To make such a typo
    fail here, every object that lists its `properties` gets additionalProperties: false, unless
    it already says what extra keys may be (additionalProperties) or keeps unknown fields on
    purpose (x-kubernetes-preserve-unknown-fields). Also: x-kubernetes-int-or-string accepts an
    int or a string (resource quantities such as `cpu: 8` or `memory: 32Gi`), and nullable allows null.
    """
    if isinstance(node, list):
        return [strict_schema(item) for item in node]
    if not isinstance(node, dict):
        return node
    out = {key: strict_schema(value) for key, value in node.items()}
    if ("properties" in out and "additionalProperties" not in out
            and not out.get("x-kubernetes-preserve-unknown-fields")):
        out["additionalProperties"] = False
    if out.get("x-kubernetes-int-or-string") and "anyOf" not in out:
        out.pop("type", None)
        out["anyOf"] = [{"type": "integer"}, {"type": "string"}]
    if out.get("nullable") and "type" in out:
        out["type"] = [out["type"], "null"]
    return out


@functools.lru_cache(maxsize=None)
def _crds() -> tuple:
    """Every CRD in the shared folder, parsed once (2 MB of YAML: libyaml's loader when present)."""
    loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)
    return tuple(yaml.load(path.read_text(), Loader=loader) for path in sorted(CRDS.glob("*.yaml")))


@functools.lru_cache(maxsize=None)
def crd_schema(api_version: str, kind: str, strict: bool = True) -> dict:
    """The openAPIV3Schema of `kind` at `api_version` (e.g. ray.io/v1), from the shared CRD files."""
    group, version = api_version.split("/")
    for crd in _crds():
        if crd["spec"]["group"] == group and crd["spec"]["names"]["kind"] == kind:
            for v in crd["spec"]["versions"]:
                if v["name"] == version:
                    schema = v["schema"]["openAPIV3Schema"]
                    return strict_schema(schema) if strict else schema
    raise LookupError(f"no CRD schema for {kind} {api_version} in {CRDS}")


def operator_errors(doc: dict) -> list:
    """Checks the KubeRay operator makes on a RayJob that the v1 CRD schema cannot express
    (the CRD leaves entrypoint optional because InteractiveMode supplies it later)."""
    spec = doc.get("spec", {})
    mode = spec.get("submissionMode", "K8sJobMode")
    errors = []
    if mode not in SUBMISSION_MODES:
        errors.append(f"spec.submissionMode: {mode!r} is not one of {SUBMISSION_MODES}")
    if mode != "InteractiveMode" and not spec.get("entrypoint"):
        errors.append("spec.entrypoint: required unless submissionMode is InteractiveMode")
    if not spec.get("rayClusterSpec") and not spec.get("clusterSelector"):
        errors.append("spec: one of rayClusterSpec or clusterSelector is required")
    return errors


def kuberay_errors(doc: dict, strict: bool = True) -> list:
    """Every problem with a KubeRay manifest, as 'path: message' strings (empty when valid)."""
    validator = jsonschema.Draft7Validator(crd_schema(doc["apiVersion"], doc["kind"], strict))
    errors = [f"{'.'.join(map(str, e.absolute_path)) or '<root>'}: {e.message}"
              for e in validator.iter_errors(doc)]
    if doc["kind"] == "RayJob":
        errors += operator_errors(doc)
    return errors


KUBERAY_FILES = ["rayjob.yaml", "raycluster.yaml"]


def _pod_specs(doc: dict):
    cluster = doc["spec"]["rayClusterSpec"] if doc["kind"] == "RayJob" else doc["spec"]
    yield "head", cluster["headGroupSpec"]["template"]["spec"]
    for group in cluster.get("workerGroupSpecs", []):
        yield group["groupName"], group["template"]["spec"]


# ---------------------------------------------------------------- the manifests as written


def _is_kuberay(doc: dict) -> bool:
    return doc["apiVersion"].startswith("ray.io/")


@pytest.mark.parametrize("name", sorted(p.name for p in K8S.glob("*.yaml")))
def test_every_manifest_is_valid(name):
    """Every document of every deploy/k8s/*.yaml: KubeRay kinds against the CRDs (strict), the rest
    (PersistentVolumeClaims) against Kubernetes' own schemas."""
    for doc in load_docs(name):
        if _is_kuberay(doc):
            if CRDS is None:
                pytest.skip(f"KubeRay CRD schemas not found in {ROOT.parent / 'shared'}")
            assert doc["apiVersion"] == "ray.io/v1"
            assert kuberay_errors(doc) == []
        else:
            kubernetes_validate = pytest.importorskip(
                "kubernetes_validate", reason="kubernetes-validate (Kubernetes' schemas) not installed")
            kubernetes_validate.validate(doc, KUBE_VERSION, strict=True)


def test_kuberay_files_lists_every_kuberay_manifest():
    """The checks below run on KUBERAY_FILES: a new KubeRay manifest must join it."""
    found = {p.name for p in K8S.glob("*.yaml") if any(_is_kuberay(d) for d in load_docs(p.name))}
    assert found == set(KUBERAY_FILES)
    assert {d["kind"] for d in load_docs("pvc.yaml")} == {"PersistentVolumeClaim"}


def test_every_claim_the_pods_mount_is_defined_in_pvc_yaml():
    defined = {d["metadata"]["name"] for d in load_docs("pvc.yaml")}
    for name in KUBERAY_FILES:
        for _, pod in _pod_specs(load_one(name)):
            claims = {v["persistentVolumeClaim"]["claimName"] for v in pod.get("volumes", [])
                      if "persistentVolumeClaim" in v}
            assert claims and claims <= defined, (name, claims, defined)


def test_raycluster_matches_the_rayjob_cluster():
    """One cluster shape: the interactive RayCluster is the RayJob's cluster, field for field."""
    assert load_one("raycluster.yaml")["spec"] == load_one("rayjob.yaml")["spec"]["rayClusterSpec"]


def test_rayjob_cleans_up_and_can_resume():
    spec = load_one("rayjob.yaml")["spec"]
    assert spec["shutdownAfterJobFinishes"] is True
    assert spec["ttlSecondsAfterFinished"] > 0
    assert "trainer.resume=auto" in shlex.split(spec["entrypoint"])


@pytest.mark.parametrize("name", KUBERAY_FILES)
def test_pods_mount_shm_in_memory_and_outputs_on_a_claim(name):
    for group, pod in _pod_specs(load_one(name)):
        volumes = {v["name"]: v for v in pod["volumes"]}
        for container in pod["containers"]:
            mounts = {m["mountPath"]: m["name"] for m in container["volumeMounts"]}
            assert volumes[mounts["/dev/shm"]]["emptyDir"]["medium"] == "Memory", group
            assert "persistentVolumeClaim" in volumes[mounts["/outputs"]], group
            assert "/models" in mounts, group


def test_gpu_workers_request_and_limit_the_same_gpus():
    for name in KUBERAY_FILES:
        for group, pod in _pod_specs(load_one(name)):
            for container in pod["containers"]:
                res = container["resources"]
                gpus = res.get("limits", {}).get("nvidia.com/gpu")
                assert gpus == res.get("requests", {}).get("nvidia.com/gpu"), (name, group)
                assert (group == "head") == (gpus is None), (name, group)


# ---------------------------------------------------------------- token authentication

AUTH_SECRET = "grpo-ray-token"  # the Secret deploy/README.md creates; KubeRay reads key auth_token
TOKEN_FROM_SECRET = {"secretKeyRef": {"name": AUTH_SECRET, "key": "auth_token"}}


def _ray_containers(name: str):
    """(group, container) for every container that talks to Ray: head, workers, the submitter."""
    doc = load_one(name)
    for group, pod in _pod_specs(doc):
        for container in pod["containers"]:
            yield group, container
    submitter = doc["spec"].get("submitterPodTemplate")
    if doc["kind"] == "RayJob":
        assert submitter, "a RayJob without submitterPodTemplate gets a submitter without the token"
        yield "submitter", submitter["spec"]["containers"][0]


@pytest.mark.parametrize("name", KUBERAY_FILES)
def test_clusters_turn_token_auth_on_with_the_secret(name):
    doc = load_one(name)
    cluster = doc["spec"]["rayClusterSpec"] if doc["kind"] == "RayJob" else doc["spec"]
    assert cluster["authOptions"] == {"mode": "token", "secretName": AUTH_SECRET}


@pytest.mark.parametrize("name", KUBERAY_FILES)
def test_head_workers_and_submitter_read_the_token_from_the_secret(name):
    seen = set()
    for group, container in _ray_containers(name):
        env = {e["name"]: e for e in container.get("env", [])}
        assert env.get("RAY_AUTH_MODE", {}).get("value") == "token", (name, group)
        assert env.get("RAY_AUTH_TOKEN", {}).get("valueFrom") == TOKEN_FROM_SECRET, (name, group)
        assert "value" not in env["RAY_AUTH_TOKEN"], (name, group)  # never a literal token
        seen.add(group)
    assert "head" in seen and len(seen) >= 2


def test_readme_creates_the_secret_the_manifests_name():
    readme = (ROOT / "deploy" / "README.md").read_text()
    assert f"kubectl create secret generic {AUTH_SECRET} --from-literal=auth_token=" in readme
    assert "RAY_AUTH_TOKEN=$(kubectl get secret " + AUTH_SECRET in readme  # submitting from outside


# ---------------------------------------------------------------- the entrypoint


def _entrypoint(doc_name: str) -> list:
    return shlex.split(load_one(doc_name)["spec"]["entrypoint"])


def parse_train_command(argv: list):
    """`python -m system.train --config X k=v ...` -> (module, config path, overrides)."""
    assert argv[:2] == ["python", "-m"], argv
    module = argv[2]
    rest = argv[3:]
    assert rest[0] == "--config", argv
    return module, rest[1], rest[2:]


def test_rayjob_entrypoint_names_the_real_module_and_a_loadable_config():
    module, config, overrides = parse_train_command(_entrypoint("rayjob.yaml"))
    assert (ROOT / (module.replace(".", "/") + ".py")).is_file(), f"{module} is not a file in the repo"
    assert not Path(config).is_absolute(), "the job runs in the image's /app: keep the config relative"
    cfg = load_config(str(ROOT / config), overrides)
    # a relative output_dir would sit on the head pod's own disk and vanish with the cluster
    assert Path(cfg.output_dir).is_absolute()
    assert cfg.trainer.resume == "auto"


def _quantity(value) -> float:
    """A Kubernetes CPU/GPU quantity ('16', 4, '500m') as a number."""
    text = str(value)
    return float(text[:-1]) / 1000 if text.endswith("m") else float(text)


def test_rayjob_cluster_holds_what_its_config_needs():
    """The Ray resources the pods advertise (CPU from rayStartParams num-cpus or the container's
    limit, GPU from nvidia.com/gpu) pass check_cluster_resources for the entrypoint's config."""
    doc = load_one("rayjob.yaml")
    _, config, overrides = parse_train_command(_entrypoint("rayjob.yaml"))
    cluster = doc["spec"]["rayClusterSpec"]
    groups = [(cluster["headGroupSpec"], 1)] + [(g, g["replicas"]) for g in cluster["workerGroupSpecs"]]
    total = {"CPU": 0.0, "GPU": 0.0}
    for group, replicas in groups:
        limits = group["template"]["spec"]["containers"][0]["resources"]["limits"]
        params = group.get("rayStartParams", {})
        total["CPU"] += replicas * _quantity(params.get("num-cpus", limits.get("cpu", 0)))
        total["GPU"] += replicas * _quantity(params.get("num-gpus", limits.get("nvidia.com/gpu", 0)))
    check_cluster_resources(load_config(str(ROOT / config), overrides), total)


# ---------------------------------------------------------------- broken manifests must fail


def _rename(mapping: dict, old: str, new: str) -> None:
    mapping[new] = mapping.pop(old)


def _rayjob_breakages():
    """(what is wrong, how to break a copy of the good RayJob, text the error must contain)."""
    def worker(d):
        return d["spec"]["rayClusterSpec"]["workerGroupSpecs"][0]

    def container(d):
        return worker(d)["template"]["spec"]["containers"][0]

    return [
        ("rayClusterSpc", lambda d: _rename(d["spec"], "rayClusterSpec", "rayClusterSpc"), "'rayClusterSpc'"),
        ("shutdownAfterJobFinish", lambda d: _rename(d["spec"], "shutdownAfterJobFinishes",
                                                     "shutdownAfterJobFinish"), "'shutdownAfterJobFinish'"),
        ("missing entrypoint", lambda d: d["spec"].pop("entrypoint"), "spec.entrypoint: required"),
        ("ttl as text", lambda d: d["spec"].update(ttlSecondsAfterFinished="one hour"), "not of type 'integer'"),
        ("workerGroupSpecs.replica", lambda d: _rename(worker(d), "replicas", "replica"), "'replica'"),
        ("missing groupName", lambda d: worker(d).pop("groupName"), "'groupName' is a required property"),
        ("volumeMount in a container", lambda d: _rename(container(d), "volumeMounts", "volumeMount"),
         "'volumeMount'"),
        ("bad memory quantity", lambda d: container(d)["resources"]["limits"].update(memory="lots"),
         "'lots' does not match"),
        ("emptyDir.mediun", lambda d: _rename(worker(d)["template"]["spec"]["volumes"][0]["emptyDir"],
                                              "medium", "mediun"), "'mediun'"),
        ("unknown submissionMode", lambda d: d["spec"].update(submissionMode="K8sJob"), "spec.submissionMode"),
        ("authOptions.mode tokens", lambda d: d["spec"]["rayClusterSpec"]["authOptions"].update(mode="tokens"),
         "'tokens' is not one of"),
        ("authOption", lambda d: _rename(d["spec"]["rayClusterSpec"], "authOptions", "authOption"),
         "'authOption'"),
    ]


@needs_crds
@pytest.mark.parametrize("what,breaker,expected", _rayjob_breakages(), ids=[b[0] for b in _rayjob_breakages()])
def test_broken_rayjob_fails(what, breaker, expected):
    doc = copy.deepcopy(load_one("rayjob.yaml"))
    breaker(doc)
    errors = kuberay_errors(doc)
    assert any(expected in e for e in errors), f"a RayJob with {what} gave {errors}"


@needs_crds
def test_misspelled_field_passes_the_plain_crd_schema_but_not_the_strict_one():
    """Why strict_schema exists: the CRD as shipped accepts (and the API server would prune) a typo."""
    doc = copy.deepcopy(load_one("rayjob.yaml"))
    _rename(doc["spec"], "shutdownAfterJobFinishes", "shutdownAfterJobFinish")
    assert kuberay_errors(doc, strict=False) == []
    assert any("shutdownAfterJobFinish" in e for e in kuberay_errors(doc))


@needs_crds
def test_int_or_string_quantities_accept_both_forms():
    doc = copy.deepcopy(load_one("raycluster.yaml"))
    limits = doc["spec"]["workerGroupSpecs"][0]["template"]["spec"]["containers"][0]["resources"]["limits"]
    limits.update(cpu=16, memory="128Gi", **{"nvidia.com/gpu": "4"})
    assert kuberay_errors(doc) == []


@needs_crds
@pytest.mark.parametrize("what,breaker", [
    ("headGroupSpec.rayStartParam", lambda s: _rename(s["headGroupSpec"], "rayStartParams", "rayStartParam")),
    ("missing headGroupSpec", lambda s: s.pop("headGroupSpec")),
    ("rayStartParams value not a string", lambda s: s["headGroupSpec"]["rayStartParams"].update(**{"num-cpus": 0})),
    ("workerGroupSpec (singular)", lambda s: _rename(s, "workerGroupSpecs", "workerGroupSpec")),
])
def test_broken_raycluster_fails(what, breaker):
    doc = copy.deepcopy(load_one("raycluster.yaml"))
    breaker(doc["spec"])
    assert kuberay_errors(doc), f"a RayCluster with {what} passed validation"


@pytest.mark.parametrize("what,breaker", [
    ("accesModes", lambda s: _rename(s, "accessModes", "accesModes")),
    ("storage request as a list", lambda s: s["resources"]["requests"].update(storage=["200Gi"])),
])
def test_broken_pvc_fails(what, breaker):
    kubernetes_validate = pytest.importorskip(
        "kubernetes_validate", reason="kubernetes-validate (Kubernetes' OpenAPI schemas, offline) not installed")
    doc = copy.deepcopy(load_docs("pvc.yaml")[0])
    breaker(doc["spec"])
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(doc, KUBE_VERSION, strict=True)
