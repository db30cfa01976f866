"""The StatefulSet API itself: the scale and status subresources, and create, list by label, patch and
deleteCollection (upstream's three API conformance entries)."""

import secrets

import pytest
from kubernetes import client

from fixtures import imagemap, manifests
from fixtures.kube import resource_version_order
from fixtures.recorder import last_writer
from fixtures.sts import (
    NEW_IMAGE,
    created_with,
    image_state,
    owned_pods,
    rolled_out,
    running_and_ready,
    settled_status,
    steady_status,
)

STS = "sts-xiuxian"
WEB = "headless-network"
LABEL = "sts-conformance.k8s.io/lifecycle"
PATCHED = "sts-conformance.k8s.io/patched"


def create_labelled(api, namespace, replicas: int, labels: dict | None = None) -> client.V1StatefulSet:
    """The web set and its Service; returns the set as the create answered it."""
    docs = manifests.load(WEB, namespace, replicas=replicas)
    sts = manifests.one(docs, "StatefulSet")
    sts["metadata"].setdefault("labels", {}).update(labels or {})
    manifests.apply(api, [doc for doc in docs if doc is not sts])
    return client.AppsV1Api(api).create_namespaced_stateful_set(namespace, sts)


def settled(statefulsets, ready: int):
    """The set's status once the controller has observed the latest spec and counts `ready` Ready pods."""

    def check(objs):
        obj = objs.get(STS)
        status = (obj or {}).get("status") or {}
        if not obj or status.get("observedGeneration", 0) < obj["metadata"]["generation"]:
            return None
        return status if status.get("readyReplicas", 0) == ready else None

    return statefulsets.wait_for_value(check, f"the status to count {ready} Ready pods")


def condition_types(obj) -> set[str]:
    return {c["type"] for c in (obj.get("status") or {}).get("conditions") or []}


@pytest.mark.behaviour("scale_subresource")
@pytest.mark.conformance("StatefulSet resource Replica scaling")
def test_scale_subresource(api, namespace, pods, statefulsets):
    apps = client.AppsV1Api(api)
    create_labelled(api, namespace, replicas=1)
    pods.wait_for(running_and_ready(STS, range(1)), "pod 0 Running and Ready")
    status = settled(statefulsets, 1)
    assert status.get("replicas") == 1, f"status.replicas is {status.get('replicas')} with 1 pod Ready"

    scale = apps.read_namespaced_stateful_set_scale(STS, namespace)
    assert (scale.spec.replicas, scale.status.replicas) == (1, 1), f"a new set of 1 has scale {scale}"
    assert scale.status.selector == "app=nginx", f"scale.status.selector is {scale.status.selector!r}"

    pods.mark("PUT scale 2")
    scale.spec.replicas = 2
    apps.replace_namespaced_stateful_set_scale(STS, namespace, scale)
    assert apps.read_namespaced_stateful_set(STS, namespace).spec.replicas == 2, "PUT scale did not set spec.replicas"
    pods.wait_for(running_and_ready(STS, range(2)), "the set to follow its scale to 2 pods")
    status = settled(statefulsets, 2)  # the first status that counts both pods Ready must count both pods
    assert status.get("replicas") == 2, f"status.replicas is {status.get('replicas')} with 2 pods Ready"
    assert apps.read_namespaced_stateful_set_scale(STS, namespace).status.replicas == 2

    pods.mark("PATCH scale 1")
    apps.patch_namespaced_stateful_set_scale(STS, namespace, {"spec": {"replicas": 1}})
    pods.wait_for(running_and_ready(STS, range(1)), "the set to follow its scale down to 1 pod")
    # A pod being deleted may still be counted for a moment; once it is gone the status must say 1.
    statefulsets.wait_for(lambda objs: (objs[STS].get("status") or {}).get("replicas") == 1, "status.replicas 1")
    scale = apps.read_namespaced_stateful_set_scale(STS, namespace)
    assert (scale.spec.replicas, scale.status.replicas) == (1, 1), f"after PATCH scale 1: {scale}"


@pytest.mark.behaviour("status_subresource")
@pytest.mark.conformance("StatefulSet, status sub-resource")
def test_status_subresource(api, namespace, pods, statefulsets):
    apps = client.AppsV1Api(api)
    create_labelled(api, namespace, replicas=1)
    pods.wait_for(running_and_ready(STS, range(1)), "pod 0 Running and Ready")
    # The promise holds while the set is steady: no sync of the controller in flight (steady_status).
    steady_status(statefulsets, pods, STS, 1)

    read = apps.read_namespaced_stateful_set_status(STS, namespace)
    assert read.status.ready_replicas == 1, f"GET /status shows {read.status.ready_replicas} Ready pods, not 1"

    statefulsets.mark("PUT /status with condition StatusUpdate")
    read.status.conditions = [
        client.V1StatefulSetCondition(type="StatusUpdate", status="True", reason="E2E", message="set by a test")
    ]
    updated = apps.replace_namespaced_stateful_set_status(STS, namespace, read)
    assert "StatusUpdate" in {c.type for c in updated.status.conditions or []}, "PUT /status dropped the condition"

    statefulsets.mark("PATCH /status with condition StatusPatched")
    conditions = [
        {"type": "StatusUpdate", "status": "True", "reason": "E2E", "message": "set by a test"},
        {"type": "StatusPatched", "status": "True", "reason": "E2E", "message": "patched by a test"},
    ]
    patched = apps.patch_namespaced_stateful_set_status(STS, namespace, {"status": {"conditions": conditions}})
    assert {"StatusUpdate", "StatusPatched"} <= {c.type for c in patched.status.conditions or []}

    read = apps.read_namespaced_stateful_set_status(STS, namespace)
    assert {"StatusUpdate", "StatusPatched"} <= {c.type for c in read.status.conditions or []}, (
        "a later GET /status does not show what was written"
    )
    # Nothing changes in the set, so nothing may take back what a client wrote: fail at the first version
    # from the patch on that lacks a condition (the wait too: the watch may show the revert before it looks).
    kept = kept_from(patched.metadata.resource_version)
    statefulsets.wait_for(kept, "the watch to show both conditions")
    assert statefulsets.stays(kept)


def kept_from(patched_at: str):
    """True once the watch shows the set at or after the version the PATCH made, with both conditions;
    raises at a version from then on that lacks one, naming who wrote it."""

    def check(objs) -> bool:
        obj = objs[STS]
        if resource_version_order(patched_at, obj["metadata"]["resourceVersion"]) > 0:
            return False  # from before the patch
        assert {"StatusUpdate", "StatusPatched"} <= condition_types(obj), (
            f"the conditions written through /status were reverted to {sorted(condition_types(obj))} by "
            f"{last_writer(obj)} (resourceVersion {obj['metadata']['resourceVersion']}), status {obj.get('status')}"
        )
        return True

    return check


def patched_label(obj) -> dict:
    return {PATCHED: (obj["metadata"].get("labels") or {}).get(PATCHED)}


def kept_once_shown(events) -> bool:
    """Fails at the first event that shows the set without the patched label after one showed it."""
    shown = False
    for event in events:
        if event.type in ("ADDED", "MODIFIED") and event.name == STS:
            assert not (shown and event.state[PATCHED] != "true"), (
                f"the patched label was taken back (event #{event.seq})"
            )
            shown = shown or event.state[PATCHED] == "true"
    return shown


@pytest.mark.behaviour("api_lifecycle")
@pytest.mark.conformance("StatefulSet, list, patch and delete a collection of StatefulSets")
def test_api_lifecycle(api, namespace, pods, statefulsets, watch):
    # Upstream's spec (statefulset.go:1044): create a labelled set, patch its labels, replicas and image
    # in one patch (resourceVersion valid and increasing), see the pods follow, list it by label across
    # namespaces, and delete it with a label-selected deleteCollection.
    apps, core = client.AppsV1Api(api), client.CoreV1Api(api)
    token = secrets.token_hex(4)  # this test's own label value: no other object in the cluster carries it
    selector = f"{LABEL}={token}"
    created = create_labelled(api, namespace, replicas=1, labels={LABEL: token})
    resource_version_order(created.metadata.resource_version, created.metadata.resource_version)  # well formed
    pods.wait_for(running_and_ready(STS, range(1)), "pod 0 Running and Ready")
    settled_status(statefulsets, STS, "the status of the new set")

    listed = apps.list_stateful_set_for_all_namespaces(label_selector=selector)
    found = [(s.metadata.namespace, s.metadata.name) for s in listed.items]
    assert found == [(namespace, STS)], f"listing all namespaces by {selector} found {found}"

    # Histories from before the patch: the label's (a write that takes it back may come before a wait
    # looks at the set) and the pods' images (a pod created for the patched spec must carry its image).
    labels = watch(apps.list_namespaced_stateful_set, "statefulset labels", patched_label)
    pod_images = watch(core.list_namespaced_pod, "pod images", image_state)
    statefulsets.mark(f"patch label {PATCHED}, replicas 2, image {NEW_IMAGE}")
    pod_images.mark(f"patch replicas 2, image {NEW_IMAGE}")
    patched = apps.patch_namespaced_stateful_set(STS, namespace, replicas_and_image(created, 2, NEW_IMAGE))
    assert resource_version_order(created.metadata.resource_version, patched.metadata.resource_version) == -1, (
        f"the patched set's resourceVersion {patched.metadata.resource_version} is not above the created "
        f"set's {created.metadata.resource_version}"
    )
    assert patched.metadata.labels.get(PATCHED) == "true", "the patch response lacks the patched label"
    read = apps.read_namespaced_stateful_set(STS, namespace)
    image = imagemap.upstream_of(read.spec.template.spec.containers[0].image)
    assert (read.spec.replicas, image) == (2, NEW_IMAGE), f"the patched set: {read.spec.replicas} replicas of {image}"

    pod_images.wait_for(created_with(pod_images, STS, NEW_IMAGE, range(2)), f"2 pods of {NEW_IMAGE} Ready")
    settled_status(statefulsets, STS, "the patched set rolled out", rolled_out(2))

    has_label = lambda objs: (objs[STS]["metadata"].get("labels") or {}).get(PATCHED) == "true"  # noqa: E731
    kept = lambda objs: kept_once_shown(labels.events) and has_label(objs)  # noqa: E731
    labels.wait_for(kept, "the watch to show the label")
    # The same watch again: another recorder may not have seen the patch yet.
    assert labels.stays(kept), (
        f"the patched label was taken back: {labels.snapshot()[0][STS]['metadata'].get('labels')}"
    )
    listed = apps.list_stateful_set_for_all_namespaces(label_selector=f"{selector},{PATCHED}=true")
    found = [(s.metadata.namespace, s.metadata.name) for s in listed.items]
    assert found == [(namespace, STS)], f"listing by the patched label found {found}"

    statefulsets.mark(f"deleteCollection in {namespace} by {selector}")
    apps.delete_collection_namespaced_stateful_set(namespace, label_selector=selector, grace_period_seconds=1)
    statefulsets.wait_for(lambda objs: STS not in objs, "the set to be deleted")
    pods.wait_for(lambda objs: not owned_pods(objs, STS), "the set's pods to be deleted with it")
    listed = apps.list_stateful_set_for_all_namespaces(label_selector=selector)
    assert listed.items == [], f"the set is still listed after deleteCollection: {listed.items}"


def replicas_and_image(sts, replicas: int, image: str) -> dict:
    """Upstream's one strategic merge patch: the PATCHED label, replicas, the first container's image
    and a 1 s termination grace period."""
    container = sts.spec.template.spec.containers[0].name
    return {
        "metadata": {"labels": {PATCHED: "true"}},
        "spec": {
            "replicas": replicas,
            "template": {
                "spec": {
                    "terminationGracePeriodSeconds": 1,
                    "containers": [{"name": container, "image": imagemap.mapped(image)}],
                }
            },
        },
    }
