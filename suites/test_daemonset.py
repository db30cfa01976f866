"""The DaemonSet companion of seed 001: one pod per eligible node, taints honoured unless tolerated."""

import pytest
from kubernetes import client

from fixtures import manifests

CONTROL_PLANE_TOLERATION = {
    "key": "node-role.kubernetes.io/control-plane",
    "operator": "Exists",
    "effect": "NoSchedule",
}


def tolerated(taint, tolerations) -> bool:
    for t in tolerations:
        if t.get("effect") not in (None, "", taint.effect):
            continue
        if t.get("operator") == "Exists" and (not t.get("key") or t["key"] == taint.key):
            return True
        if t.get("key") == taint.key and t.get("value", "") == (taint.value or ""):
            return True
    return False


def eligible_nodes(api, tolerations) -> set[str]:
    """Nodes whose NoSchedule/NoExecute taints the pod template tolerates (the DaemonSet's own rule)."""
    nodes = client.CoreV1Api(api).list_node().items
    return {
        n.metadata.name
        for n in nodes
        if all(tolerated(t, tolerations) for t in n.spec.taints or [] if t.effect in ("NoSchedule", "NoExecute"))
    }


@pytest.mark.behaviour("daemonset_per_node")
@pytest.mark.parametrize("extra_toleration", [False, True], ids=["seed-tolerations", "tolerates-control-plane"])
def test_daemonset_per_node(api, namespace, pods, extra_toleration):
    docs = manifests.load("daemonset-fluentd", namespace)
    spec = manifests.one(docs, "DaemonSet")["spec"]["template"]["spec"]
    if extra_toleration:
        spec["tolerations"].append(CONTROL_PLANE_TOLERATION)
    expected = eligible_nodes(api, spec["tolerations"])
    manifests.apply(api, docs)

    def placement(objs):
        live = [p for p in objs.values() if not p["metadata"].get("deletionTimestamp")]
        return sorted(p["spec"].get("nodeName") or "" for p in live)

    pods.wait_for(lambda objs: placement(objs) == sorted(expected), f"one pod on each of {sorted(expected)}")
    assert pods.stays(lambda objs: placement(objs) == sorted(expected)), "the DaemonSet's pods moved or multiplied"
