"""Ordering: OrderedReady creation and deletion, halting on an unready pod, Parallel, deletion of the set.

Every order is read from a pod watch opened before the test acted (the `pods` recorder).
"""

from itertools import pairwise

import pytest
from kubernetes import client

from fixtures.readiness import write_ready, write_running_unready
from fixtures.sts import (
    added,
    became_ready,
    began_terminating,
    create,
    deleted,
    is_ready,
    observed_status,
    owned_pods,
    pod_name,
    pods_after_sync,
    release_finalizer,
    release_gate,
    replaced,
    running_and_ready,
    running_not_ready,
    scale,
    set_phase,
    settled_status,
    terminating_ordinals,
    untouched,
)

STS = "sts-xiuxian"
STORAGE_WEB = "headless-volumeclaimtemplates"  # the same set with one claim per pod (data-<set>-<ordinal>)
SCALING = "StatefulSet, Scaling"  # the conformance entry the ordering tests cover
WEB = "headless-network"  # the manifest: podManagementPolicy left to its default, OrderedReady


@pytest.mark.behaviour("ordered_scale_up")
@pytest.mark.conformance(SCALING)
def test_ordered_scale_up(api, namespace, pods):
    # Pods are held unscheduled (so not Ready), then made Running but not Ready (as a container whose
    # readiness probe fails), then Ready, by the test one by one: a controller that does not wait for
    # Ready, or waits only for Running, is caught at the pod it creates too early.
    create(api, namespace, WEB, replicas=3, unscheduled=True)
    for i in range(3):
        pods.wait_for(lambda objs, i=i: pod_name(STS, i) in objs, f"{pod_name(STS, i)} created")
        if i < 2:
            only_up_to_i = lambda objs, i=i: set(owned_pods(objs, STS)) == set(range(i + 1))  # noqa: E731
            assert pods.stays(only_up_to_i), f"{pod_name(STS, i + 1)} was created while {pod_name(STS, i)} was Pending"
            pods.mark(f"{pod_name(STS, i)} Running, not Ready")
            write_running_unready(api, namespace, pod_name(STS, i))
            pods.wait_for(lambda objs, i=i: running_not_ready(objs[pod_name(STS, i)]), f"{pod_name(STS, i)} Running")
            assert pods.stays(only_up_to_i), (
                f"{pod_name(STS, i + 1)} was created while {pod_name(STS, i)} was Running but not Ready"
            )
            pods.mark(f"{pod_name(STS, i)} Ready")
            write_ready(api, namespace, pod_name(STS, i), True)
        else:
            pods.mark(f"release {pod_name(STS, i)}")
            release_gate(api, namespace, pod_name(STS, i))
    pods.wait_for(running_and_ready(STS, range(3)), "3 pods Running and Ready")

    _, events = pods.snapshot()
    assert [e.name for e in events if e.type == "ADDED"] == [pod_name(STS, i) for i in range(3)], (
        "pods were not created in ordinal order"
    )
    for i in range(1, 3):
        previous_ready, created = became_ready(events, pod_name(STS, i - 1)), added(events, pod_name(STS, i))
        assert previous_ready.seq < created.seq, (
            f"{pod_name(STS, i)} was created before {pod_name(STS, i - 1)} was Running and Ready"
        )


def next_to_terminate(i: int):
    """A condition: pod i is terminating; it fails at the event that shows a lower pod terminating first
    (the higher ones, released already, may still be listed until their removal is seen)."""

    def check(objs):
        early = {o for o in terminating_ordinals(objs, STS) if o < i}
        assert not early, f"pods {sorted(early)} began terminating before {pod_name(STS, i)}"
        return i in terminating_ordinals(objs, STS)

    return check


@pytest.mark.behaviour("ordered_scale_down")
@pytest.mark.conformance(SCALING)
def test_ordered_scale_down(api, namespace, pods):
    # Deleted pods stay Terminating until the test releases them: a controller that does not wait for
    # each pod to be gone before the next is caught whatever the speed of the nodes.
    create(api, namespace, WEB, replicas=4, on_delete=True)
    pods.wait_for(running_and_ready(STS, range(4)), "4 pods Running and Ready")

    pods.mark("scale to 1")
    scale(api, namespace, STS, 1)
    for i in (3, 2, 1):
        pods.wait_for(next_to_terminate(i), f"{pod_name(STS, i)} terminating")
        assert pods.stays(lambda objs, i=i: terminating_ordinals(objs, STS) == {i}), (
            f"pods {sorted(terminating_ordinals(pods.snapshot()[0], STS))} terminating at once; "
            f"only {pod_name(STS, i)} should be"
        )
        pods.mark(f"release {pod_name(STS, i)}")
        release_finalizer(api, namespace, pod_name(STS, i))
    pods.wait_for(running_and_ready(STS, range(1)), "only pod 0 left")

    _, events = pods.snapshot()
    assert [e.name for e in events if e.type == "DELETED"] == [pod_name(STS, i) for i in (3, 2, 1)], (
        "pods were not removed from the highest ordinal down"
    )
    for i in (3, 2):
        gone, next_starts = deleted(events, pod_name(STS, i)), began_terminating(events, pod_name(STS, i - 1))
        assert gone.seq < next_starts.seq, (
            f"{pod_name(STS, i - 1)} began terminating before {pod_name(STS, i)} was gone"
        )


@pytest.mark.behaviour("scale_halts_unhealthy")
@pytest.mark.conformance(SCALING)
def test_scale_halts_unhealthy(api, namespace, pods, statefulsets, readiness):
    create(api, namespace, WEB, replicas=3, readiness_switch=True)
    pods.wait_for(running_and_ready(STS, range(3)), "3 pods Running and Ready")

    pods.mark("make pod 1 unready, scale to 5")
    readiness.set(pod_name(STS, 1), False)
    pods.wait_for(lambda objs: not is_ready(objs[pod_name(STS, 1)]), "pod 1 unready")
    controller_saw_unready(statefulsets, 2)
    generation = scale(api, namespace, STS, 5)
    expect_ready_replicas(statefulsets, generation, 2, 3)
    assert pods.stays(lambda objs: set(owned_pods(objs, STS)) == {0, 1, 2}), "scale-up went on while pod 1 was unready"

    pods.mark("make pod 1 ready again")
    readiness.set(pod_name(STS, 1), True)
    pods.wait_for(running_and_ready(STS, range(5)), "scale-up to resume up to 5 pods")

    # Pod 0 stays in range (scale to 2), so while it is unready no pod may be removed.
    pods.mark("make pod 0 unready, scale to 2")
    readiness.set(pod_name(STS, 0), False)
    pods.wait_for(lambda objs: not is_ready(objs[pod_name(STS, 0)]), "pod 0 unready")
    controller_saw_unready(statefulsets, 4)
    generation = scale(api, namespace, STS, 2)
    expect_ready_replicas(statefulsets, generation, 4, 5)
    assert pods.stays(
        lambda objs: (
            len(owned_pods(objs, STS)) == 5
            and not any(pod["metadata"].get("deletionTimestamp") for pod in owned_pods(objs, STS).values())
        )
    ), "scale-down went on while pod 0 was unready"

    pods.mark("make pod 0 ready again")
    readiness.set(pod_name(STS, 0), True)
    pods.wait_for(running_and_ready(STS, range(2)), "scale-down to resume down to 2 pods")


def controller_saw_unready(statefulsets, ready: int) -> None:
    """Before the spec changes, the controller's own status counts the unready pod, as upstream waits
    (WaitForStatusReadyReplicas before UpdateReplicas): the test's watch can see a pod unready before the
    controller's cache does, and a sync on the stale view rightly acts as if it were Ready (seen on kind
    under load: pod 4 deleted 0.4 s after the test saw pod 0 unready, in a sync that counted 5 Ready)."""
    settled_status(statefulsets, STS, f"status.readyReplicas {ready}", lambda s: s.get("readyReplicas", 0) == ready)


def expect_ready_replicas(statefulsets, generation: int, ready: int, replicas: int) -> None:
    """The status that observes `generation` counts `ready` of `replicas` pods Ready: readyReplicas falls
    when pods go unready (upstream's WaitForStatusReadyReplicas, framework/statefulset/wait.go:109). The
    controller counted the pods unready before the test changed the spec, so the sync that observes the
    change sees them."""
    status = observed_status(statefulsets, STS, generation, "the status of the scale")
    counts = {k: status.get(k, 0) for k in ("readyReplicas", "replicas")}
    assert counts == {"readyReplicas": ready, "replicas": replicas}, f"unready pods counted wrong: {counts}"


@pytest.mark.behaviour("parallel_policy")
@pytest.mark.conformance("StatefulSet, Burst Scaling")
def test_parallel_policy(api, namespace, pods, statefulsets):
    # Pods are held unscheduled (so never Ready) and, when deleted, Terminating: an OrderedReady
    # controller would stop at pod 0 in both directions; a Parallel one must not wait. One sync creates
    # (or deletes) every pod (runForAll without monotonic, stateful_set_control.go:540), so the status
    # of that sync is the event at which all three must show.
    create(api, namespace, WEB, replicas=3, podManagementPolicy="Parallel", unscheduled=True, on_delete=True)
    _, after = pods_after_sync(api, statefulsets, STS, "the status of the first sync")
    assert set(owned_pods(after, STS)) == {0, 1, 2}, (
        f"the first sync created pods {sorted(owned_pods(after, STS))}, not all 3 at once"
    )
    pods.wait_for(lambda objs: set(owned_pods(objs, STS)) == {0, 1, 2}, "all 3 pods created while none is Ready")
    _, events = pods.snapshot()
    assert not any(e.state.get("ready") for e in events if e.type != "ACTION"), "a pod became Ready: hold failed"

    pods.mark("release the pods")
    for i in range(3):
        release_gate(api, namespace, pod_name(STS, i))
    pods.wait_for(running_and_ready(STS, range(3)), "3 pods Running and Ready")

    pods.mark("scale to 0")
    generation = scale(api, namespace, STS, 0)
    _, after = pods_after_sync(api, statefulsets, STS, "the status of the scale to 0", generation=generation)
    assert terminating_ordinals(after, STS) == {0, 1, 2}, (
        f"the sync of the scale to 0 took down pods {sorted(terminating_ordinals(after, STS))}, not all 3 at once"
    )
    pods.wait_for(
        lambda objs: all(pod["metadata"].get("deletionTimestamp") for pod in objs.values()),
        "all 3 pods Terminating while none is gone",
    )
    _, events = pods.snapshot()
    assert not any(e.type == "DELETED" for e in events), "a held pod was removed: hold failed"

    pods.mark("release the pods")
    for i in range(3):
        release_finalizer(api, namespace, pod_name(STS, i))
    pods.wait_for(lambda objs: not objs, "all pods gone")


def running_not_ready_pods(count: int):
    """A pod condition: the set has `count` pods, every one Running and not Ready."""

    def check(objs) -> bool:
        present = owned_pods(objs, STS)
        return len(present) == count and all(running_not_ready(pod) for pod in present.values())

    return check


@pytest.mark.behaviour("parallel_unhealthy_scaling")
@pytest.mark.conformance("StatefulSet, Burst Scaling")
def test_parallel_unhealthy_scaling(api, namespace, pods, statefulsets, readiness):
    # Upstream's Burst Scaling scenario (statefulset.go:833): under Parallel an unready pod does not
    # halt a scale-up, and a scale-down of unready pods runs to completion.
    create(api, namespace, WEB, replicas=1, podManagementPolicy="Parallel", readiness_switch=True)
    pods.wait_for(running_and_ready(STS, range(1)), "pod 0 Running and Ready")

    pods.mark("make pod 0 unready")
    readiness.set(pod_name(STS, 0), False)
    pods.wait_for(running_not_ready_pods(1), "pod 0 Running and not Ready")
    settled_status(statefulsets, STS, "status.readyReplicas 0", lambda s: s.get("readyReplicas", 0) == 0)
    pods.mark("scale to 3")
    generation = scale(api, namespace, STS, 3)
    _, after = pods_after_sync(api, statefulsets, STS, "the status of the scale to 3", generation=generation)
    assert set(owned_pods(after, STS)) == {0, 1, 2}, (
        f"the sync of the scale to 3 left pods {sorted(owned_pods(after, STS))}: it waited for the unready pod 0"
    )
    pods.wait_for(lambda objs: set(owned_pods(objs, STS)) == {0, 1, 2}, "pods 1 and 2 created while pod 0 is unready")

    pods.mark("make pod 0 ready again")
    readiness.set(pod_name(STS, 0), True)
    pods.wait_for(running_and_ready(STS, range(3)), "3 pods Running and Ready")

    pods.mark("make every pod unready")
    for i in range(3):
        readiness.set(pod_name(STS, i), False)
    pods.wait_for(running_not_ready_pods(3), "3 pods Running and not Ready")
    settled_status(statefulsets, STS, "status.readyReplicas 0", lambda s: s.get("readyReplicas", 0) == 0)
    pods.mark("scale to 0")
    generation = scale(api, namespace, STS, 0)
    _, after = pods_after_sync(api, statefulsets, STS, "the status of the scale to 0", generation=generation)
    kept = set(owned_pods(after, STS)) - terminating_ordinals(after, STS)
    assert not kept, f"the sync of the scale to 0 kept the unready pods {sorted(kept)}"
    pods.wait_for(lambda objs: not owned_pods(objs, STS), "every unready pod deleted")
    settled_status(statefulsets, STS, "status.replicas 0", lambda s: s.get("replicas", 0) == 0)


@pytest.mark.behaviour("scale_down_halts_unhealthy")
@pytest.mark.conformance(SCALING)
def test_scale_down_halts_unhealthy(api, namespace, pods, statefulsets, readiness):
    # Upstream's "Scaling" scenario: every pod unhealthy, scale to 0. Only the first pod in deletion
    # order (the highest) may go; any other pod that begins terminating fails the test at that event.
    create(api, namespace, WEB, replicas=3, readiness_switch=True)
    pods.wait_for(running_and_ready(STS, range(3)), "3 pods Running and Ready")
    pods.mark("make every pod unready")
    for i in range(3):
        readiness.set(pod_name(STS, i), False)
    pods.wait_for(lambda objs: not any(is_ready(p) for p in owned_pods(objs, STS).values()), "every pod unready")
    # Seen on kind (-n 4, alpha gates): without this the sync of the scale counted 2 of 3 Ready, its
    # cache not yet having the last two pods' unready updates that the test's own watch had.
    controller_saw_unready(statefulsets, 0)

    pods.mark("scale to 0")
    generation = scale(api, namespace, STS, 0)
    status = observed_status(statefulsets, STS, generation, "the status of the scale to 0")
    assert status.get("readyReplicas", 0) == 0, f"pods counted Ready while every pod is unready: {status}"

    def only_the_highest_may_go(objs):
        present = owned_pods(objs, STS)
        return {0, 1} <= set(present) and not ({0, 1} & terminating_ordinals(objs, STS))

    if not pods.stays(only_the_highest_may_go):
        objs = pods.snapshot()[0]
        raise AssertionError(
            f"scale-down went past the first pod while every pod was unhealthy: pods {sorted(owned_pods(objs, STS))}, "
            f"terminating {sorted(terminating_ordinals(objs, STS))}"
        )

    pods.mark("make the remaining pods ready again")
    # Pods 0 and 1 were just seen present and not terminating, and may not go while unhealthy. Pod 2
    # may go at any moment (seen: a loaded controller deleted it 1.7 s after the scale, after the
    # quiet window, while this loop patched it: 404): it needs no readiness to leave.
    for i in (0, 1):
        readiness.set(pod_name(STS, i), True)
    pods.wait_for(lambda objs: not owned_pods(objs, STS), "scale-down to resume down to 0 pods")


@pytest.mark.behaviour("predecessor_failure_no_deadlock")
@pytest.mark.parametrize("failure", ["deleted", "Failed"])
def test_predecessor_failure_no_deadlock(api, namespace, pods, statefulsets, readiness, failure):
    # Upstream's scenario: pod 1 unready, then pod 0 goes. Pod 0 is first in order, so the unready
    # pod 1 must not keep it from coming back, nor be replaced itself.
    create(api, namespace, WEB, replicas=2, readiness_switch=True)
    objs = pods.wait_for(running_and_ready(STS, range(2)), "2 pods Running and Ready")
    first, second = pod_name(STS, 0), pod_name(STS, 1)
    uids = {name: objs[name]["metadata"]["uid"] for name in (first, second)}
    pods.mark(f"make {second} unready")
    readiness.set(second, False)
    pods.wait_for(lambda objs: not is_ready(objs[second]), f"{second} unready")
    # A status counting both pods, pod 1 unready: the statuses of the scale-up (replicas 1) are behind it,
    # so the one below that shows the failure is written after it.
    settled_status(
        statefulsets,
        STS,
        f"{second} unready in the status",
        lambda s: (s.get("replicas"), s.get("readyReplicas")) == (2, 1),
    )

    pods.mark(f"{first} {failure}")
    since = len(statefulsets.snapshot()[1])
    if failure == "deleted":
        client.CoreV1Api(api).delete_namespaced_pod(first, namespace)
    else:
        set_phase(api, namespace, first, "Failed")

    # The first status whose counts show the failure (pod 0 missing, or no pod Ready) comes from the sync
    # that saw it, and that sync re-creates a missing pod 0 or deletes a Failed one: ordinal 0 is first
    # in processReplica's order, and nothing above it is looked at before (stateful_set_control.go:429-453).
    if failure == "deleted":
        saw, done = (lambda s: s.get("replicas", 0) < 2), (lambda objs: replaced(objs, first, uids[first]))
    else:
        saw, done = (lambda s: s.get("readyReplicas", 0) == 0), (lambda objs: not untouched(objs, first, uids[first]))
    _, after = pods_after_sync(
        api, statefulsets, STS, f"the status of the sync that saw {first} {failure}", saw, since=since
    )
    assert done(after), f"the sync that saw {first} {failure} left it so while {second} was unready"

    def second_untouched(objs) -> bool:
        assert untouched(objs, second, uids[second]), f"the unready {second} was deleted or replaced"
        return True

    pods.wait_for(
        lambda objs: second_untouched(objs) and replaced(objs, first, uids[first]) and is_ready(objs[first]),
        f"{first} re-created and Ready while {second} is unready",
    )
    pods.mark(f"make {second} ready again")
    readiness.set(second, True)
    pods.wait_for(lambda objs: second_untouched(objs) and running_and_ready(STS, range(2))(objs), "the set to converge")


def window_move(before: set[int], window: range):
    """A pod recorder condition for a move of the ordinal window from `before` to `window`: true once
    exactly the window's pods are Running and Ready; fails at the first state that breaks the order
    (the new pods come as a scale-up, in ascending order, each after the previous one is Ready; the
    old ones go only after every new one is Ready, as a scale-down, the highest first)."""
    coming, going = sorted(set(window) - before), sorted(before - set(window), reverse=True)

    def check(objs) -> bool:
        present = owned_pods(objs, STS)
        ready = {i for i, pod in present.items() if is_ready(pod)}
        for lower, higher in pairwise(coming):
            assert higher not in present or lower in ready, f"pod {higher} was created before pod {lower} was Ready"
        leaving = [i for i in going if i not in present or present[i]["metadata"].get("deletionTimestamp")]
        assert not leaving or set(coming) <= ready, f"pods {leaving} went before every new pod was Ready"
        for higher, lower in pairwise(going):
            assert not (lower in leaving and higher in present), f"pod {lower} went before pod {higher} was gone"
        return running_and_ready(STS, window)(objs)

    return check


@pytest.mark.behaviour("start_ordinal_changes")
@pytest.mark.needs("dynamic_storage")
def test_start_ordinal_changes(api, namespace, pods, pvcs):
    # Upstream's StatefulSetStartOrdinal specs on one live set: start raised (0 -> 2), lowered (2 -> 1)
    # and removed. Each claim follows its ordinal and is kept (default Retain), so a returning ordinal
    # gets its own claim back.
    create(api, namespace, STORAGE_WEB, replicas=2)
    pods.wait_for(running_and_ready(STS, range(2)), "pods 0 and 1")
    claims: dict[str, str] = {}  # claim name -> the UID it was first created with
    for start, window in ((2, range(2, 4)), (1, range(1, 3)), (None, range(0, 2))):
        before = set(owned_pods(pods.snapshot()[0], STS))
        pods.mark(f"ordinals.start {start}")
        client.AppsV1Api(api).patch_namespaced_stateful_set(
            STS, namespace, {"spec": {"ordinals": None if start is None else {"start": start}}}
        )
        objs = pods.wait_for(window_move(before, window), f"the window to move to pods {list(window)}")
        present = pvcs.snapshot()[0]
        for i in window:
            name = f"data-{STS}-{i}"
            volumes = objs[pod_name(STS, i)]["spec"].get("volumes") or []
            assert any((v.get("persistentVolumeClaim") or {}).get("claimName") == name for v in volumes), (
                f"{pod_name(STS, i)} does not mount {name}"
            )
            assert name in present, f"no claim {name} for {pod_name(STS, i)}"
            uid = claims.setdefault(name, present[name]["metadata"]["uid"])
            assert present[name]["metadata"]["uid"] == uid, f"{name} was replaced instead of re-used"


@pytest.mark.behaviour("delete_not_ordered")
def test_delete_not_ordered(api, namespace, pods, pvcs):
    # Deleting the StatefulSet object promises no order (seed 001 shows all pods Terminating at once):
    # assert only that the pods go and that their claims stay.
    create(api, namespace, "headless-volumeclaimtemplates", replicas=3, podManagementPolicy="Parallel")
    pods.wait_for(lambda objs: set(owned_pods(objs, STS)) == {0, 1, 2}, "3 pods")
    claims = {f"data-{STS}-{i}" for i in range(3)}
    pvcs.wait_for(lambda objs: claims <= set(objs), "3 claims")
    uids = {name: obj["metadata"]["uid"] for name, obj in pvcs.snapshot()[0].items()}

    pods.mark("delete the StatefulSet")
    client.AppsV1Api(api).delete_namespaced_stateful_set(STS, namespace, propagation_policy="Background")
    pods.wait_for(lambda objs: not owned_pods(objs, STS), "the pods to be deleted")
    assert pvcs.stays(
        lambda objs: (
            {n: o["metadata"]["uid"] for n, o in objs.items() if not o["metadata"].get("deletionTimestamp")} == uids
        )
    ), "claims were deleted or replaced with the StatefulSet"
