"""Stable storage: one claim per pod from volumeClaimTemplates, retained by default, re-used, and the
retention policy; static NFS PVs bound by size (seed 001); templates that cannot change."""

import json

import pytest
from kubernetes import client
from kubernetes.client.rest import ApiException

from fixtures import manifests
from fixtures.backends import kind_addons
from fixtures.execs import run_in, sh
from fixtures.sts import (
    create,
    is_ready,
    owned_pods,
    pod_name,
    recreate_pod,
    running_and_ready,
    scale,
)

STS = "sts-xiuxian"
WEB = "headless-volumeclaimtemplates"


def claim(ordinal: int, sts: str = STS, template: str = "data") -> str:
    return f"{template}-{sts}-{ordinal}"


def bound(names: set[str]):
    """A pvc recorder condition: exactly these claims exist, all Bound."""

    def check(objs):
        return set(objs) == names and all((o.get("status") or {}).get("phase") == "Bound" for o in objs.values())

    return check


def uids(objs: dict) -> dict[str, str]:
    return {name: obj["metadata"]["uid"] for name, obj in objs.items()}


def claim_of(pod: dict, volume: str = "data") -> str | None:
    for item in pod["spec"].get("volumes") or []:
        if item["name"] == volume:
            return (item.get("persistentVolumeClaim") or {}).get("claimName")
    return None


@pytest.mark.behaviour("pvc_per_ordinal")
@pytest.mark.needs("dynamic_storage")
def test_pvc_per_ordinal(api, namespace, pods, pvcs):
    create(api, namespace, WEB, replicas=3)
    objs = pods.wait_for(running_and_ready(STS, range(3)), "3 pods")
    claims = pvcs.wait_for(bound({claim(i) for i in range(3)}), "3 claims Bound")

    volumes = {}
    for i in range(3):
        assert claim_of(objs[pod_name(STS, i)]) == claim(i), f"{pod_name(STS, i)} does not mount {claim(i)}"
        pvc = claims[claim(i)]
        assert pvc["spec"].get("storageClassName") == "nfs-client"
        volume = client.CoreV1Api(api).read_persistent_volume(pvc["spec"]["volumeName"])
        assert volume.spec.claim_ref.name == claim(i) and volume.spec.claim_ref.namespace == namespace
        assert volume.spec.storage_class_name == "nfs-client"
        volumes[claim(i)] = volume.metadata.name
    assert len(set(volumes.values())) == 3, f"claims share volumes: {volumes}"


@pytest.mark.behaviour("nfs_dynamic_volumes")
@pytest.mark.needs("dynamic_storage", "nfs")
def test_pvc_per_ordinal_volumes_are_nfs(api, namespace, pods, pvcs):
    """Seed 003's claims are served by the NFS provisioner: each bound volume is an NFS volume."""
    create(api, namespace, WEB, replicas=3)
    objs = pods.wait_for(running_and_ready(STS, range(3)), "3 pods")
    claims = pvcs.wait_for(bound({claim(i) for i in range(3)}), "3 claims Bound")
    for i in range(3):
        assert claim_of(objs[pod_name(STS, i)]) == claim(i), f"{pod_name(STS, i)} does not mount {claim(i)}"
        volume = client.CoreV1Api(api).read_persistent_volume(claims[claim(i)]["spec"]["volumeName"])
        assert volume.spec.nfs is not None, f"{claim(i)} is bound to {volume.metadata.name}, which is not NFS"


@pytest.mark.behaviour("pvc_retain_default")
@pytest.mark.needs("dynamic_storage")
def test_pvc_retain_default(api, namespace, pods, pvcs):
    sts = create(api, namespace, WEB, replicas=3)
    all_claims = {claim(i) for i in range(3)}
    pods.wait_for(running_and_ready(STS, range(3)), "3 pods")
    original = uids(pvcs.wait_for(bound(all_claims), "3 claims Bound"))

    def unchanged(objs):
        assert uids(objs) == original, f"claims were deleted or replaced: {uids(objs)} != {original}"
        owned = [n for n, o in objs.items() if o["metadata"].get("ownerReferences")]
        assert not owned, f"claims {owned} have owner references under the default Retain policy"

    def remounted(ordinals):
        objs = pods.wait_for(running_and_ready(STS, ordinals), f"pods {list(ordinals)} Running and Ready")
        for i in ordinals:
            assert claim_of(objs[pod_name(STS, i)]) == claim(i), f"{pod_name(STS, i)} lost its claim"

    recreate_pod(api, pods, pod_name(STS, 1))
    remounted(range(3))
    unchanged(pvcs.snapshot()[0])

    pods.mark("scale to 1")
    scale(api, namespace, STS, 1)
    remounted(range(1))
    assert pvcs.stays(lambda objs: uids(objs) == original), "claims went with scale-down"
    unchanged(pvcs.snapshot()[0])

    pods.mark("scale to 3")
    scale(api, namespace, STS, 3)
    remounted(range(3))
    unchanged(pvcs.snapshot()[0])

    pods.mark("delete the StatefulSet")
    client.AppsV1Api(api).delete_namespaced_stateful_set(STS, namespace)
    pods.wait_for(lambda o: not owned_pods(o, STS), "pods gone with the StatefulSet")
    unchanged(pvcs.snapshot()[0])

    pods.mark("re-create the StatefulSet")
    manifests.apply(api, [sts])
    remounted(range(3))
    pvcs.wait_for(bound(all_claims), "claims Bound again")
    unchanged(pvcs.snapshot()[0])


@pytest.mark.behaviour("pvc_retention_policy")
@pytest.mark.needs("dynamic_storage")
@pytest.mark.parametrize("when_scaled, when_deleted", [("Delete", "Retain"), ("Retain", "Delete")])
def test_pvc_retention_policy(api, namespace, pods, pvcs, when_scaled, when_deleted):
    create(
        api,
        namespace,
        WEB,
        replicas=3,
        persistentVolumeClaimRetentionPolicy={"whenScaled": when_scaled, "whenDeleted": when_deleted},
    )
    pods.wait_for(running_and_ready(STS, range(3)), "3 pods")
    original = uids(pvcs.wait_for(bound({claim(i) for i in range(3)}), "3 claims Bound"))

    pods.mark("scale to 1")
    scale(api, namespace, STS, 1)
    pods.wait_for(running_and_ready(STS, range(1)), "only pod 0 left")
    if when_scaled == "Delete":
        pvcs.wait_for(lambda objs: set(objs) == {claim(0)}, "claims of ordinals >= 1 deleted (whenScaled=Delete)")
    else:
        assert pvcs.stays(lambda objs: uids(objs) == original), (
            "claims were deleted on scale-down under whenScaled=Retain"
        )
    assert uids(pvcs.snapshot()[0])[claim(0)] == original[claim(0)], "the claim of a kept ordinal was replaced"

    pods.mark("delete the StatefulSet")
    client.AppsV1Api(api).delete_namespaced_stateful_set(STS, namespace)
    pods.wait_for(lambda o: not owned_pods(o, STS), "pods gone with the StatefulSet")
    if when_deleted == "Delete":
        pvcs.wait_for(lambda objs: not objs, "every claim deleted (whenDeleted=Delete)")
    else:
        kept = dict(pvcs.snapshot()[0])
        assert pvcs.stays(lambda objs: uids(objs) == uids(kept)), (
            "claims were deleted with the StatefulSet under whenDeleted=Retain"
        )


@pytest.fixture
def static_pvs(api, cluster, namespace):
    """Seed 001's four NFS PVs (1Gi, 2Gi, 2Gi, 2Gi), named and labelled for this test only. Where pods
    really mount them, they point at directories of the run's own NFS server, not the seed's LAN host."""
    core = client.CoreV1Api(api)
    docs = manifests.load_cluster_scoped("static-nfs-pvs")
    if cluster.capabilities.containers:
        server = cluster.details.get("nfs server")
        if not server:
            pytest.skip("static NFS PVs need an NFS server this run started (kind starts one where NFS mounts)")
        kind_addons.serve_static_pvs(api, server, namespace, docs)
    created = []
    for doc in docs:
        doc["metadata"]["name"] = f"{namespace}-{doc['metadata']['name']}"
        doc["metadata"]["labels"]["sts-conformance.k8s.io/namespace"] = namespace
        created.append(core.create_persistent_volume(doc).metadata.name)
    yield created
    for name in created:
        try:
            core.delete_persistent_volume(name)
        except ApiException as error:
            if error.status != 404:
                raise


@pytest.mark.behaviour("static_pv_binding")
@pytest.mark.needs("nfs")
def test_static_pv_binding(api, namespace, static_pvs, pods, pvcs):
    docs = manifests.load("zookeeper-static", namespace, replicas=2)
    template = manifests.one(docs, "StatefulSet")["spec"]["volumeClaimTemplates"][0]
    template["spec"]["selector"] = {"matchLabels": {"sts-conformance.k8s.io/namespace": namespace}}
    manifests.apply(api, docs)
    core = client.CoreV1Api(api)

    def volumes():
        return {
            pv.metadata.name: pv
            for pv in core.list_persistent_volume(label_selector=f"sts-conformance.k8s.io/namespace={namespace}").items
        }

    def check_bindings(replicas):
        claims = pvcs.wait_for(
            bound({claim(i, "zk", "datadir") for i in range(replicas)}), f"{replicas} claims Bound to static PVs"
        )
        pods.wait_for(running_and_ready("zk", range(replicas)), f"{replicas} zk pods")
        pvs = volumes()
        used = [claims[claim(i, "zk", "datadir")]["spec"]["volumeName"] for i in range(replicas)]
        assert len(set(used)) == replicas, f"claims share a PV: {used}"
        for name in used:
            assert pvs[name].spec.capacity["storage"] == "2Gi", f"{name} is too small for a 2Gi claim"
            assert pvs[name].status.phase == "Bound"
        spare = sorted(set(pvs) - set(used))
        assert all(pvs[name].status.phase == "Available" for name in spare), (
            f"unused PVs not Available: {[(n, pvs[n].status.phase) for n in spare]}"
        )
        return spare

    spare = check_bindings(2)
    assert f"{namespace}-pv001" in spare, "the 1Gi PV was bound by a 2Gi claim"

    pods.mark("scale to 3")
    scale(api, namespace, "zk", 3)
    spare = check_bindings(3)
    assert spare == [f"{namespace}-pv001"], f"after scale-up the spare PVs are {spare}, expected only the 1Gi one"


@pytest.mark.behaviour("data_survives_pod_deletion")
@pytest.mark.needs("containers", "dynamic_storage")
def test_data_survives_pod_deletion_nginx(api, namespace, pods):
    # Seed 000: AAA, BBB, CCC written into each pod's own volume are served again after deletion.
    create(api, namespace, WEB, replicas=3)
    pods.wait_for(running_and_ready(STS, range(3)), "3 pods")
    pages = {pod_name(STS, i): text for i, text in enumerate(("AAA", "BBB", "CCC"))}
    for pod, text in pages.items():
        sh(api, namespace, pod, f"echo {text} > /usr/share/nginx/html/index.html")
    for pod in pages:
        recreate_pod(api, pods, pod, until=lambda o, pod=pod: is_ready(o[pod]), what=f"{pod} recreated and Ready")
    for pod, text in pages.items():
        assert run_in(api, namespace, pod, ["cat", "/usr/share/nginx/html/index.html"]).strip() == text, (
            f"{pod} lost its page"
        )


@pytest.mark.behaviour("data_survives_pod_deletion")
@pytest.mark.needs("containers", "dynamic_storage")
def test_data_survives_pod_deletion_redis(api, namespace, pods):
    # Seeds 003/004: a key written to each Redis member (append-only file on its claim) survives.
    create(api, namespace, "redis", replicas=3)
    pods.wait_for(running_and_ready("redis", range(3)), "3 redis pods")
    for i in range(3):
        assert run_in(api, namespace, f"redis-{i}", ["redis-cli", "set", "member", f"redis-{i}"]).strip() == "OK"
    for i in range(3):
        recreate_pod(
            api,
            pods,
            f"redis-{i}",
            until=lambda o, i=i: is_ready(o[f"redis-{i}"]),
            what=f"redis-{i} recreated and Ready",
        )
    for i in range(3):
        assert run_in(api, namespace, f"redis-{i}", ["redis-cli", "get", "member"]).strip() == f"redis-{i}"


@pytest.mark.behaviour("missing_pvc_recreated")
@pytest.mark.needs("dynamic_storage")
def test_missing_pvc_recreated(api, namespace, pods, pvcs):
    # The pod is held unscheduled, so it stays Pending, and the PVC protection does not keep its claim
    # (only scheduled pods use a claim): deleting the claim leaves a Pending pod with a missing claim,
    # which the controller must create again.
    create(api, namespace, WEB, replicas=1, unscheduled=True)
    name, claim_name = pod_name(STS, 0), claim(0)
    pod_uid = pods.wait_for(lambda objs: name in objs, f"{name} created")[name]["metadata"]["uid"]
    claim_uid = pvcs.wait_for(lambda objs: claim_name in objs, f"{claim_name} created")[claim_name]["metadata"]["uid"]

    pvcs.mark(f"delete {claim_name}")
    core = client.CoreV1Api(api)
    core.delete_namespaced_persistent_volume_claim(claim_name, namespace)
    pvcs.wait_for(lambda objs: objs.get(claim_name, {}).get("metadata", {}).get("uid") != claim_uid, "claim gone")
    # Claims are not what the controller watches; a change to its pod makes it look at the set now
    # rather than at its next resync (the claim must come back either way).
    pvcs.mark(f"annotate {name}")
    core.patch_namespaced_pod(name, namespace, {"metadata": {"annotations": {"sts-conformance.k8s.io/nudge": "1"}}})
    pvcs.wait_for(
        lambda objs: (
            claim_name in objs
            and objs[claim_name]["metadata"]["uid"] != claim_uid
            and not objs[claim_name]["metadata"].get("deletionTimestamp")
        ),
        f"{claim_name} created again for the Pending {name}",
    )
    pod = pods.snapshot()[0][name]
    assert pod["metadata"]["uid"] == pod_uid, f"{name} was re-created: the claim must come back for the same pod"
    assert (pod.get("status") or {}).get("phase") == "Pending", f"the hold failed: {name} is not Pending"


# Edits of a live set's claim templates: a bigger request, and a second template.
CLAIM_TEMPLATE_EDITS = {
    "bigger-request": [
        {"op": "replace", "path": "/spec/volumeClaimTemplates/0/spec/resources/requests/storage", "value": "3Gi"}
    ],
    "added-template": [
        {
            "op": "add",
            "path": "/spec/volumeClaimTemplates/-",
            "value": {
                "metadata": {"name": "logs"},
                "spec": {"accessModes": ["ReadWriteOnce"], "resources": {"requests": {"storage": "1Gi"}}},
            },
        }
    ],
}


@pytest.mark.behaviour("claim_templates_immutable")
@pytest.mark.parametrize("edit", list(CLAIM_TEMPLATE_EDITS))
def test_claim_templates_immutable(api, namespace, edit):
    # kube-apiserver decides: 1.36 forbids spec changes outside its list (field "spec"), 1.37 says
    # spec.volumeClaimTemplates is immutable; no release through 1.37 has KEP-4650's gate to allow it.
    apps = client.AppsV1Api(api)
    create(api, namespace, WEB, replicas=1)
    before = apps.read_namespaced_stateful_set(STS, namespace).spec.volume_claim_templates
    try:
        apps.patch_namespaced_stateful_set(STS, namespace, CLAIM_TEMPLATE_EDITS[edit])
    except ApiException as error:
        assert error.status == 422, f"the edit was refused with {error.status} {error.reason}, not 422 Invalid"
        fields = {c.get("field") for c in (json.loads(error.body).get("details") or {}).get("causes") or []}
        assert fields & {"spec", "spec.volumeClaimTemplates"}, f"refused for another field: {error.body}"
    else:
        raise AssertionError(f"the API accepted an edit of volumeClaimTemplates ({edit})")
    after = apps.read_namespaced_stateful_set(STS, namespace).spec.volume_claim_templates
    assert after == before, "the stored claim templates changed although the edit was refused"
