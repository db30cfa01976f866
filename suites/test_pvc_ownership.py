"""Who owns a StatefulSet's claims under a Delete retention policy: upstream's 'Non-retain
StatefulSetPersistentVolumeClaimPolicy' specs, asserted on the owner references the controller writes
(kube-controller-manager's isClaimOwnerUpToDate: the set for whenDeleted, the pod of a scaled-down
ordinal for whenScaled, always as controller and with blockOwnerDeletion, as metav1.NewControllerRef
writes them) and on which claims the garbage collector then takes.

Claims the suite gives another owner are checked at every change: the controller must leave them
exactly as the test wrote them, so a write of its own fails at that event."""

import json
import uuid

import pytest
from kubernetes import client
from kubernetes.client.rest import ApiException

from fixtures.recorder import owner_names
from fixtures.sts import controller_uid, create, pod_name, running_and_ready, scale, untouched

STS = "sts-xiuxian"
WEB = "headless-volumeclaimtemplates"
HOLD = "sts-conformance.k8s.io/keep-claim"  # the test's own finalizer on a claim the GC would delete


def claim(ordinal: int) -> str:
    return f"data-{STS}-{ordinal}"


def ref(kind: str, name: str, uid: str, controller: bool | None, blocking: bool | None = True) -> dict:
    """An owner reference; None leaves the field out (as upstream's references to a ConfigMap do). The
    controller's own are controller and blocking (metav1.NewControllerRef)."""
    api_version = {"StatefulSet": "apps/v1", "ConfigMap": "v1", "Pod": "v1"}[kind]
    found = {"apiVersion": api_version, "kind": kind, "name": name, "uid": uid}
    flags = {"controller": controller, "blockOwnerDeletion": blocking}
    return found | {field: value for field, value in flags.items() if value is not None}


def names(refs: list[dict]) -> list[str]:
    """The references as the recorder shows them, in order (upstream compares the lists whole)."""
    return owner_names({"metadata": {"ownerReferences": refs}})


def owners(objs: dict, name: str) -> list[str]:
    return owner_names(objs[name]) if name in objs else []


def owner_versions(events: list, name: str) -> list[list[str]]:
    """The owners of each version of the claim that these recorded events show, in order."""
    return [e.state["owners"] for e in events if e.name == name and e.type != "ACTION"]


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

    since = len(pvcs.snapshot()[1])
    pvcs.mark(f"strip the controller flag from {claim(0)}")
    stripped = [ref("StatefulSet", STS, uid, False)]
    set_owners(api, namespace, claim(0), stripped)
    # In the watch, not in the current state: a sync that comes at once repairs it in the same millisecond
    # (seen in CI: the stripped and the repaired version 0.0 s apart, and a wait on the state timed out).
    pvcs.wait_for(
        lambda _: names(stripped) in owner_versions(pvcs.events[since:], claim(0)), "the stripped reference recorded"
    )
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
                seen = owner_versions(pvcs.snapshot()[1], name)
                assert pod_owned in seen, f"{name} was deleted without its pod owning it first (owners seen: {seen})"
        return set(objs) == {claim(0)} and owners(objs, claim(0)) == the_set

    pvcs.wait_for(handed_to_pods, "claims 1 and 2 owned by their pods, then deleted with them")


@pytest.mark.behaviour("pvc_ownership_other_owner")
@pytest.mark.needs("dynamic_storage")
def test_pvc_other_owners(api, namespace, pods, pvcs, held_claims):
    """Upstream's 'should not delete PVCs when there is another controller' (statefulset.go:1786) on its
    four claims: claim 1 has a plain owner, claim 2 another set's controller reference (a stale one, where
    upstream's claim 3 has it), claim 3 a controller reference to an earlier set of the same name (where
    upstream's claim 2 is the set's alone, as claim 0 is). Under whenDeleted=Delete the set controls claim
    0, joins claim 1's plain owner and leaves 2 and 3 alone; deleting the set then takes claim 0 and
    leaves 1, 2 and 3 (which the test holds: the garbage collector deletes a claim whose only owner is
    gone)."""
    uid = ready_set(api, namespace, pods, pvcs, 4)
    config = other_owner(api, namespace, "random-owner-")
    plain_owner = [ref("ConfigMap", config.name, config.uid, controller=None, blocking=None)]
    stale_set = [ref("StatefulSet", "unknown", str(uuid.uuid4()), True)]
    earlier_set = [ref("StatefulSet", STS, str(uuid.uuid4()), True)]
    pvcs.mark(f"{claim(1)}: a plain owner; {claim(2)}: another set's stale reference; {claim(3)}: an earlier set")
    set_owners(api, namespace, claim(1), plain_owner)
    held_claims += [claim(2), claim(3)]
    set_owners(api, namespace, claim(2), stale_set, finalizers=[HOLD])
    set_owners(api, namespace, claim(3), earlier_set, finalizers=[HOLD])
    foreign = {claim(2): names(stale_set), claim(3): names(earlier_set)}
    written = {claim(1): names(plain_owner), **foreign}
    pvcs.wait_for(lambda o: all(owners(o, n) == w for n, w in written.items()), "the test's owners recorded")

    pvcs.mark("whenDeleted=Delete")
    set_policy(api, namespace, whenDeleted="Delete")
    the_set = ref("StatefulSet", STS, uid, True)  # controller and blockOwnerDeletion, as upstream expects
    beside = names(plain_owner + [the_set])
    guard = left_alone(foreign)
    reached = only_as_controller({claim(0): names([the_set]), claim(1): beside}, before={claim(1): names(plain_owner)})
    pvcs.wait_for(lambda o: guard(o) and reached(o), "claim 0 controlled by the set, claim 1 beside its owner")

    pvcs.mark("delete the StatefulSet")
    client.AppsV1Api(api).delete_namespaced_stateful_set(STS, namespace)

    def kept(objs):  # claim 1 loses the set's reference and keeps its plain owner
        assert claim(1) in objs, f"{claim(1)}, which a ConfigMap owns too, was deleted with the set"
        assert owners(objs, claim(1)) in (beside, names(plain_owner)), f"{claim(1)} has {owners(objs, claim(1))}"
        return guard(objs) and owners(objs, claim(1)) == names(plain_owner)

    survivors = {claim(1), claim(2), claim(3)}
    pvcs.wait_for(lambda o: kept(o) and set(o) == survivors, "claim 0 deleted with the set, claims 1 to 3 kept")
    assert pvcs.stays(lambda o: kept(o) and set(o) == survivors), "a claim another owner holds was deleted later"


@pytest.mark.behaviour("pvc_ownership_owner_removed")
@pytest.mark.needs("dynamic_storage")
def test_pvc_other_controller_removed(api, namespace, pods, pvcs):
    """Upstream's 'should not delete PVC with OnScaledown policy if another controller owns the PVC'
    (statefulset.go:1643): under whenScaled=Delete a claim another controller owns outlives the scale to
    0; once that owner is removed it is the set's again, re-used on scale-up and deleted with its pod on
    the next scale-down."""
    ready_set(api, namespace, pods, pvcs, 3)
    config = other_owner(api, namespace, "dummy-controller-")
    other_controller = [ref("ConfigMap", config.name, config.uid, True, blocking=None)]
    pvcs.mark(f"{claim(1)}: another controller")
    set_owners(api, namespace, claim(1), other_controller)
    pvcs.wait_for(lambda o: owners(o, claim(1)) == names(other_controller), "the test's owner recorded")
    kept_uid = pvcs.snapshot()[0][claim(1)]["metadata"]["uid"]

    pvcs.mark("whenScaled=Delete, then scale to 0")
    set_policy(api, namespace, whenScaled="Delete")
    scale(api, namespace, STS, 0)
    guard = left_alone({claim(1): names(other_controller)})
    pvcs.wait_for(lambda o: guard(o) and set(o) == {claim(1)}, f"claims 0 and 2 gone with their pods, {claim(1)} kept")

    pvcs.mark(f"remove the owner of {claim(1)}")
    client.CoreV1Api(api).patch_namespaced_persistent_volume_claim(
        claim(1), namespace, [{"op": "remove", "path": "/metadata/ownerReferences"}]
    )
    pvcs.wait_for(lambda o: owners(o, claim(1)) == [], "the owner removal recorded")

    pods.mark("scale to 2")
    scale(api, namespace, STS, 2)
    pods.wait_for(running_and_ready(STS, range(2)), "2 pods Running and Ready")
    claims = pvcs.wait_for(lambda o: set(o) == {claim(0), claim(1)}, "claims 0 and 1")
    assert claims[claim(1)]["metadata"]["uid"] == kept_uid, f"{claim(1)} was replaced: pod 1 must re-use it"

    pod = pods.snapshot()[0][pod_name(STS, 1)]
    the_pod = names([ref("Pod", pod_name(STS, 1), pod["metadata"]["uid"], True)])
    pods.mark("scale to 1")
    pvcs.mark("scale to 1")
    since = len(pvcs.snapshot()[1])
    scale(api, namespace, STS, 1)
    pods.wait_for(lambda o: not untouched(o, pod_name(STS, 1), pod["metadata"]["uid"]), f"{pod_name(STS, 1)} deleted")
    # The controller hands a condemned pod its claims before it deletes the pod (processCondemned's
    # fixPodClaim pass), so the claim shows it now: a read, not the claim watch, which may lag the pods'.
    assert claim_owners_now(api, namespace, claim(1)) in (the_pod, None), (
        f"{pod_name(STS, 1)} is being deleted, but {claim(1)} is not its pod's to go with it"
    )
    # The read finds nothing once the garbage collector has taken the claim: the claim's watch has every
    # version since the scale, and the one that handed it over must name the pod exactly (blocking too).
    pvcs.wait_for(
        lambda _: handed_only_to(pvcs.events[since:], claim(1), the_pod),
        f"{claim(1)} handed to {pod_name(STS, 1)} in the claim's watch",
    )
    pvcs.wait_for(lambda o: set(o) == {claim(0)}, f"{claim(1)} deleted with its pod this time")


def handed_only_to(events: list, name: str, owners: list[str]) -> bool:
    """True once a version of the claim has owners; fails at the first version whose owners are others."""
    versions = [e for e in events if e.name == name and e.type != "ACTION" and e.state.get("owners")]
    for version in versions:
        assert version.state["owners"] == owners, (
            f"{name} has owners {version.state['owners']} ({version.type}), not its condemned pod's {owners}"
        )
    return bool(versions)


def other_owner(api, namespace: str, prefix: str):
    """A ConfigMap to stand for another controller (as upstream's specs do)."""
    body = {"metadata": {"generateName": prefix}}
    return client.CoreV1Api(api).create_namespaced_config_map(namespace, body).metadata


def claim_owners_now(api, namespace: str, name: str) -> list[str] | None:
    """The claim's owners as the API has them now; None once it is gone or going."""
    core = client.CoreV1Api(api)
    try:
        found = json.loads(core.read_namespaced_persistent_volume_claim(name, namespace, _preload_content=False).data)
    except ApiException as error:
        if error.status == 404:
            return None
        raise
    return None if found["metadata"].get("deletionTimestamp") else owner_names(found)


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
