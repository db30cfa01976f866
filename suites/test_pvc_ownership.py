"""Who owns a StatefulSet's claims under a Delete retention policy: upstream's 'Non-retain
StatefulSetPersistentVolumeClaimPolicy' specs, asserted on the owner references the controller writes
(kube-controller-manager's isClaimOwnerUpToDate: the set for whenDeleted, the pod of a scaled-down
ordinal for whenScaled, always as controller) and on which claims the garbage collector then takes.

Claims the suite gives another owner are checked at every change: the controller must leave them
exactly as the test wrote them, so a write of its own fails at that event."""

import uuid

import pytest
from kubernetes import client
from kubernetes.client.rest import ApiException

from fixtures.recorder import owner_names
from fixtures.sts import controller_uid, create, pod_name, running_and_ready, scale

STS = "sts-xiuxian"
WEB = "headless-volumeclaimtemplates"
HOLD = "sts-conformance.k8s.io/keep-claim"  # the test's own finalizer on a claim the GC would delete


def claim(ordinal: int) -> str:
    return f"data-{STS}-{ordinal}"


def ref(kind: str, name: str, uid: str, controller: bool) -> dict:
    api_version = {"StatefulSet": "apps/v1", "ConfigMap": "v1", "Pod": "v1"}[kind]
    return {
        "apiVersion": api_version,
        "kind": kind,
        "name": name,
        "uid": uid,
        "controller": controller,
        "blockOwnerDeletion": True,
    }


def names(refs: list[dict]) -> list[str]:
    return sorted(owner_names({"metadata": {"ownerReferences": refs}}))


def owners(objs: dict, name: str) -> list[str]:
    return sorted(owner_names(objs[name])) if name in objs else []


def set_owners(api, namespace: str, name: str, refs: list[dict], finalizers: list[str] | None = None) -> None:
    patch = [{"op": "add", "path": "/metadata/ownerReferences", "value": refs}]
    if finalizers is not None:
        patch.append({"op": "add", "path": "/metadata/finalizers", "value": finalizers})
    client.CoreV1Api(api).patch_namespaced_persistent_volume_claim(name, namespace, patch)


def set_policy(api, namespace: str, **policy: str) -> None:
    body = {"spec": {"persistentVolumeClaimRetentionPolicy": policy}}
    client.AppsV1Api(api).patch_namespaced_stateful_set(STS, namespace, body)


def ready_set(api, namespace, pods, pvcs, replicas: int, **policy: str) -> str:
    """A set of `replicas` Ready pods with Bound claims and the given retention policy; its UID."""
    spec = {"persistentVolumeClaimRetentionPolicy": policy} if policy else {}
    create(api, namespace, WEB, replicas=replicas, **spec)
    pods.wait_for(running_and_ready(STS, range(replicas)), f"{replicas} pods Running and Ready")
    pvcs.wait_for(lambda o: all(claim(i) in o for i in range(replicas)), f"{replicas} claims")
    return client.AppsV1Api(api).read_namespaced_stateful_set(STS, namespace).metadata.uid


def only_as_controller(expected: dict[str, list[str]], before: dict[str, list[str]] | None = None):
    """A pvc condition: each claim has reached its expected owners; on the way it may keep the owners it
    had `before` (none: a claim is created before its references are written), but any other owner
    list fails at that change."""

    def check(objs):
        for name, wanted in expected.items():
            have, had = owners(objs, name), (before or {}).get(name, [])
            assert have in (had, wanted), f"{name} has owners {have}; expected {wanted} (or still {had})"
        return all(owners(objs, name) == wanted for name, wanted in expected.items())

    return check


def left_alone(expected: dict[str, list[str]]):
    """A pvc condition: these claims exist with exactly the owners the test gave them."""

    def check(objs):
        for name, wanted in expected.items():
            assert name in objs, f"{name}, which another owner holds, was deleted"
            assert owners(objs, name) == wanted, f"{name} was re-owned: {owners(objs, name)}, not {wanted}"
        return True

    return check


@pytest.mark.behaviour("pvc_ownership")
@pytest.mark.needs("dynamic_storage")
def test_pvc_owner_references(api, namespace, pods, pvcs):
    """whenDeleted=Delete: the set controls every claim; a reference stripped of its controller flag is
    repaired; whenScaled=Delete: a scaled-down pod controls its claim, which goes with it."""
    uid = ready_set(api, namespace, pods, pvcs, 3, whenDeleted="Delete")
    the_set = names([ref("StatefulSet", STS, uid, True)])
    pvcs.wait_for(only_as_controller({claim(i): the_set for i in range(3)}), "each claim controlled by the set")

    pvcs.mark(f"strip the controller flag from {claim(0)}")
    stripped = [ref("StatefulSet", STS, uid, False)]
    set_owners(api, namespace, claim(0), stripped)
    pvcs.wait_for(lambda o: owners(o, claim(0)) == names(stripped), "the stripped reference recorded")
    pvcs.mark("whenScaled=Delete too, which makes the controller sync the set")
    set_policy(api, namespace, whenDeleted="Delete", whenScaled="Delete")
    pvcs.wait_for(lambda o: owners(o, claim(0)) == the_set, f"{claim(0)} controlled by the set again")

    live = pods.snapshot()[0]
    condemned = {
        claim(i): names([ref("Pod", pod_name(STS, i), live[pod_name(STS, i)]["metadata"]["uid"], True)]) for i in (1, 2)
    }
    pvcs.mark("scale to 1")
    scale(api, namespace, STS, 1)

    def handed_to_pods(objs):
        for name, pod_owned in condemned.items():
            if name in objs:
                have = owners(objs, name)
                assert have in (the_set, pod_owned), f"{name} has owners {have} while its pod is scaled down"
            else:
                _, events = pvcs.snapshot()
                seen = [e.state["owners"] for e in events if e.name == name and e.type != "ACTION"]
                assert pod_owned in [sorted(o) for o in seen], (
                    f"{name} was deleted without its pod owning it first (owners seen: {seen})"
                )
        return set(objs) == {claim(0)} and owners(objs, claim(0)) == the_set

    pvcs.wait_for(handed_to_pods, "claims 1 and 2 owned by their pods, then deleted with them")


@pytest.mark.behaviour("pvc_ownership_other_owner")
@pytest.mark.needs("dynamic_storage")
def test_pvc_other_owners(api, namespace, pods, pvcs, held_claims):
    """A claim another controller owns, or one whose controller is an earlier set of the same name, is
    neither re-owned nor deleted; a plain (non-controller) owner is kept beside the set's reference."""
    uid = ready_set(api, namespace, pods, pvcs, 4)
    config = (
        client.CoreV1Api(api)
        .create_namespaced_config_map(namespace, {"metadata": {"generateName": "other-owner-"}})
        .metadata
    )
    other_controller = [ref("ConfigMap", config.name, config.uid, True)]
    plain_owner = [ref("ConfigMap", config.name, config.uid, False)]
    earlier_set = [ref("StatefulSet", STS, str(uuid.uuid4()), True)]  # the GC deletes it: held by a finalizer
    pvcs.mark(f"{claim(1)}: another controller; {claim(2)}: a plain owner; {claim(3)}: an earlier set")
    set_owners(api, namespace, claim(1), other_controller)
    set_owners(api, namespace, claim(2), plain_owner)
    held_claims.append(claim(3))
    set_owners(api, namespace, claim(3), earlier_set, finalizers=[HOLD])
    foreign = {claim(1): names(other_controller), claim(3): names(earlier_set)}
    pvcs.wait_for(lambda o: all(owners(o, n) == w for n, w in foreign.items()), "the test's owners recorded")

    pvcs.mark("whenDeleted=Delete, whenScaled=Delete")
    set_policy(api, namespace, whenDeleted="Delete", whenScaled="Delete")
    the_set = ref("StatefulSet", STS, uid, True)
    expected = {claim(0): names([the_set]), claim(2): names(plain_owner + [the_set])}
    guard = left_alone(foreign)
    reached = only_as_controller(expected, before={claim(2): names(plain_owner)})
    pvcs.wait_for(lambda o: guard(o) and reached(o), "claims 0 and 2 controlled by the set")
    assert pvcs.stays(guard), "a claim another owner holds was re-owned or deleted"

    pvcs.mark("scale to 1")
    scale(api, namespace, STS, 1)
    pods.wait_for(lambda o: set(o) == {pod_name(STS, 0)}, "pods 1 to 3 gone")
    pvcs.wait_for(lambda o: guard(o) and claim(2) in o, f"{claim(2)} kept for its other owner")
    assert pvcs.stays(lambda o: guard(o) and claim(2) in o), "a claim with another owner was deleted"


@pytest.mark.behaviour("pvc_ownership_adopted_pod")
@pytest.mark.needs("dynamic_storage")
@pytest.mark.parametrize("policy", ["whenScaled", "whenDeleted"])
def test_pvc_of_adopted_pod(api, namespace, pods, pvcs, policy):
    """The claims of a pod orphaned and adopted again follow the policy: whenScaled=Delete takes its
    claim on scale-down, whenDeleted=Delete with the set (upstream's 'after adopting pod' specs). The
    policy is set after the adoption, so the controller must bring the adopted pod's claims in line."""
    uid = ready_set(api, namespace, pods, pvcs, 3)
    name = pod_name(STS, 2)
    before = pods.snapshot()[0][name]["metadata"]["resourceVersion"]
    pods.mark(f"orphan {name}")
    orphaned = client.CoreV1Api(api).patch_namespaced_pod(
        name, namespace, [{"op": "remove", "path": "/metadata/ownerReferences"}]
    )
    # Adopted means a write after the orphaning (the watch may not have shown the orphan yet).
    seen = {before, orphaned.metadata.resource_version}
    pods.wait_for(
        lambda o: o[name]["metadata"]["resourceVersion"] not in seen and controller_uid(o[name]) == uid,
        f"{name} adopted again",
    )
    pvcs.mark(f"{policy}=Delete")
    set_policy(api, namespace, **{policy: "Delete"})
    if policy == "whenScaled":
        pvcs.mark("scale to 1")
        scale(api, namespace, STS, 1)
        pvcs.wait_for(lambda o: set(o) == {claim(0)}, "the claims of ordinals 1 and 2 deleted, the adopted one too")
    else:
        the_set = names([ref("StatefulSet", STS, uid, True)])
        # Deleting the set ends its syncs, so its references must be there first, the adopted pod's too.
        pvcs.wait_for(only_as_controller({claim(i): the_set for i in range(3)}), "each claim controlled by the set")
        pvcs.mark("delete the StatefulSet")
        client.AppsV1Api(api).delete_namespaced_stateful_set(STS, namespace)
        pvcs.wait_for(lambda o: not o, "every claim deleted with the set, the adopted pod's too")


@pytest.fixture
def held_claims(api, namespace):
    """Claims the test holds with its own finalizer; released at teardown so the namespace can go."""
    held: list[str] = []
    yield held
    core = client.CoreV1Api(api)
    for name in held:
        try:
            claim_obj = core.read_namespaced_persistent_volume_claim(name, namespace)
        except ApiException as error:
            if error.status == 404:
                continue
            raise
        kept = [f for f in claim_obj.metadata.finalizers or [] if f != HOLD]
        core.patch_namespaced_persistent_volume_claim(
            name, namespace, [{"op": "replace", "path": "/metadata/finalizers", "value": kept}]
        )
