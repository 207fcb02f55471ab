"""The Helm chart, checked with the real tools: helm lint/template, kubernetes-validate --strict, the
prometheus-operator CRD schemas, values.schema.json, and the server's own settings loader reading the
ConfigMap and environment the chart renders (so chart and code cannot drift apart)."""

from __future__ import annotations

import base64
import copy
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml
from pydantic import BaseModel

from shrinkserve.server.settings import Settings, default_config_path, load_settings
from tests.conftest import REPO

CHART = REPO / "helm" / "shrinkserve"
CI_VALUES = sorted((CHART / "ci").glob("*.yaml"))
GPU_VALUES = CHART / "ci" / "gpu-autoscaling-values.yaml"
VLLM_VALUES = CHART / "ci" / "gpu-vllm-values.yaml"
DATA = Path(__file__).parent / "data"
NAMESPACE = "ml"
RELEASE = "rel"
# The chart's kubeVersion floor and the newest schemas kubernetes-validate ships.
K8S_VERSIONS = ["1.25.0", None]

_install_attempted = False


def find_tool(name: str) -> str:
    """Path of a test tool; runs scripts/install_test_tools.sh once if it is missing; skips loudly if
    it still is (the only acceptable reason to skip these checks)."""
    global _install_attempted

    def locate() -> str | None:
        for candidate in (Path(sys.prefix) / "tools" / "bin" / name, Path(sys.prefix) / "bin" / name):
            if candidate.is_file() and os.access(candidate, os.X_OK):
                return str(candidate)
        return shutil.which(name)

    found = locate()
    if found is None and not _install_attempted:
        _install_attempted = True
        subprocess.run(["bash", str(REPO / "scripts" / "install_test_tools.sh")], env={**os.environ,
                       "VENV": sys.prefix}, timeout=900, check=False)
        found = locate()
    if found is None:
        pytest.skip(f"!!! TOOL MISSING: {name} could not be installed by scripts/install_test_tools.sh "
                    f"(see its warnings above); the deployment checks that need it did NOT run !!!")
    return found


def helm(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    r = subprocess.run([find_tool("helm"), *args], capture_output=True, text=True, timeout=120)
    if check:
        assert r.returncode == 0, f"helm {' '.join(args)} failed:\n{r.stdout}\n{r.stderr}"
    return r


def values_file(tmp_path: Path, values: dict[str, Any], name: str = "values.yaml") -> Path:
    path = tmp_path / name
    path.write_text(yaml.safe_dump(values))
    return path


def render(*values: Path, chart: Path = CHART, check: bool = True) -> subprocess.CompletedProcess[str]:
    args = ["template", RELEASE, str(chart), "--namespace", NAMESPACE]
    for v in values:
        args += ["-f", str(v)]
    return helm(*args, check=check)


def docs_of(*values: Path) -> list[dict[str, Any]]:
    return [d for d in yaml.safe_load_all(render(*values).stdout) if d]


def one(docs: list[dict[str, Any]], kind: str) -> dict[str, Any]:
    found = [d for d in docs if d["kind"] == kind and not d["metadata"].get("annotations", {}).get("helm.sh/hook")]
    assert len(found) == 1, f"expected one {kind}, got {len(found)}"
    return found[0]


def server_container(docs: list[dict[str, Any]]) -> dict[str, Any]:
    return one(docs, "Deployment")["spec"]["template"]["spec"]["containers"][0]


def container_env(docs: list[dict[str, Any]], external: dict[str, dict[str, str]] | None = None) -> dict[str, str]:
    """The server container's environment as Kubernetes would resolve it (Secret refs included)."""
    secrets = {d["metadata"]["name"]: {k: base64.b64decode(v).decode() for k, v in d.get("data", {}).items()}
               for d in docs if d["kind"] == "Secret"}
    secrets.update(external or {})
    env: dict[str, str] = {}
    for e in server_container(docs)["env"]:
        if "value" in e:
            env[e["name"]] = str(e["value"])
        else:
            ref = e["valueFrom"]["secretKeyRef"]
            env[e["name"]] = secrets[ref["name"]][ref["key"]]
    return env


def load_rendered(docs: list[dict[str, Any]], tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                  external: dict[str, dict[str, str]] | None = None) -> Settings:
    """What `shrinkserve serve` in the pod would load: the ConfigMap's file plus the rendered env."""
    config = tmp_path / "config.yaml"
    config.write_text(one(docs, "ConfigMap")["data"]["config.yaml"])
    env = container_env(docs, external)
    mounts = {m["mountPath"]: m for m in server_container(docs)["volumeMounts"]}
    assert mounts[env["SHRINKSERVE_CONFIG"]]["subPath"] == "config.yaml"
    for key in list(os.environ):
        if key.startswith("SHRINKSERVE_"):
            monkeypatch.delenv(key)
    for key, value in env.items():
        if key.startswith("SHRINKSERVE_") and key != "SHRINKSERVE_CONFIG":
            monkeypatch.setenv(key, value)
    return load_settings(config)


def merged_values(*files: Path) -> dict[str, Any]:
    """Chart defaults overlaid with values files the way Helm merges maps (null deletes a key)."""
    def merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
        out = copy.deepcopy(base)
        for k, v in over.items():
            if v is None:
                out.pop(k, None)
            elif isinstance(v, dict) and isinstance(out.get(k), dict):
                out[k] = merge(out[k], v)
            else:
                out[k] = v
        return out

    values = yaml.safe_load((CHART / "values.yaml").read_text())
    for f in files:
        values = merge(values, yaml.safe_load(f.read_text()))
    return values


# --- helm lint / template / kubernetes-validate ----------------------------------------------------

@pytest.mark.parametrize("values", [None, *CI_VALUES], ids=lambda v: v.name if v else "defaults")
def test_helm_lint_strict(values: Path | None) -> None:
    r = helm("lint", "--strict", str(CHART), *(["-f", str(values)] if values else []))
    assert "0 chart(s) failed" in r.stdout


@pytest.mark.parametrize("k8s", K8S_VERSIONS, ids=lambda v: v or "latest")
@pytest.mark.parametrize("values", [None, *CI_VALUES], ids=lambda v: v.name if v else "defaults")
def test_rendered_manifests_pass_kubernetes_validate_strict(values: Path | None, k8s: str | None,
                                                             tmp_path: Path) -> None:
    manifests = tmp_path / "manifests.yaml"
    manifests.write_text(render(*([values] if values else [])).stdout)
    tool = find_tool("kubernetes-validate")
    r = subprocess.run([tool, "--strict", *(["-k", k8s] if k8s else []), str(manifests)],
                       capture_output=True, text=True, timeout=300)
    out = r.stdout + r.stderr
    assert r.returncode == 0 and "ERROR" not in out, out
    # Everything but the prometheus-operator CRDs (validated below against their own schema) was checked.
    docs = [d for d in yaml.safe_load_all(manifests.read_text()) if d]
    for d in docs:
        if d["apiVersion"].startswith("monitoring.coreos.com/"):
            continue
        assert f"passed for resource {d['kind'].lower()}/{d['metadata']['name']}" in out, out


def test_kubernetes_validate_is_strict_about_unknown_fields(tmp_path: Path) -> None:
    # Guards the guard: a misspelt pod field must fail, or the check above proves nothing.
    text = render().stdout.replace("enableServiceLinks: false", "enableServiceLink: false")
    (tmp_path / "typo.yaml").write_text(text)
    r = subprocess.run([find_tool("kubernetes-validate"), "--strict", str(tmp_path / "typo.yaml")],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode != 0 and "enableServiceLink" in r.stdout + r.stderr


# --- prometheus-operator CRDs ----------------------------------------------------------------------

def crd_validator(kind: str):
    """jsonschema validator for the vendored openAPIV3Schema, strict like `kubectl --validate=strict`:
    objects with declared properties reject undeclared ones unless the CRD preserves unknown fields."""
    import jsonschema

    def strict(node: Any) -> Any:
        if isinstance(node, dict):
            node = {k: strict(v) for k, v in node.items()}
            if ("properties" in node and "additionalProperties" not in node
                    and not node.get("x-kubernetes-preserve-unknown-fields")):
                node["additionalProperties"] = False
            return node
        if isinstance(node, list):
            return [strict(v) for v in node]
        return node

    schema = json.loads((DATA / f"{kind.lower()}.crd-schema.json").read_text())
    schema.pop("$comment", None)
    return jsonschema.Draft7Validator(strict(schema))


@pytest.mark.parametrize(("values", "kind"), [(GPU_VALUES, "ServiceMonitor"),
                                              (CHART / "ci" / "podmonitor-values.yaml", "PodMonitor")])
def test_monitor_validates_against_prometheus_operator_crd(values: Path, kind: str) -> None:
    docs = docs_of(values)
    monitor = one(docs, kind)
    errors = [f"{'/'.join(map(str, e.path))}: {e.message}" for e in crd_validator(kind).iter_errors(monitor)]
    assert not errors, errors
    # It selects the Service/pods the chart renders, on their named port.
    selector = monitor["spec"]["selector"]["matchLabels"]
    target = one(docs, "Service")["metadata"]["labels"] if kind == "ServiceMonitor" else \
        one(docs, "Deployment")["spec"]["template"]["metadata"]["labels"]
    assert selector.items() <= target.items()
    endpoints = monitor["spec"]["endpoints" if kind == "ServiceMonitor" else "podMetricsEndpoints"]
    assert endpoints[0]["port"] == "http" and endpoints[0]["path"] == "/metrics"
    # A mistake the CRD must catch (so the validation above is not vacuous).
    bad = copy.deepcopy(monitor)
    bad["spec"]["selectorr"] = bad["spec"].pop("selector")
    endpoints = bad["spec"]["endpoints" if kind == "ServiceMonitor" else "podMetricsEndpoints"]
    endpoints[0]["interval"] = "10 seconds"
    messages = " ".join(e.message for e in crd_validator(kind).iter_errors(bad))
    assert "selectorr" in messages and "10 seconds" in messages


# --- values.schema.json ----------------------------------------------------------------------------

SCHEMA_REJECTS = {
    "type": ({"replicaCount": "two"}, "replicaCount"),
    "unknown-top-level-key": ({"resource": {"limits": {"cpu": 2}}}, "resource"),
    "log-level": ({"server": {"logLevel": "verbose"}}, "logLevel"),
    "profile-key-typo": ({"config": {"profiles": {"x": {"methd": "gguf:q4_0"}}}}, "methd"),
    "unknown-engine": ({"config": {"profiles": {"x": {"method": "hf", "engine": "tensorrt"}}}}, "engine"),
    "vllm-option-typo": ({"config": {"profiles": {"x": {"method": "hf", "engine": "vllm",
                                                        "vllm": {"tensor_parallel": 2}}}}}, "tensor_parallel"),
    "device": ({"config": {"profiles": {"x": {"method": "hf", "device": "tpu"}}}}, "device"),
    "group-size": ({"config": {"profiles": {"x": {"method": "rtn", "group_size": 48}}}}, "group_size"),
    "two-bases-no-base": ({"config": {"bases": {"other": {"source": "embedded"}}}}, "base is required"),
    "access-mode": ({"cache": {"persistence": {"accessModes": ["ReadWriteSometimes"]}}}, "accessModes"),
    "quantity": ({"resources": {"limits": {"memory": "lots"}}}, "memory"),
    "scrape-interval": ({"metrics": {"serviceMonitor": {"interval": "10 seconds"}}}, "interval"),
    "gpu-count": ({"gpu": {"count": 0}}, "count"),
    "probe": ({"probes": {"startup": {"failureThreshold": 0}}}, "failureThreshold"),
}


@pytest.mark.parametrize("case", SCHEMA_REJECTS)
def test_values_schema_rejects_bad_values(case: str, tmp_path: Path) -> None:
    values, fragment = SCHEMA_REJECTS[case]
    bad = values_file(tmp_path, values)
    r = render(bad, check=False)
    assert r.returncode != 0 and "schema" in r.stderr and fragment in r.stderr, r.stderr
    lint = helm("lint", str(CHART), "-f", str(bad), check=False)
    assert lint.returncode != 0 and fragment in lint.stdout + lint.stderr


RENDER_REFUSES = {
    "rwo-with-replicas": ({"replicaCount": 2}, "ReadWriteMany"),
    "rwo-with-autoscaling": ({"autoscaling": {"enabled": True}}, "ReadWriteMany"),
    "both-monitors": ({"metrics": {"serviceMonitor": {"enabled": True}, "podMonitor": {"enabled": True}}}, "not both"),
    "hpa-bounds": ({"cache": {"persistence": {"enabled": False}},
                    "autoscaling": {"enabled": True, "minReplicas": 5, "maxReplicas": 2}}, "maxReplicas"),
    "grace-shorter-than-drain": ({"terminationGracePeriodSeconds": 20}, "must cover"),
    # The CPU image has no vLLM and the pod no GPU: the profile could never start.
    "vllm-gpu-profile-without-gpu": ({"config": {"profiles": {"v": {"method": "hf", "engine": "vllm"}}}},
                                     "gpu.enabled is false"),
    # tensor_parallel_size 4 cannot start on 2 GPUs (an explicit count otherwise wins over the derived one).
    "gpu-count-below-tp": ({"gpu": {"enabled": True, "count": 2},
                            "config": {"profiles": {"v": {"method": "hf", "engine": "vllm",
                                                          "vllm": {"tensor_parallel_size": 4}}}}},
                           "tensor_parallel_size=4"),
}


@pytest.mark.parametrize("case", RENDER_REFUSES)
def test_render_refuses_inconsistent_values(case: str, tmp_path: Path) -> None:
    values, fragment = RENDER_REFUSES[case]
    r = render(values_file(tmp_path, values), check=False)
    assert r.returncode != 0 and fragment in r.stderr, r.stderr


# Keys of the server's YAML whose pydantic models values.schema.json mirrors under $defs.
MIRRORED = ("bases", "profiles", "capture", "serving", "evaluation")
_REF = re.compile(r'"#/\$defs/([A-Za-z0-9_]+)"')


def settings_defs() -> dict[str, Any]:
    """The models reachable from MIRRORED in Settings' JSON schema, as the chart carries them (no
    titles, docs or defaults: Helm only needs the shape)."""
    drop = {"title", "description", "default", "format"}

    def norm(node: Any) -> Any:
        if isinstance(node, dict):
            return {k: ({n: norm(s) for n, s in v.items()} if k == "properties" else norm(v))
                    for k, v in node.items() if k not in drop}
        if isinstance(node, list):
            return [norm(v) for v in node]
        return node

    schema = Settings.model_json_schema()
    todo = [name for key in MIRRORED for name in _REF.findall(json.dumps(schema["properties"][key]))]
    reachable: set[str] = set()
    while todo:
        name = todo.pop()
        if name not in reachable:
            reachable.add(name)
            todo += _REF.findall(json.dumps(schema["$defs"][name]))
    return {name: norm(schema["$defs"][name]) for name in sorted(reachable)}


def test_values_schema_mirrors_the_server_models() -> None:
    path = CHART / "values.schema.json"
    chart = json.loads(path.read_text())
    expected = settings_defs()
    if os.environ.get("SHRINKSERVE_UPDATE_CHART_SCHEMA") == "1":
        chart["$defs"] = expected
        path.write_text(json.dumps(chart, indent=2) + "\n")
    differing = sorted(n for n in set(expected) | set(chart["$defs"]) if expected.get(n) != chart["$defs"].get(n))
    assert not differing, (
        f"helm/shrinkserve/values.schema.json $defs {differing} differ from the server's settings models; "
        f"update with: SHRINKSERVE_UPDATE_CHART_SCHEMA=1 .venv/bin/python -m pytest tests/test_helm.py -k mirrors")
    # Each mirrored key points at the same model as in Settings.
    settings = Settings.model_json_schema()["properties"]
    config = chart["properties"]["config"]["properties"]
    for key in MIRRORED:
        assert _REF.findall(json.dumps(config[key])) == _REF.findall(json.dumps(settings[key])), key


def test_values_schema_config_keys_are_settings_fields() -> None:
    schema = json.loads((CHART / "values.schema.json").read_text())
    assert set(schema["properties"]["config"]["properties"]) <= set(Settings.model_fields)


# --- the chart's config and env, read by the server's own loader ----------------------------------

def test_default_values_config_is_the_server_default_config() -> None:
    # The CPU image prebuilds the default config's profiles; the chart's defaults must be those.
    values = yaml.safe_load((CHART / "values.yaml").read_text())["config"]
    server = yaml.safe_load(default_config_path().read_text())
    for key in ("bases", "profiles", "routes"):
        assert values[key] == server[key], key


@pytest.mark.parametrize("values", [None, *CI_VALUES], ids=lambda v: v.name if v else "defaults")
def test_rendered_configmap_and_env_load_with_server_settings(values: Path | None, tmp_path: Path,
                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    files = [values] if values else []
    docs = docs_of(*files)
    external = {"my-shrinkserve-keys": {"api-keys": '["from-existing-secret"]'}}
    settings = load_rendered(docs, tmp_path, monkeypatch, external)
    expected = merged_values(*files)
    assert set(settings.profiles) == set(expected["config"]["profiles"])
    assert settings.routes == {"/" + k.strip("/"): v for k, v in expected["config"]["routes"].items()}
    for name, spec in expected["config"]["profiles"].items():
        for key, value in spec.items():
            got = getattr(settings.profiles[name], key)
            if isinstance(got, BaseModel):  # a nested block (vllm:, gate:): what the values set
                got = got.model_dump(exclude_unset=True)
            assert got == value, (name, key)
    for key, value in expected["config"].get("capture", {}).items():
        got = getattr(settings.capture, key)
        assert (str(got) if isinstance(got, Path) else got) == value, key
    for key, value in expected["config"].get("evaluation", {}).items():
        assert getattr(settings.evaluation, key) == value, key
    serving = expected["config"].get("serving", {})
    assert settings.serving.model_dump(exclude_unset=True) == serving
    assert settings.drain_timeout_seconds == expected["server"]["drainTimeoutSeconds"]
    assert settings.host == "0.0.0.0" and settings.port == expected["server"]["port"]
    assert str(settings.cache_dir) == expected["cache"]["mountPath"]
    assert settings.log_level == expected["server"]["logLevel"]
    keys = expected["apiKeys"]["keys"] or (["from-existing-secret"] if expected["apiKeys"]["existingSecret"] else [])
    assert settings.api_keys == keys
    # Every SHRINKSERVE_* variable the chart sets is a setting the server has (it ignores unknown ones).
    for name in container_env(docs, external):
        if name.startswith("SHRINKSERVE_") and name != "SHRINKSERVE_CONFIG":
            assert name.removeprefix("SHRINKSERVE_").lower().split("__")[0] in Settings.model_fields, name


def test_threads_follow_cpu_resources(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    cases = [({"resources": {"requests": {"cpu": "1500m"}}}, 1),
             ({"resources": {"requests": {"cpu": 2}, "limits": {"cpu": "6"}}}, 6),
             ({"resources": {"requests": {"cpu": "250m"}}}, 1),
             ({"server": {"threads": 5}}, 5)]
    for i, (values, threads) in enumerate(cases):
        docs = docs_of(values_file(tmp_path, values, f"v{i}.yaml"))
        assert load_rendered(docs, tmp_path, monkeypatch).threads == threads, values


LOADER_REJECTS = {
    "route-to-unknown-profile": ({"routes": {"/x": "nosuch"}}, "unknown profile"),
    "unknown-quant-type": ({"profiles": {"bad": {"method": "gguf:q9_z"}}}, "q9_z"),
    "unknown-base": ({"profiles": {"bad": {"method": "gguf:q8_0", "base": "nosuch"}}}, "unknown base"),
    "file-without-path": ({"profiles": {"bad": {"method": "gguf:file"}}}, "needs 'path'"),
    "engine-mismatch": ({"profiles": {"bad": {"method": "gguf:q8_0", "engine": "torch"}}}, "cannot run on engine"),
    "route-collides": ({"routes": {"/v1": "base"}}, "collides"),
}


@pytest.mark.parametrize("case", LOADER_REJECTS)
def test_values_the_server_cannot_read_fail_to_load(case: str, tmp_path: Path,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    # These pass the chart's schema and render; the server's loader is what refuses them.
    config, fragment = LOADER_REJECTS[case]
    docs = docs_of(values_file(tmp_path, {"config": config}))
    with pytest.raises(ValueError, match=fragment.replace("(", r"\(")):
        load_rendered(docs, tmp_path, monkeypatch)


# --- what the Deployment does ----------------------------------------------------------------------

def test_deployment_security_probes_and_mounts() -> None:
    docs = docs_of()
    pod = one(docs, "Deployment")["spec"]["template"]["spec"]
    c = server_container(docs)
    assert pod["securityContext"]["runAsNonRoot"] and pod["securityContext"]["runAsUser"] != 0
    assert c["securityContext"]["readOnlyRootFilesystem"] and not c["securityContext"]["allowPrivilegeEscalation"]
    assert c["securityContext"]["capabilities"]["drop"] == ["ALL"]
    # Writable: the cache and /tmp only.
    volumes = {v["name"]: v for v in pod["volumes"]}
    writable = {m["mountPath"]: volumes[m["name"]] for m in c["volumeMounts"] if not m.get("readOnly")}
    assert set(writable) == {"/var/cache/shrinkserve", "/tmp"}
    assert "persistentVolumeClaim" in writable["/var/cache/shrinkserve"] and "emptyDir" in writable["/tmp"]
    assert c["livenessProbe"]["httpGet"]["path"] == "/health"
    assert c["readinessProbe"]["httpGet"]["path"] == "/ready"
    startup = c["startupProbe"]
    assert startup["httpGet"]["path"] == "/ready" and startup["periodSeconds"] * startup["failureThreshold"] >= 1800
    assert pod["enableServiceLinks"] is False  # SHRINKSERVE_PORT=tcp://... would break the port setting
    # SIGTERM drain: preStop keeps serving while endpoints update, then the drain, then 15 s to stop engines
    assert c["lifecycle"]["preStop"]["exec"]["command"] == ["sleep", "5"]
    env = {e["name"]: e.get("value") for e in c["env"]}
    assert env["SHRINKSERVE_DRAIN_TIMEOUT_SECONDS"] == "30"
    assert pod["terminationGracePeriodSeconds"] == 5 + 30 + 15
    assert one(docs, "Deployment")["spec"]["strategy"]["type"] == "Recreate"  # RWO PVC
    pvc = one(docs, "PersistentVolumeClaim")
    assert pvc["metadata"]["name"] == volumes["cache"]["persistentVolumeClaim"]["claimName"]
    for d in docs:
        labels = d["metadata"]["labels"]
        assert {"app.kubernetes.io/name", "app.kubernetes.io/instance", "app.kubernetes.io/version",
                "app.kubernetes.io/managed-by", "helm.sh/chart"} <= set(labels), d["kind"]


def test_gpu_autoscaling_values() -> None:
    from shrinkserve.server.runtime.metrics import Metrics

    docs = docs_of(GPU_VALUES)
    pod = one(docs, "Deployment")["spec"]["template"]["spec"]
    c = server_container(docs)
    assert c["resources"]["limits"]["nvidia.com/gpu"] == 1
    assert c["image"].endswith(":0.1.0-gpu")
    assert pod["nodeSelector"]["nvidia.com/gpu.present"] == "true"
    assert any(t["key"] == "nvidia.com/gpu" for t in pod["tolerations"])
    assert pod["runtimeClassName"] == "nvidia"
    assert "replicas" not in one(docs, "Deployment")["spec"]  # the HPA owns it
    assert one(docs, "Deployment")["spec"]["strategy"]["type"] == "RollingUpdate"  # RWX cache
    assert one(docs, "PersistentVolumeClaim")["spec"]["accessModes"] == ["ReadWriteMany"]
    hpa = one(docs, "HorizontalPodAutoscaler")["spec"]
    metrics = {m["type"]: m for m in hpa["metrics"]}
    assert metrics["Resource"]["resource"]["name"] == "cpu"
    waiting = metrics["Pods"]["pods"]["metric"]["name"]
    assert waiting in {f.name for f in Metrics().registry.collect()}, "HPA scales on a metric the server lacks"
    # No vLLM profile here: the explicit count is what the pod requests, the startup budget is the build one.
    assert "vllm" not in one(docs, "ConfigMap")["data"]["config.yaml"]
    assert c["startupProbe"]["failureThreshold"] == 180


def test_config_and_key_changes_roll_the_pods(tmp_path: Path) -> None:
    def annotations(values: dict[str, Any], name: str) -> dict[str, str]:
        docs = docs_of(values_file(tmp_path, values, name))
        return one(docs, "Deployment")["spec"]["template"]["metadata"]["annotations"]

    base = annotations({}, "a.yaml")
    same = annotations({"server": {"logLevel": "info"}}, "b.yaml")
    config = annotations({"config": {"profiles": {"q4_0": {"method": "gguf:q4_0"}}}}, "c.yaml")
    keys = annotations({"apiKeys": {"keys": ["k"]}}, "d.yaml")
    assert base == same
    assert config["checksum/config"] != base["checksum/config"]
    assert keys["checksum/api-keys"] != base["checksum/api-keys"]


def test_seed_init_container_copies_artifacts_atomically_and_once(tmp_path: Path) -> None:
    """The init container's script, run for real on a cache made by the server's own ArtifactCache."""
    from shrinkserve.compression.cache import ArtifactCache

    init = one(docs_of(), "Deployment")["spec"]["template"]["spec"]["initContainers"][0]
    assert init["name"] == "seed-cache" and init["command"][:2] == ["/bin/sh", "-c"]
    script = init["command"][2]

    src, dst = ArtifactCache(tmp_path / "image-cache"), tmp_path / "volume"
    key, other = "a" * 64, "b" * 64

    def build(text: str):
        def write(work: Path) -> None:
            (work / "model.gguf").write_text(text)
            (work / "sub").mkdir()
            (work / "sub" / "tokenizer.json").write_text("{}")
        return write

    for k in (key, other):
        src.get_or_build(k, name=k[:4], recipe={}, inputs={}, tools={}, build=build(f"weights {k[:4]}"))
    # The volume already holds `other` (built by a pod earlier): the seed must leave it alone.
    ArtifactCache(dst).get_or_build(other, name="other", recipe={}, inputs={}, tools={}, build=build("pod's own"))

    def run() -> str:
        r = subprocess.run(["sh", "-c", script], capture_output=True, text=True, timeout=60,
                           env={"PATH": os.environ["PATH"], "SEED_SRC": str(src.root), "SEED_DST": str(dst)})
        assert r.returncode == 0, r.stderr
        return r.stdout

    assert run().split() == ["seeded", key]
    assert run() == ""  # idempotent: nothing left to copy
    cache = ArtifactCache(dst)
    seeded = cache.lookup(key)
    assert seeded is not None and (seeded.path / "model.gguf").read_text() == "weights aaaa"  # sha256-verified
    assert (cache.lookup(other).path / "model.gguf").read_text() == "pod's own"
    assert not list((dst / "tmp").iterdir())
    # An image without baked artifacts (the GPU target) is fine too.
    r = subprocess.run(["sh", "-c", script], capture_output=True, text=True, timeout=60,
                       env={"PATH": os.environ["PATH"], "SEED_SRC": str(tmp_path / "none"), "SEED_DST": str(dst)})
    assert r.returncode == 0


def test_notes_tell_how_to_reach_the_api(tmp_path: Path) -> None:
    # NOTES.txt only renders on install (which needs a cluster): render its named template instead.
    chart = tmp_path / "chart"
    shutil.copytree(CHART, chart)
    (chart / "templates" / "notes-preview.yaml").write_text(
        'apiVersion: v1\nkind: ConfigMap\nmetadata:\n  name: notes\ndata:\n'
        '  notes: {{ include "shrinkserve.notes" . | quote }}\n')
    assert (CHART / "templates" / "NOTES.txt").read_text().strip() == '{{ include "shrinkserve.notes" . }}'

    def notes(*values: Path) -> str:
        out = render(*values, chart=chart).stdout
        return next(d for d in yaml.safe_load_all(out) if d and d["metadata"]["name"] == "notes")["data"]["notes"]

    default = notes()
    assert f"port-forward service/{RELEASE}-shrinkserve 8000:8000" in default
    assert f"http://{RELEASE}-shrinkserve.{NAMESPACE}.svc:8000/v1" in default
    assert "No API keys are set" in default
    gpu = notes(GPU_VALUES)
    assert "request 1 nvidia.com/gpu" in gpu and "PyTorch engine on CUDA" in gpu and "vLLM profiles" not in gpu
    assert "Authorization: Bearer" in gpu and "prometheus-adapter" in gpu
    vllm = notes(VLLM_VALUES)
    assert "request 2 nvidia.com/gpu" in vllm and "base-vllm (tp 2)" in vllm
    assert "/var/cache/shrinkserve/logs/vllm-<profile>.log" in vllm
    assert "NODE_PORT" in notes(CHART / "ci" / "podmonitor-values.yaml")


def test_gpu_values_prepare_vllm_children(tmp_path: Path) -> None:
    """GPU pods get the vLLM venv's interpreter and an in-memory /dev/shm (vLLM workers share tensors there);
    CPU pods get neither."""
    docs = docs_of(GPU_VALUES)
    pod = one(docs, "Deployment")["spec"]["template"]["spec"]
    env = container_env(docs)
    assert env["SHRINKSERVE_VLLM_PYTHON"] == "/opt/vllm/bin/python"  # the Dockerfile's gpu stage puts it there
    volumes = {v["name"]: v for v in pod["volumes"]}
    assert volumes["dshm"]["emptyDir"] == {"medium": "Memory", "sizeLimit": "8Gi"}
    assert {"name": "dshm", "mountPath": "/dev/shm"} in server_container(docs)["volumeMounts"]
    no_shm = tmp_path / "no-shm.yaml"
    no_shm.write_text("gpu: {enabled: true, shmSizeLimit: 0}\n")
    assert "dshm" not in {v["name"] for v in one(docs_of(no_shm), "Deployment")["spec"]["template"]["spec"]["volumes"]}
    cpu = docs_of()
    assert "SHRINKSERVE_VLLM_PYTHON" not in container_env(cpu)
    assert "dshm" not in {v["name"] for v in one(cpu, "Deployment")["spec"]["template"]["spec"]["volumes"]}


def test_gpu_vllm_values(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The CI values with one `engine: vllm` profile at tensor parallelism 2: the pod requests its 2 GPUs, gets
    vLLM's interpreter and a /dev/shm, and a startup probe that outlasts the child's own start-up limit."""
    docs = docs_of(VLLM_VALUES)
    pod = one(docs, "Deployment")["spec"]["template"]["spec"]
    c = server_container(docs)
    assert c["resources"]["limits"]["nvidia.com/gpu"] == 2  # gpu.count null: the profile's tensor_parallel_size
    assert c["image"].endswith(":0.1.0-gpu")
    assert container_env(docs)["SHRINKSERVE_VLLM_PYTHON"] == "/opt/vllm/bin/python"
    assert {v["name"]: v for v in pod["volumes"]}["dshm"]["emptyDir"] == {"medium": "Memory", "sizeLimit": "16Gi"}
    assert {"name": "dshm", "mountPath": "/dev/shm"} in c["volumeMounts"]
    startup = c["startupProbe"]
    budget = startup["periodSeconds"] * startup["failureThreshold"]
    # The build budget of the CPU defaults (30 min) plus the profile's startup_timeout_seconds (900).
    assert budget >= 1800 + 900 and budget - 1800 >= 600
    # What the server loads from it: a vLLM profile with the options the chart counted.
    settings = load_rendered(docs, tmp_path, monkeypatch)
    spec = settings.profiles["base-vllm"]
    assert spec.engine == "vllm" and spec.vllm is not None and spec.vllm.tensor_parallel_size == 2
    assert spec.vllm.startup_timeout_seconds == 900 and settings.evaluation.min_vllm_agreement == 0.95
    assert settings.routes["/vllm"] == "base-vllm"


def test_gpu_count_and_startup_budget_follow_vllm_profiles(tmp_path: Path) -> None:
    def rendered(values: dict[str, Any], name: str) -> tuple[int, int]:
        c = server_container(docs_of(values_file(tmp_path, values, name)))
        probe = c["startupProbe"]
        return c["resources"]["limits"]["nvidia.com/gpu"], probe["periodSeconds"] * probe["failureThreshold"]

    profiles = {
        "tp2": {"method": "hf", "engine": "vllm", "vllm": {"tensor_parallel_size": 2}},  # default start-up 600 s
        "tp1": {"method": "rtn", "engine": "vllm", "device": "cuda", "vllm": {"startup_timeout_seconds": 95}},
        # vLLM-CPU: no GPU, but its start-up counts.
        "cpu": {"method": "rtn", "engine": "vllm", "device": "cpu", "lm_head_bits": None},
        # Lazy: started on first request, /ready does not wait for it; its GPU is still needed.
        "lazy": {"method": "hf", "engine": "vllm", "load": "lazy", "vllm": {"tensor_parallel_size": 3}},
    }
    gpus, budget = rendered({"gpu": {"enabled": True}, "config": {"profiles": profiles}}, "all.yaml")
    assert gpus == 2 + 1 + 3
    assert budget == 1800 + 600 + 100 + 600  # 95 s rounded up to whole 10 s periods
    # An explicit count wins.
    assert rendered({"gpu": {"enabled": True, "count": 8}, "config": {"profiles": profiles}}, "n.yaml")[0] == 8
    # No vLLM profile: one GPU (the PyTorch engine's), the plain build budget.
    assert rendered({"gpu": {"enabled": True}}, "none.yaml") == (1, 1800)
    # Only vLLM-CPU profiles need no GPU and no gpu.enabled: the CPU pod gets none.
    c = server_container(docs_of(values_file(tmp_path, {"config": {"profiles": {"cpu": profiles["cpu"]}}}, "c.yaml")))
    assert "nvidia.com/gpu" not in c["resources"].get("limits", {})
    assert c["startupProbe"]["failureThreshold"] == 180 + 60
