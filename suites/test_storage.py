"""Stable storage: one claim per pod from volumeClaimTemplates, retained by default, re-used, and the
retention policy; static NFS PVs bound by size (seed 001); templates that cannot change."""

import json
import random

import pytest
from kubernetes import client
from kubernetes.client.rest import ApiException

from fixtures import manifests
from fixtures.backends import kind_addons
from fixtures.execs import run_in, sh
from fixtures.namespaces import cluster_scoped_labels
from fixtures.sts import (
    create,
    create_with_local_volumes,
    is_ready,
    label_node,
    owned_pods,
    pod_name,
    recreate_pod,
    restart,
    running_and_ready,
    scale,
    settled_status,
)
from fixtures.volumes import create_local_volumes, delete_local_volumes, make_node_directories, schedulable_nodes

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
        doc["metadata"]["labels"].update(cluster_scoped_labels(cluster.run_id, namespace))
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


HTML = "/usr/share/nginx/html"  # where the seed's nginx mounts its claim


@pytest.mark.behaviour("data_survives_pod_deletion")
@pytest.mark.needs("containers", "dynamic_storage")
def test_data_survives_scale_to_zero(api, namespace, pods, statefulsets):
    """Upstream's 'should provide basic identity' (statefulset.go:140): each pod's hostname written to its
    volume (synced) and a symlink to it survive a restart of the set (scale to 0 and back), and the volume
    is still usable."""
    create(api, namespace, WEB, replicas=3)
    pods.wait_for(running_and_ready(STS, range(3)), "3 pods")
    for i in range(3):
        sh(api, namespace, pod_name(STS, i), f"echo $(hostname) | dd of={HTML}/hostname conv=fsync")
        sh(api, namespace, pod_name(STS, i), f"ln -s {HTML}/hostname {HTML}/hostname-symlink")
    restart(api, namespace, statefulsets, STS, 3)
    pods.wait_for(running_and_ready(STS, range(3)), "3 pods Running and Ready again")
    for i in range(3):
        pod = pod_name(STS, i)
        sh(api, namespace, pod, f"ls -idlh {HTML} && find {HTML} && touch {HTML}/$(date +%s%N)")  # CheckMount
        for file in ("hostname", "hostname-symlink"):
            assert run_in(api, namespace, pod, ["cat", f"{HTML}/{file}"]).strip() == pod, f"{pod} lost its {file}"


@pytest.mark.behaviour("data_survives_pod_deletion")
@pytest.mark.needs("containers", "dynamic_storage")
def test_data_survives_set_recreation_many_volumes(api, namespace, pods, statefulsets):
    """Upstream's 'pods that use multiple volumes should be reschedulable' (persistent_volumes.go:826): a
    pod with four claims writes to each; the set is scaled to 0, deleted, and created again; the new pod
    reads each file back from its own volume."""
    sts = create(api, namespace, "multi-volume", replicas=1)
    pod = pod_name(STS, 0)
    pods.wait_for(running_and_ready(STS, range(1)), f"{pod} Running and Ready")
    for n in range(4):
        sh(api, namespace, pod, f"echo vol{n}-of-{namespace} | dd of=/mnt/vol{n}/data{n} conv=fsync")

    statefulsets.mark("scale to 0, then delete the StatefulSet")
    scale(api, namespace, STS, 0)
    settled_status(statefulsets, STS, "status.replicas 0", lambda status: status.get("replicas", 0) == 0)
    client.AppsV1Api(api).delete_namespaced_stateful_set(STS, namespace)
    pods.wait_for(lambda o: not owned_pods(o, STS), "no pod left")
    pods.mark("create the StatefulSet again")
    manifests.apply(api, [sts])
    pods.wait_for(running_and_ready(STS, range(1)), f"{pod} Running and Ready again")
    for n in range(4):
        found = run_in(api, namespace, pod, ["cat", f"/mnt/vol{n}/data{n}"]).strip()
        assert found == f"vol{n}-of-{namespace}", f"{pod} reads {found!r} from vol{n}"


@pytest.fixture
def pinned_node(api, namespace):
    """A random schedulable node with a label of the test's own, for its pods' nodeSelector (upstream pins
    with kubernetes.io/hostname); the label is taken off again at teardown."""
    node = random.choice(schedulable_nodes(api)).metadata.name
    key = f"pin.sts-conformance.k8s.io/{namespace}"
    label_node(api, node, key, "true")
    yield node, key
    label_node(api, node, key, None)


def unschedulable(pod: dict) -> bool:
    """The scheduler has tried the pod and found no node for it."""
    conditions = (pod.get("status") or {}).get("conditions") or []
    return any(c["type"] == "PodScheduled" and c.get("reason") == "Unschedulable" for c in conditions)


@pytest.mark.behaviour("missing_pvc_recreated")
@pytest.mark.needs("dynamic_storage", "own_nodes")
def test_missing_pvc_recreated(api, namespace, pods, pvcs, statefulsets, pinned_node):
    """Upstream's 'PVC should be recreated when pod is pending due to missing PVC' (statefulset.go:1995):
    the pod runs on the node it is pinned to; with the node closed, the pod is deleted and comes back
    Pending, unscheduled, so nothing protects its claim, which is deleted. Once the node is open again the
    scheduler finds the claim missing and says so on the pod, and the controller must create the claim
    again: the same pod then runs on it, on its node. Upstream closes the node by cordoning it; here the
    test takes its own label off the node (the pods' nodeSelector) and puts it back, which keeps the node
    open to every other test's pods (runs with xdist workers share the nodes)."""
    node, pin = pinned_node
    create(api, namespace, WEB, replicas=1, node_selector={pin: "true"})
    name, claim_name = pod_name(STS, 0), claim(0)
    first = pods.wait_for(running_and_ready(STS, range(1)), f"{name} Running and Ready")[name]
    assert first["spec"]["nodeName"] == node, f"{name} runs on {first['spec']['nodeName']}, not on {node}"
    old_claim = pvcs.wait_for(bound({claim_name}), f"{claim_name} Bound")[claim_name]["metadata"]["uid"]

    pods.mark(f"close {node} to the set's pods")
    label_node(api, node, pin, None)
    pending = recreate_pod(api, pods, name, lambda o: unschedulable(o[name]), f"{name} re-created and Unschedulable")
    pod_uid = pending[name]["metadata"]["uid"]

    pvcs.mark(f"delete {claim_name}")
    client.CoreV1Api(api).delete_namespaced_persistent_volume_claim(claim_name, namespace)
    pvcs.wait_for(lambda o: uids(o).get(claim_name) != old_claim, f"{claim_name} gone")
    pods.mark(f"open {node} again")
    label_node(api, node, pin, "true")

    def back_on_its_node(objs):
        pod = objs.get(name)
        assert pod and pod["metadata"]["uid"] == pod_uid, f"{name} was replaced: its claim must come back for it"
        assert not pod["metadata"].get("deletionTimestamp"), f"{name} is being deleted"
        assert pod["spec"].get("nodeName") in (None, node), f"{name} was scheduled to {pod['spec']['nodeName']}"
        return is_ready(pod)

    pods.wait_for(back_on_its_node, f"{name} Running and Ready on {node} again")
    claims = pvcs.wait_for(bound({claim_name}), f"{claim_name} created again and Bound")
    assert claims[claim_name]["metadata"]["uid"] != old_claim, f"{claim_name} was never deleted"
    assert claim_of(pods.snapshot()[0][name]) == claim_name, f"{name} does not mount {claim_name}"
    settled_status(statefulsets, STS, "readyReplicas 1", lambda status: status.get("readyReplicas") == 1)


# Upstream's 'StatefulSet with pod affinity' specs (persistent_volumes-local.go:416-445): 3 replicas over
# 6 local PVs on each node, and per pod as many claim templates as take them all where the pods spread
# (6) or share one node (2); 1 under Parallel. Anti-affinity needs 3 nodes (upstream skips with fewer).
VOLUMES_PER_NODE = 6
LOCAL_VOLUME_CASES = [
    pytest.param("OrderedReady", True, 6, marks=pytest.mark.needs("nodes"), id="anti-affinity"),
    pytest.param("OrderedReady", False, 2, id="affinity"),
    pytest.param("Parallel", True, 1, marks=pytest.mark.needs("nodes"), id="parallel-anti-affinity"),
    pytest.param("Parallel", False, 1, id="parallel-affinity"),
]


@pytest.fixture
def local_volumes(api, cluster, namespace, pods):
    """6 local PVs on each schedulable node (at most 5) behind a StorageClass of the test's own, and
    where kubelets mount them, their directories on the nodes."""
    nodes = schedulable_nodes(api)
    if cluster.capabilities.containers:
        make_node_directories(api, pods, nodes, VOLUMES_PER_NODE)
    volumes = create_local_volumes(api, namespace, cluster.run_id, nodes, VOLUMES_PER_NODE)
    yield volumes
    delete_local_volumes(api, namespace)


@pytest.mark.behaviour("local_volumes_pod_affinity")
@pytest.mark.parametrize("policy, anti, volumes", LOCAL_VOLUME_CASES)
def test_local_volumes_with_pod_affinity(api, namespace, pods, pvcs, local_volumes, policy, anti, volumes):
    create_with_local_volumes(api, namespace, local_volumes.storage_class, 3, volumes, anti, podManagementPolicy=policy)
    templates = [f"vol{n}" for n in range(1, volumes + 1)]

    def claims_on_their_pods_nodes(objs):
        """Each scheduled pod's bound claims are on local PVs of the test on the pod's node."""
        nodes = {i: pod["spec"].get("nodeName") for i, pod in owned_pods(objs, STS).items()}
        placed = {i: n for i, n in nodes.items() if n}
        if anti:
            assert len(set(placed.values())) == len(placed), f"pods share a node despite anti-affinity: {placed}"
        else:
            assert len(set(placed.values())) <= 1, f"pods on several nodes despite affinity: {placed}"
        claims = pvcs.snapshot()[0]
        for i, node in placed.items():
            for template in templates:
                volume = (claims.get(claim(i, template=template)) or {}).get("spec", {}).get("volumeName")
                if volume:
                    assert local_volumes.node_of.get(volume) == node, (
                        f"{claim(i, template=template)} of a pod on {node} is bound to {volume}, on "
                        f"{local_volumes.node_of.get(volume, 'no node of the test')}"
                    )
        return running_and_ready(STS, range(3))(objs)

    names = {claim(i, template=t) for i in range(3) for t in templates}
    pods.wait_for(claims_on_their_pods_nodes, f"3 pods Running and Ready, {'spread' if anti else 'on one node'}")
    claims = pvcs.wait_for(bound(names), f"{len(names)} claims Bound")
    claims_on_their_pods_nodes(pods.snapshot()[0])  # the last bindings, once all are recorded
    bound_to = [pvc["spec"]["volumeName"] for pvc in claims.values()]
    assert len(set(bound_to)) == len(names), f"claims share local PVs: {sorted(bound_to)}"


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
