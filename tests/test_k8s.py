"""docker/k8s/: every manifest passes kubernetes-validate (offline, its bundled schemas, strict),
and what the manifests say agrees with what the programs they run use: each server's args parse
with qwen3vl-serve's own parser, the probes ask Triton's health endpoints on the port the server
listens on, the ports the containers and Services name are the server's, /dev/shm is an
in-memory emptyDir, the checkpoint comes read-only from the claim, and the language servers'
encoder address is the encoder Service's name and the encoders' gRPC port."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from qwen3vl.cli import openai_server, serve

ROOT = Path(__file__).resolve().parents[1]
K8S = ROOT / "docker" / "k8s"
MANIFESTS = sorted(K8S.rglob("*.yaml"))
KUBERNETES_VERSION = "1.33.0"
IMAGE_MODEL_REPOSITORY = "/opt/qwen3vl/model_repository"  # where docker/Dockerfile copies it


def documents(path: Path) -> list[dict]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d]


def resources(deployment: str | None = None) -> list[dict]:
    paths = [K8S / "checkpoint.yaml", *sorted((K8S / deployment).glob("*.yaml"))] if deployment else MANIFESTS
    return [d for p in paths for d in documents(p)]


def of_kind(docs: list[dict], kind: str) -> dict[str, dict]:
    return {d["metadata"]["name"]: d for d in docs if d["kind"] == kind}


def containers(deployment: dict) -> dict[str, dict]:
    return {c["name"]: c for c in deployment["spec"]["template"]["spec"]["containers"]}


def port(container: dict, ref) -> int:
    """A probe's or Service's port: a number, or the name of one of the container's ports."""
    if isinstance(ref, int):
        return ref
    (number,) = [p["containerPort"] for p in container["ports"] if p["name"] == ref]
    return number


def triton(deployment: dict):
    """(the Triton container, its parsed qwen3vl-serve args)."""
    c = containers(deployment)["triton"]
    assert "command" not in c, "args, not command: the image's entrypoint (nvidia_entrypoint.sh) stays"
    assert c["args"][0] == "qwen3vl-serve"
    return c, serve.parse_args(c["args"][1:])


def test_there_are_manifests_for_both_deployments():
    names = {p.relative_to(K8S).as_posix() for p in MANIFESTS}
    assert {"checkpoint.yaml", "aggregated/triton.yaml", "disaggregated/encoder.yaml",
            "disaggregated/language.yaml", "disaggregated/openai.yaml"} <= names


@pytest.mark.parametrize("path", MANIFESTS, ids=lambda p: p.relative_to(K8S).as_posix())
def test_kubernetes_validate_passes_offline(path):
    import kubernetes_validate

    docs = documents(path)
    assert docs
    for doc in docs:
        # raises ValidationError (schema) or SchemaNotFoundError; needs no cluster, no network
        kubernetes_validate.validate(doc, KUBERNETES_VERSION, strict=True)


def test_a_bad_manifest_is_caught():
    """The validator does reject: a port as a string (the mistake it is here for)."""
    import kubernetes_validate

    bad = documents(K8S / "disaggregated" / "encoder.yaml")[0]
    bad["spec"]["template"]["spec"]["containers"][0]["ports"][0]["containerPort"] = "8000"
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(bad, KUBERNETES_VERSION, strict=True)


@pytest.mark.parametrize("deployment", ["aggregated", "disaggregated"])
def test_servers_probes_ports_shm_checkpoint_and_resources(deployment):
    docs = resources(deployment)
    (claim,) = of_kind(docs, "PersistentVolumeClaim").values()
    deployments = of_kind(docs, "Deployment")
    assert deployments
    roles = set()
    for name, d in deployments.items():
        c, args = triton(d)
        roles.add(args.role)
        pod = d["spec"]["template"]
        assert d["spec"]["selector"]["matchLabels"].items() <= pod["metadata"]["labels"].items(), name
        # listens where the probes and Services look: every interface, the ports it is given
        assert args.host == "0.0.0.0"
        assert {p["name"]: p["containerPort"] for p in c["ports"]} == \
            {"http": args.http_port, "grpc": args.grpc_port, "metrics": args.metrics_port}
        assert pod["metadata"]["annotations"]["prometheus.io/port"] == str(args.metrics_port)
        probes = {k: c[k] for k in ("startupProbe", "readinessProbe", "livenessProbe")}
        for kind, path in (("startupProbe", "/v2/health/ready"), ("readinessProbe", "/v2/health/ready"),
                           ("livenessProbe", "/v2/health/live")):
            assert probes[kind]["httpGet"]["path"] == path, (name, kind)
            assert port(c, probes[kind]["httpGet"]["port"]) == args.http_port, (name, kind)
        startup = probes["startupProbe"]
        assert startup["periodSeconds"] * startup["failureThreshold"] >= 600, "minutes to load the weights"
        assert pod["spec"]["terminationGracePeriodSeconds"] > 30, "Triton drains for 30 s after SIGTERM"
        # the checkpoint: from the claim, read-only, where --checkpoint points; the image's repository
        volumes = {v["name"]: v for v in pod["spec"]["volumes"]}
        mounts = {m["mountPath"]: m for m in c["volumeMounts"]}
        ckpt = mounts[args.checkpoint]
        assert ckpt["readOnly"] is True
        assert volumes[ckpt["name"]]["persistentVolumeClaim"]["claimName"] == claim["metadata"]["name"]
        assert "ReadOnlyMany" in claim["spec"]["accessModes"]
        assert args.model_repository == IMAGE_MODEL_REPOSITORY
        # /dev/shm in memory, bounded, inside the memory the container is given
        shm = volumes[mounts["/dev/shm"]["name"]]["emptyDir"]
        assert shm["medium"] == "Memory" and shm["sizeLimit"]
        limits, requests = c["resources"]["limits"], c["resources"]["requests"]
        assert limits["nvidia.com/gpu"] == requests["nvidia.com/gpu"] == 1
        assert gib(shm["sizeLimit"]) < gib(limits["memory"]) and gib(requests["memory"]) <= gib(limits["memory"])
        assert not args.transfer_shared_memory, "pods have their own IPC namespaces"
        assert c["image"] == "qwen3vl-triton:latest"  # the compose files' image name
    want = {"aggregated": {"aggregated"}, "disaggregated": {"encoder", "language"}}[deployment]
    assert roles == want


def gib(quantity: str) -> float:
    units = {"Gi": 1, "Mi": 1 / 1024}
    return float(quantity[:-2]) * units[quantity[-2:]]


def test_language_servers_find_the_encoders_through_the_encoder_service():
    docs = resources("disaggregated")
    deployments, services = of_kind(docs, "Deployment"), of_kind(docs, "Service")
    roles = {triton(d)[1].role: (name, *triton(d)) for name, d in deployments.items()}
    _, _, language = roles["language"]
    encoder_name, encoder_container, encoder = roles["encoder"]
    (url,) = language.encoder_urls
    host, _, number = url.partition(":")
    service = services[host]
    assert service["spec"].get("type", "ClusterIP") == "ClusterIP" and service["spec"].get("clusterIP") != "None"
    pod_labels = deployments[encoder_name]["spec"]["template"]["metadata"]["labels"]
    assert service["spec"]["selector"].items() <= pod_labels.items()
    (svc_port,) = [p for p in service["spec"]["ports"] if p["port"] == int(number)]
    assert port(encoder_container, svc_port["targetPort"]) == encoder.grpc_port


@pytest.mark.parametrize("deployment", ["aggregated", "disaggregated"])
def test_every_service_selects_pods_and_targets_ports_they_have(deployment):
    docs = resources(deployment)
    deployments = of_kind(docs, "Deployment")
    for name, svc in of_kind(docs, "Service").items():
        selected = [d for d in deployments.values()
                    if svc["spec"]["selector"].items() <= d["spec"]["template"]["metadata"]["labels"].items()]
        assert len(selected) == 1, name
        named = {p["name"]: p["containerPort"] for c in containers(selected[0]).values() for p in c["ports"]}
        for p in svc["spec"]["ports"]:
            assert p["targetPort"] in named, (name, p)
            assert p["port"] == named[p["targetPort"]], "the Service keeps the server's port numbers"


@pytest.mark.parametrize("deployment", ["aggregated", "disaggregated"])
def test_the_openai_sidecar_talks_to_its_own_pods_triton(deployment):
    docs = resources(deployment)
    for name, d in of_kind(docs, "Deployment").items():
        c, args = triton(d)
        if args.role == "encoder":
            assert "openai" not in containers(d), "an encoder server has no ensemble"
            continue
        api = containers(d)["openai"]
        assert api["args"][0] == "qwen3vl-openai" and "command" not in api
        a = openai_server.parse_args(api["args"][1:])
        assert a.triton_url == f"127.0.0.1:{args.grpc_port}" and a.host == "0.0.0.0"
        assert port(api, "openai") == a.port
        assert api["readinessProbe"]["httpGet"]["path"] == "/health"
        assert port(api, api["readinessProbe"]["httpGet"]["port"]) == a.port
    services = of_kind(docs, "Service")
    assert any(p["targetPort"] == "openai" for s in services.values() for p in s["spec"]["ports"])
