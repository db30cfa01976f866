"""Stable network: the headless governing Service and the EndpointSlices that list every ready pod."""

import pytest
from kubernetes import client

from fixtures import manifests
from fixtures.execs import sh
from fixtures.recorder import generic_state
from fixtures.resolver import resolver_for
from fixtures.sts import create, is_ready, pod_name, recreate_pod, running_and_ready
from fixtures.waits import eventually

STS = "sts-xiuxian"
SVC = "svc-headless"


def ready_endpoints(slices: dict) -> dict[str, str]:
    """hostname -> address of every ready endpoint in the Service's EndpointSlices."""
    found = {}
    for item in slices.values():
        for endpoint in item.get("endpoints") or []:
            if (endpoint.get("conditions") or {}).get("ready"):
                found[endpoint.get("hostname") or f"<no hostname: {endpoint.get('targetRef', {}).get('name')}>"] = (
                    endpoint["addresses"][0]
                )
    return found


@pytest.mark.behaviour("headless_service")
def test_headless_service(api, namespace, pods, watch, readiness):
    slices = watch(
        client.DiscoveryV1Api(api).list_namespaced_endpoint_slice,
        "endpointslices",
        generic_state,
        label_selector=f"kubernetes.io/service-name={SVC}",
    )
    create(api, namespace, "headless-network", replicas=3, readiness_switch=True)
    service = client.CoreV1Api(api).read_namespaced_service(SVC, namespace)
    assert service.spec.cluster_ip == "None", "the governing Service is not headless"

    objs = pods.wait_for(running_and_ready(STS, range(3)), "3 pods")
    expected = {pod_name(STS, i): objs[pod_name(STS, i)]["status"]["podIP"] for i in range(3)}
    slices.wait_for(lambda s: ready_endpoints(s) == expected, f"EndpointSlices to list {expected} by hostname")

    pods.mark(f"make {pod_name(STS, 1)} unready")
    readiness.set(pod_name(STS, 1), False)
    pods.wait_for(lambda o: not is_ready(o[pod_name(STS, 1)]), "pod 1 unready")
    del expected[pod_name(STS, 1)]
    slices.wait_for(lambda s: ready_endpoints(s) == expected, "the unready pod to leave the ready endpoints")


@pytest.mark.behaviour("pod_dns_records")
@pytest.mark.needs("dns")
def test_pod_dns_records(api, cluster, namespace, pods, wait_timeout):
    resolver = resolver_for(cluster, api, namespace)
    if resolver is None:
        pytest.skip("this cluster's DNS can be asked neither directly nor from a pod")
    create(api, namespace, "headless-network", replicas=3)
    objs = pods.wait_for(running_and_ready(STS, range(3)), "3 pods")
    domain = f"{SVC}.{namespace}.svc.{resolver.zone}"
    ips = {pod_name(STS, i): objs[pod_name(STS, i)]["status"]["podIP"] for i in range(3)}

    def records_match() -> bool:
        return all(resolver.a(f"{name}.{domain}") == {ip} for name, ip in ips.items()) and resolver.a(domain) == set(
            ips.values()
        )

    _wait_until(records_match, wait_timeout, f"A records for every pod under {domain}")
    assert resolver.srv(f"_web._tcp.{domain}") == {(f"{name}.{domain}", 80) for name in ips}, (
        "SRV records for the named port do not list every pod"
    )

    victim = pod_name(STS, 1)
    objs = recreate_pod(api, pods, victim, until=running_and_ready(STS, range(3)), what=f"{victim} recreated")
    ips[victim] = objs[victim]["status"]["podIP"]
    _wait_until(records_match, wait_timeout, f"{victim}.{domain} to resolve to its new IP {ips[victim]}")


def _wait_until(check, timeout, what) -> None:
    """DNS has no watch: a bounded retry."""
    assert eventually(check, timeout), f"timed out after {timeout:.0f}s waiting for {what}"


@pytest.mark.behaviour("service_spreads")
@pytest.mark.needs("containers")
def test_service_spreads(api, namespace, pods):
    # Seed 000: each pod serves its own page (AAA, BBB, CCC); the ClusterIP Service reaches all three.
    manifests.apply(
        api,
        manifests.load("headless-network", namespace, replicas=3)
        + manifests.load("web-service", namespace)
        + manifests.load("client-pod", namespace),
    )
    pods.wait_for(
        lambda o: (
            running_and_ready(STS, range(3))(o) and o.get("probe", {}).get("status", {}).get("phase") == "Running"
        ),
        "3 web pods and the probe",
    )
    pages = {pod_name(STS, i): text for i, text in enumerate(("AAA", "BBB", "CCC"))}
    for pod, text in pages.items():
        sh(api, namespace, pod, f"echo {text} > /usr/share/nginx/html/index.html")
    seen: set[str] = set()
    # kube-proxy picks a backend per connection at random: ask until all three answered, bounded.
    for _ in range(60):
        seen.add(sh(api, namespace, "probe", "wget -qO- -T 2 http://svc-sts-xiuxian").strip())
        if seen >= set(pages.values()):
            break
    assert seen >= set(pages.values()), f"60 requests reached only {sorted(seen)}"
