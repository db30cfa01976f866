"""The ZooKeeper ensemble of seed 000 (the Kubernetes tutorial image): a real clustered app whose
members find each other by their stable DNS names. Needs real containers (kind)."""

import re

import pytest
from kubernetes import client

from fixtures import manifests
from fixtures.execs import run_in, sh
from fixtures.sts import create, evict, pod_name, running_and_ready

STS, HEADLESS = "zk", "zk-hs"

pytestmark = [
    pytest.mark.needs("containers", "dynamic_storage", "nodes"),
    pytest.mark.wait_timeout(600),
]  # image pull and leader election on a fresh kind cluster


@pytest.fixture
def ensemble(api, namespace, pods):
    create(api, namespace, "zookeeper", replicas=3)
    pods.wait_for(running_and_ready(STS, range(3)), "3 zk members Ready")
    return namespace


def mode(api, namespace, ordinal) -> str:
    out = sh(api, namespace, pod_name(STS, ordinal), "echo srvr | nc localhost 2181")
    found = re.search(r"Mode: (\w+)", out)
    return found.group(1) if found else f"no Mode in: {out.strip()}"


def zk_cli(api, namespace, ordinal, *args) -> str:
    return run_in(api, namespace, pod_name(STS, ordinal), ["zkCli.sh", *args], timeout=120)


def dns_zone(api, namespace) -> str:
    """The cluster domain as the pods see it (never assume cluster.local)."""
    fqdn = sh(api, namespace, pod_name(STS, 0), "hostname -f").strip()
    return fqdn.split(f".{HEADLESS}.{namespace}.svc.", 1)[1]


@pytest.mark.behaviour("zk_myid")
def test_zk_myid(api, ensemble):
    for i in range(3):
        myid = run_in(api, ensemble, pod_name(STS, i), ["cat", "/var/lib/zookeeper/data/myid"]).strip()
        assert myid == str(i + 1), f"{pod_name(STS, i)} has myid {myid}, expected {i + 1}"


@pytest.mark.behaviour("zk_config")
def test_zk_config(api, ensemble):
    zone = dns_zone(api, ensemble)
    config = run_in(api, ensemble, pod_name(STS, 0), ["cat", "/opt/zookeeper/conf/zoo.cfg"])
    for i in range(3):
        expected = f"server.{i + 1}={pod_name(STS, i)}.{HEADLESS}.{ensemble}.svc.{zone}:2888:3888"
        assert expected in config, f"zoo.cfg lacks {expected}:\n{config}"
        fqdn = run_in(api, ensemble, pod_name(STS, i), ["hostname", "-f"]).strip()
        assert fqdn == f"{pod_name(STS, i)}.{HEADLESS}.{ensemble}.svc.{zone}"


@pytest.mark.behaviour("zk_quorum")
def test_zk_quorum(api, ensemble, pods):
    modes = sorted(mode(api, ensemble, i) for i in range(3))
    assert modes == ["follower", "follower", "leader"], f"modes: {modes}"

    zk_cli(api, ensemble, 0, "create", "/hello", "world")
    assert "world" in zk_cli(api, ensemble, 1, "get", "/hello"), "a znode written on zk-0 is not read on zk-1"

    pods.mark("delete zk-2")
    client.CoreV1Api(api).delete_namespaced_pod(pod_name(STS, 2), ensemble)
    assert "world" in zk_cli(api, ensemble, 0, "get", "/hello"), "the ensemble stopped serving with one member down"
    pods.wait_for(running_and_ready(STS, range(3)), "zk-2 back")

    pods.mark("delete and re-create the StatefulSet")
    docs = manifests.load("zookeeper", ensemble, replicas=3)
    client.AppsV1Api(api).delete_namespaced_stateful_set(STS, ensemble)
    pods.wait_for(lambda objs: not any(n.startswith(f"{STS}-") for n in objs), "all members gone")
    manifests.apply(api, [manifests.one(docs, "StatefulSet")])
    pods.wait_for(running_and_ready(STS, range(3)), "the ensemble back")
    assert "world" in zk_cli(api, ensemble, 2, "get", "/hello"), "the data did not survive re-creating the set"


@pytest.mark.behaviour("pdb_eviction")
def test_pdb_eviction_on_the_ensemble(api, ensemble, pods):
    assert evict(api, ensemble, pod_name(STS, 0)) == 201, "the first eviction was refused"
    assert evict(api, ensemble, pod_name(STS, 1)) == 429, "a second eviction was allowed with one member down"
    pods.wait_for(running_and_ready(STS, range(3)), "the evicted member back")
