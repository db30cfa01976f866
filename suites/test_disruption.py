"""Disruption: the ZooKeeper PDB of seed 000 (maxUnavailable 1) through the Eviction API."""

import pytest

from fixtures import sts
from fixtures.sts import (
    ZOOKEEPER_WAIT_TIMEOUT,
    budget_allows_one,
    controlled_by,
    evict,
    owned_pods,
    pod_name,
    release_finalizer,
    running_and_ready,
)

STS = "zk"


allows_one = budget_allows_one("zk-pdb", healthy=3)


def members_ready(objs) -> bool:
    """The 3 zk pods Running and Ready; fails at a pod created without the set as its controller, which
    the budget can never count (the disruption controller finds the expected pods through that owner)."""
    orphans = sorted(pod_name(STS, i) for i, pod in owned_pods(objs, STS).items() if not controlled_by(pod, STS))
    assert not orphans, f"pods {orphans} are not controlled by StatefulSet {STS}"
    return running_and_ready(STS, range(3))(objs)


@pytest.mark.behaviour("pdb_eviction")
@pytest.mark.needs("dynamic_storage")
@pytest.mark.wait_timeout(ZOOKEEPER_WAIT_TIMEOUT)
def test_pdb_eviction(api, namespace, pods, budgets):
    # An evicted pod stays Terminating until released, so "until the replacement is Ready" is ours to time.
    sts.create(api, namespace, "zookeeper", replicas=3, on_delete=True)
    pods.wait_for(members_ready, "3 zk pods")
    budgets.wait_for(allows_one, "zk-pdb to allow 1 disruption")

    pods.mark("evict zk-0")
    assert evict(api, namespace, pod_name(STS, 0)) == 201, "the first eviction was refused"
    pods.mark("evict zk-1")
    assert evict(api, namespace, pod_name(STS, 1)) == 429, "a second eviction was allowed with one member down"

    pods.mark("release zk-0")
    release_finalizer(api, namespace, pod_name(STS, 0))
    pods.wait_for(running_and_ready(STS, range(3)), "the replacement zk-0 Ready")
    budgets.wait_for(allows_one, "zk-pdb to allow 1 disruption again")
    pods.mark("evict zk-1 again")
    assert evict(api, namespace, pod_name(STS, 1)) == 201, "eviction refused after the replacement was Ready"
