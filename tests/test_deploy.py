"""The Kubernetes manifests under deploy/ are consistent with the programs they start: tandem's
and smg's own argument parsers take their args, probes and ports agree, and the shutdown
budget covers the drain. (Parsed here, not run on a cluster.)"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml
from smg.launch_router import parse_router_args

from tandem.service.cli import build_parser
from tandem.service.flags import from_flags
from tandem.service.server import ServerOptions

ROOT = Path(__file__).resolve().parents[1]
K8S = ROOT / "deploy" / "kubernetes"


def objects() -> dict[tuple[str, str], dict[str, Any]]:
    found = {}
    for path in sorted(K8S.glob("*.yaml")):
        for doc in yaml.safe_load_all(path.read_text()):
            found[(doc["kind"], doc["metadata"]["name"])] = doc
    return found


def container(obj: dict[str, Any]) -> dict[str, Any]:
    return obj["spec"]["template"]["spec"]["containers"][0]


def serve_options(sts: dict[str, Any]) -> ServerOptions:
    """The replica's args through tandem's own parser."""
    return from_flags(ServerOptions, build_parser().parse_args(container(sts)["args"]))


def test_tandem_replicas_probe_health_and_outlast_their_drain() -> None:
    objs = objects()
    sts = objs[("StatefulSet", "tandem")]
    c = container(sts)
    args = serve_options(sts)
    assert args.host == "0.0.0.0"
    port = args.port
    assert {p["containerPort"] for p in c["ports"]} >= {port, args.metrics_port}
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        assert c[probe]["grpc"]["port"] == port, probe  # grpc.health.v1
    pause = c["lifecycle"]["preStop"]["sleep"]["seconds"]
    assert sts["spec"]["template"]["spec"]["terminationGracePeriodSeconds"] >= pause + args.grace + 5
    service = objs[("Service", sts["spec"]["serviceName"])]
    assert service["spec"]["clusterIP"] == "None"  # headless: one DNS name per replica
    assert service["spec"]["selector"] == sts["spec"]["template"]["metadata"]["labels"]


def test_the_router_lists_every_replica_by_its_stable_name() -> None:
    objs = objects()
    sts = objs[("StatefulSet", "tandem")]
    port = serve_options(sts).port
    router = parse_router_args(container(objs[("Deployment", "smg")])["args"])  # smg's own parser
    name, service = sts["metadata"]["name"], sts["spec"]["serviceName"]
    expected = [f"grpc://{name}-{i}.{service}:{port}" for i in range(sts["spec"]["replicas"])]
    assert list(router.worker_urls) == expected


def test_envoy_in_kubernetes_reads_the_checked_in_config() -> None:
    objs = objects()
    envoy = container(objs[("Deployment", "tandem-envoy")])
    config = yaml.safe_load((ROOT / "deploy" / "envoy" / "envoy.yaml").read_text())
    mount = envoy["volumeMounts"][0]["mountPath"]
    assert envoy["args"] == ["-c", f"{mount}/envoy.yaml"]
    hcm = config["static_resources"]["listeners"][0]["filter_chains"][0]["filters"][0]["typed_config"]
    assert hcm["http_filters"][0]["typed_config"]["proto_descriptor"] == f"{mount}/tandem.pb"
    endpoint = config["static_resources"]["clusters"][0]["load_assignment"]["endpoints"][0]["lb_endpoints"][0]
    address = endpoint["endpoint"]["address"]["socket_address"]
    sts = objs[("StatefulSet", "tandem")]
    assert address["address"] == sts["spec"]["serviceName"]
    assert address["port_value"] == serve_options(sts).port
    listener_port = config["static_resources"]["listeners"][0]["address"]["socket_address"]["port_value"]
    assert envoy["ports"][0]["containerPort"] == listener_port
