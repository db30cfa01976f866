"""Disruption: the ZooKeeper PDB of seed 000 (maxUnavailable 1) through the Eviction API."""
import pytest
from kubernetes import client
from kubernetes.client.rest import ApiException

from fixtures import manifests
from fixtures.recorder import Recorder, generic_state
from fixtures.sts import hold_pods, pod_name, release_finalizer, running_and_ready

STS = "zk"


def evict(api, namespace, pod) -> int:
    """The Eviction API's answer (201 allowed, 429 refused by the budget); never retried (unlike drain)."""
    body = client.V1Eviction(metadata=client.V1ObjectMeta(name=pod, namespace=namespace))
    try:
        client.CoreV1Api(api).create_namespaced_pod_eviction(pod, namespace, body)
        return 201
    except ApiException as error:
        return error.status


def allows_one(objs) -> bool:
    status = (objs.get("zk-pdb") or {}).get("status") or {}
    return status.get("disruptionsAllowed") == 1 and status.get("currentHealthy") == 3


@pytest.fixture
def budgets(api, namespace):
    recorder = Recorder(client.PolicyV1Api(api).list_namespaced_pod_disruption_budget, namespace,
                        "poddisruptionbudgets", generic_state).start()
    yield recorder
    recorder.stop()


@pytest.mark.behaviour("pdb_eviction")
@pytest.mark.needs("dynamic_storage")
def test_pdb_eviction(api, namespace, pods, budgets, settings):
    docs = manifests.load("zookeeper", namespace, replicas=3)
    # An evicted pod stays Terminating until released, so "until the replacement is Ready" is ours to time.
    hold_pods(manifests.one(docs, "StatefulSet"), on_delete=True)
    manifests.apply(api, docs)
    pods.wait_for(running_and_ready(STS, range(3)), settings.wait_timeout, "3 zk pods")
    budgets.wait_for(allows_one, settings.wait_timeout, "zk-pdb to allow 1 disruption")

    pods.mark("evict zk-0")
    assert evict(api, namespace, pod_name(STS, 0)) == 201, "the first eviction was refused"
    pods.mark("evict zk-1")
    assert evict(api, namespace, pod_name(STS, 1)) == 429, "a second eviction was allowed with one member down"

    pods.mark("release zk-0")
    release_finalizer(api, namespace, pod_name(STS, 0))
    pods.wait_for(running_and_ready(STS, range(3)), settings.wait_timeout, "the replacement zk-0 Ready")
    budgets.wait_for(allows_one, settings.wait_timeout, "zk-pdb to allow 1 disruption again")
    pods.mark("evict zk-1 again")
    assert evict(api, namespace, pod_name(STS, 1)) == 201, "eviction refused after the replacement was Ready"
