"""Stable identity: ordinal names, hostname/subdomain, labels, owner, same name after deletion."""

import json

import pytest
from kubernetes import client
from kubernetes.client.rest import ApiException

from fixtures import manifests
from fixtures.execs import run_in
from fixtures.failures import schedulable_node
from fixtures.sts import (
    controller_uid,
    create,
    deleted_and_created_again,
    owned_pods,
    pod_name,
    recreate_pod,
    replaced,
    running_and_ready,
    settled_status,
)

STS = "sts-xiuxian"
SVC = "svc-headless"


def server_minor(api) -> int:
    return int("".join(ch for ch in client.VersionApi(api).get_code().minor if ch.isdigit()))


def assert_identity(pod: dict, sts_uid: str, ordinal: int, pod_index_label: bool) -> None:
    name = pod_name(STS, ordinal)
    meta, spec = pod["metadata"], pod["spec"]
    assert meta["name"] == name
    assert spec.get("hostname") == name, f"{name}: spec.hostname is {spec.get('hostname')!r}"
    assert spec.get("subdomain") == SVC, f"{name}: spec.subdomain is {spec.get('subdomain')!r}, not the serviceName"
    labels = meta.get("labels") or {}
    assert labels.get("statefulset.kubernetes.io/pod-name") == name
    assert labels.get("controller-revision-hash", "").startswith(f"{STS}-"), f"{name}: no controller-revision-hash"
    if pod_index_label:
        assert labels.get("apps.kubernetes.io/pod-index") == str(ordinal), f"{name}: pod-index label missing"
    owners = [o for o in meta.get("ownerReferences") or [] if o.get("controller")]
    assert [(o["kind"], o["name"], o["uid"]) for o in owners] == [("StatefulSet", STS, sts_uid)], (
        f"{name}: not controlled by the StatefulSet"
    )


@pytest.mark.behaviour("ordinal_identity")
@pytest.mark.parametrize("start", [None, 5], ids=["ordinals-from-0", "ordinals-start-5"])
def test_ordinal_identity(api, namespace, pods, start):
    ordinals = {} if start is None else {"ordinals": {"start": start}}
    create(api, namespace, "headless-network", replicas=3, **ordinals)
    first = start or 0
    objects = pods.wait_for(
        running_and_ready(STS, range(first, first + 3)), f"pods {first}..{first + 2} Running and Ready"
    )

    sts_uid = client.AppsV1Api(api).read_namespaced_stateful_set(STS, namespace).metadata.uid
    pod_index_label = server_minor(api) >= 32  # the pod-index label is GA from 1.32 (docs/BEHAVIOURS.md)
    for ordinal, pod in owned_pods(objects, STS).items():
        assert_identity(pod, sts_uid, ordinal, pod_index_label)


@pytest.mark.behaviour("deployment_contrast")
def test_deployment_contrast(api, namespace, pods):
    # Seed 002: a Deployment's replacement pod gets a new random name; a StatefulSet's keeps its name.
    manifests.apply(
        api,
        manifests.load("deployment-contrast", namespace) + manifests.load("headless-network", namespace, replicas=2),
    )
    core = client.CoreV1Api(api)

    def deployment_pods(objs):
        return {
            n
            for n, p in objs.items()
            if (p["metadata"].get("labels") or {}).get("app") == "stateless"
            and not p["metadata"].get("deletionTimestamp")
        }

    before = deployment_pods(
        pods.wait_for(
            lambda objs: len(deployment_pods(objs)) == 2 and running_and_ready(STS, range(2))(objs),
            "2 Deployment and 2 StatefulSet pods",
        )
    )
    victim = sorted(before)[0]
    assert victim.startswith("deploy-xiuxian-") and len(victim) > len("deploy-xiuxian-"), victim

    pods.mark(f"delete {victim} and {pod_name(STS, 0)}")
    old_uid = pods.snapshot()[0][pod_name(STS, 0)]["metadata"]["uid"]
    core.delete_namespaced_pod(victim, namespace)
    core.delete_namespaced_pod(pod_name(STS, 0), namespace)
    after = deployment_pods(
        pods.wait_for(
            lambda objs: len(deployment_pods(objs)) == 2 and victim not in objs, "a replacement Deployment pod"
        )
    )
    replacement = after - before
    assert len(replacement) == 1 and victim not in after, "the Deployment's replacement should have a new name"
    objs = pods.wait_for(lambda objs: replaced(objs, pod_name(STS, 0), old_uid), "the StatefulSet pod to come back")
    assert objs[pod_name(STS, 0)]["spec"].get("hostname") == pod_name(STS, 0)


@pytest.mark.behaviour("deleted_pod_same_identity")
def test_deleted_pod_same_identity(api, namespace, pods, pvcs):
    # Parallel, so progress does not depend on claims being bound (no provisioner is needed here).
    create(api, namespace, "headless-volumeclaimtemplates", replicas=3, podManagementPolicy="Parallel")
    claim = f"data-{STS}-1"
    pods.wait_for(lambda objs: len(owned_pods(objs, STS)) == 3, "3 pods")
    claims = pvcs.wait_for(lambda objs: claim in objs, f"claim {claim}")

    after = recreate_pod(api, pods, pod_name(STS, 1))[pod_name(STS, 1)]

    assert after["spec"].get("hostname") == pod_name(STS, 1)
    assert after["spec"].get("subdomain") == SVC
    volumes = {v["name"]: v.get("persistentVolumeClaim", {}).get("claimName") for v in after["spec"]["volumes"]}
    assert volumes.get("data") == claim, f"the recreated pod mounts {volumes.get('data')!r}, not {claim}"
    assert pvcs.snapshot()[0][claim]["metadata"]["uid"] == claims[claim]["metadata"]["uid"], (
        f"claim {claim} was replaced"
    )


HOST_PORT = 21017  # upstream's conflicting port (statefulset.go:885)


@pytest.mark.behaviour("failed_pod_recreated")
@pytest.mark.conformance("StatefulSet, Recreate Failed Pod")
def test_failed_pod_recreated(api, namespace, pods, failures):
    # Upstream's scenario: a pod holds a hostPort on a node, and the set's pod, pinned to that node with
    # the same hostPort, is rejected by the kubelet (phase Failed). The controller must delete it and
    # create it again, and once the port is free the new pod runs. Fake nodes have no kubelet to
    # reject it: there the test writes the rejection (fixtures/failures.py).
    node = schedulable_node(api)
    holder = failures.hold_host_port(pods, node, HOST_PORT)
    create(api, namespace, "headless-network", replicas=1, host_port_on=(node, HOST_PORT))
    name = pod_name(STS, 0)
    rejected = failures.rejected(pods, name)
    pods.wait_for(deleted_and_created_again(pods, name, rejected), f"the rejected {name} deleted and created again")

    failures.remove(pods, holder)
    objs = pods.wait_for(
        lambda objs: running_and_ready(STS, range(1))(objs) and objs[name]["metadata"]["uid"] != rejected,
        f"a new {name} Running and Ready once the port is free",
    )
    assert objs[name]["spec"].get("hostname") == name
    assert objs[name]["spec"].get("nodeName") == node, f"{name} left its pinned node {node}"


@pytest.mark.behaviour("hostname_in_pod")
@pytest.mark.needs("containers")
def test_hostname_in_pod(api, namespace, pods):
    create(api, namespace, "headless-network", replicas=3)
    pods.wait_for(running_and_ready(STS, range(3)), "3 pods Running and Ready")
    for i in range(3):
        assert run_in(api, namespace, pod_name(STS, i), ["hostname"]).strip() == pod_name(STS, i)


@pytest.mark.behaviour("orphan_adoption")
def test_orphan_adoption(api, namespace, pods, statefulsets):
    # Upstream's scenario (statefulset.go:190): the pod orphaned is adopted again, released when its
    # labels are taken away, and adopted again when they are put back. Each adoption is the same pod
    # (no replacement) with the set as controller; a controller reference to anything else fails at once.
    create(api, namespace, "headless-network", replicas=1)
    before = pods.wait_for(running_and_ready(STS, range(1)), "pod 0 Running and Ready")[pod_name(STS, 0)]
    sts_uid = client.AppsV1Api(api).read_namespaced_stateful_set(STS, namespace).metadata.uid
    core, name = client.CoreV1Api(api), pod_name(STS, 0)
    assert controller_uid(before) == sts_uid, f"{name} was not created with the set as its controller"

    settled_status(statefulsets, STS, f"a status counting {name} Ready", lambda s: s.get("readyReplicas") == 1)
    pods.mark(f"orphan {name}")
    orphaned = core.patch_namespaced_pod(name, namespace, [{"op": "remove", "path": "/metadata/ownerReferences"}])
    statefulsets.wakes(pods)
    adoption = adopted_after(name, sts_uid, before, orphaned)
    adopted = pods.wait_for(lambda objs: counted(statefulsets, name) and adoption(objs), f"{name} adopted")[name]
    assert adopted["metadata"]["uid"] == before["metadata"]["uid"], f"{name} was replaced, not adopted"

    pods.mark(f"remove the labels of {name}")
    labels = adopted["metadata"]["labels"]
    core.patch_namespaced_pod(name, namespace, [{"op": "remove", "path": "/metadata/labels"}])
    released = pods.wait_for(
        lambda objs: name in objs and not objs[name]["metadata"].get("labels") and controller_uid(objs[name]) is None,
        f"{name} released",
    )[name]
    assert released["metadata"]["uid"] == before["metadata"]["uid"], f"{name} was replaced, not released"

    pods.mark(f"put the labels of {name} back")
    relabelled = core.patch_namespaced_pod(name, namespace, {"metadata": {"labels": labels}})
    readopted = pods.wait_for(adopted_after(name, sts_uid, released, relabelled), f"{name} adopted again")[name]
    assert readopted["metadata"]["uid"] == before["metadata"]["uid"], f"{name} was replaced, not adopted again"


def counted(statefulsets, name: str) -> bool:
    """A guard while an orphan waits for adoption: a sync claims (adopts) matching orphans before it
    counts the pods (getPodsForStatefulSet, stateful_set.go:387-399), so no status it writes counts no pod; one
    that does comes from a sync that left the orphan alone."""
    status = (statefulsets.snapshot()[0].get(STS) or {}).get("status") or {}
    assert status.get("replicas", 0) > 0, f"the controller wrote a status counting no pod: it did not adopt {name}"
    return True


def adopted_after(name: str, sts_uid: str, *writes):
    """A pod condition: `name` has the set as controller in a version newer than `writes` (the pod
    as the test last saw or wrote it: the watch may not have shown that write yet); fails at a version
    whose controller is anything else."""
    seen = {w["metadata"]["resourceVersion"] if isinstance(w, dict) else w.metadata.resource_version for w in writes}

    def check(objs) -> bool:
        pod = objs.get(name)
        if pod is None or pod["metadata"]["resourceVersion"] in seen:
            return False
        owner = controller_uid(pod)
        assert owner in (None, sts_uid), f"{name} got another controller: {pod['metadata']['ownerReferences']}"
        return owner == sts_uid

    return check


@pytest.mark.behaviour("service_name_optional")
def test_service_name_optional(api, namespace, pods):
    docs = manifests.load("headless-network", namespace, replicas=2)
    sts = manifests.one(docs, "StatefulSet")
    del sts["spec"]["serviceName"]
    manifests.apply(api, [sts])
    stored = client.AppsV1Api(api).read_namespaced_stateful_set(STS, namespace)
    assert not stored.spec.service_name, f"the API stored serviceName {stored.spec.service_name!r}"
    objs = pods.wait_for(running_and_ready(STS, range(2)), "2 pods Running and Ready")
    for ordinal, pod in owned_pods(objs, STS).items():
        assert pod["spec"].get("hostname") == pod_name(STS, ordinal), f"{pod_name(STS, ordinal)}: no hostname"
        assert not pod["spec"].get("subdomain"), (
            f"{pod_name(STS, ordinal)}: subdomain {pod['spec']['subdomain']!r} with no serviceName"
        )


INVALID_SERVICE_NAME = "Not_A.Label"  # upper case, "_" and "." are each outside a DNS-1123 label


def refused_fields(error: ApiException) -> set[str]:
    """The fields a 422 Invalid names in its causes."""
    return {c.get("field") for c in (json.loads(error.body).get("details") or {}).get("causes") or []}


@pytest.mark.behaviour("invalid_service_name_rejected")
def test_invalid_service_name_rejected(api, namespace, expects):
    # kube-apiserver decides, no controller: a serviceName becomes each pod's spec.subdomain, a DNS-1123
    # label, so since 1.33 (kubernetes#130233) a new set must carry a valid one; older servers accepted
    # it and the controller then failed to create any pod.
    expected, why = expects("StatefulSetServiceNameValidation")
    if expected == "absent":
        pytest.skip(why)  # the only skip: no server of this version refuses it
    apps = client.AppsV1Api(api)
    sts = manifests.one(manifests.load("headless-network", namespace, replicas=1), "StatefulSet")
    sts["spec"]["serviceName"] = INVALID_SERVICE_NAME
    try:
        apps.create_namespaced_stateful_set(namespace, sts)
    except ApiException as error:
        assert error.status == 422, f"the create was refused with {error.status} {error.reason}, not 422 Invalid"
        assert "spec.serviceName" in refused_fields(error), f"refused for another field: {error.body}"
    else:
        raise AssertionError(f"the API accepted serviceName {INVALID_SERVICE_NAME!r}; {why}")
    stored = [s.metadata.name for s in apps.list_namespaced_stateful_set(namespace).items]
    assert stored == [], f"the refused create left StatefulSets {stored} behind"

    # A live set cannot be moved to such a name either: serviceName is immutable on update (1.36.3:
    # "spec" outside the fields an update may change; 1.37.2: spec.serviceName is immutable), which
    # is why update validation may skip the label check (AllowInvalidServiceName true on update).
    create(api, namespace, "headless-network", replicas=1)
    before = apps.read_namespaced_stateful_set(STS, namespace)
    try:
        apps.patch_namespaced_stateful_set(STS, namespace, {"spec": {"serviceName": INVALID_SERVICE_NAME}})
    except ApiException as error:
        assert error.status == 422, f"the update was refused with {error.status} {error.reason}, not 422 Invalid"
        assert refused_fields(error) & {"spec", "spec.serviceName"}, f"refused for another field: {error.body}"
    else:
        raise AssertionError(f"the API changed a live set's serviceName to {INVALID_SERVICE_NAME!r}")
    after = apps.read_namespaced_stateful_set(STS, namespace)
    assert (after.spec.service_name, after.metadata.generation) == (SVC, before.metadata.generation), (
        f"the refused update changed the stored set: serviceName {after.spec.service_name!r}, "
        f"generation {before.metadata.generation} -> {after.metadata.generation}"
    )
