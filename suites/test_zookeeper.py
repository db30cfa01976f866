"""The ZooKeeper ensemble of seed 000 (the Kubernetes tutorial image): a real clustered app whose
members find each other by their stable DNS names. Needs real containers (kind)."""

import re

import pytest
from kubernetes import client
from kubernetes.client.rest import ApiException

from fixtures import manifests
from fixtures.execs import run_in, sh
from fixtures.sts import (
    ZOOKEEPER_WAIT_TIMEOUT,
    budget_allows_one,
    containers_stopped,
    create,
    evict,
    hold_on_delete,
    pod_name,
    release_finalizer,
    replaced,
    restart,
    running_and_ready,
)
from fixtures.waits import eventually

STS, HEADLESS = "zk", "zk-hs"
MYID = "/var/lib/zookeeper/data/myid"

pytestmark = [
    pytest.mark.needs("containers", "dynamic_storage", "nodes"),
    pytest.mark.wait_timeout(ZOOKEEPER_WAIT_TIMEOUT),
]  # and leader election


@pytest.fixture
def ensemble(api, namespace, pods):
    create(api, namespace, "zookeeper", replicas=3)
    pods.wait_for(running_and_ready(STS, range(3)), "3 zk members Ready")
    return namespace


def mode(api, namespace, ordinal) -> str:
    out = sh(api, namespace, pod_name(STS, ordinal), "echo srvr | nc localhost 2181")
    found = re.search(r"Mode: (\w+)", out)
    return found.group(1) if found else f"no Mode in: {out.strip()}"


QUORUM = ["follower", "follower", "leader"]
ELECTION_SECONDS = 60  # zookeeper-ready answers imok before a leader is elected: Ready is not quorum


def settled_modes(api, namespace) -> list[str]:
    """The members' modes once they show one leader and two followers, or as last read after
    ELECTION_SECONDS (there is no watch on a ZooKeeper election: a bounded retry)."""
    last: list[str] = []

    def read() -> bool:
        last[:] = sorted(mode(api, namespace, i) for i in range(3))
        return last == QUORUM

    eventually(read, ELECTION_SECONDS)
    return last


def container_running(pod) -> bool:
    statuses = ((pod or {}).get("status") or {}).get("containerStatuses") or []
    return bool(statuses) and all("running" in (s.get("state") or {}) for s in statuses)


def written(read, seconds: float = 30) -> str:
    """What read() returns once it is not empty: the entrypoint writes myid just after the container
    starts (a file has no watch: a bounded retry)."""
    seen = [""]

    def attempt() -> bool:
        try:
            seen[0] = read()
        except (AssertionError, ApiException):  # no file yet, or a container still starting
            seen[0] = ""
        return bool(seen[0])

    eventually(attempt, seconds)
    return seen[0]


def zk_cli(api, namespace, ordinal, *args) -> str:
    return run_in(api, namespace, pod_name(STS, ordinal), ["zkCli.sh", *args], timeout=120)


def write_then_read(api, namespace, writer: int, reader: int, path: str, value: str) -> str:
    """Writes path=value on one member and reads it on another, retried for ELECTION_SECONDS: after
    losing a member the others re-elect a leader and refuse clients until then. Returns the last
    read or error. (zkCli 3.4 reports a create on stderr, and a retried create of a node the lost
    reply did write fails: the read is the proof, the create's exit is not.)"""
    last = [""]

    def attempt() -> bool:
        try:
            zk_cli(api, namespace, writer, "create", path, value)
        except AssertionError as error:  # refused during the election, or written by an earlier try
            last[0] = str(error)
        try:
            last[0] = zk_cli(api, namespace, reader, "get", path)
        except AssertionError as error:
            last[0] = str(error)
        return value in last[0]

    eventually(attempt, ELECTION_SECONDS)
    return last[0]


def dns_zone(api, namespace) -> str:
    """The cluster domain as the pods see it (never assume cluster.local)."""
    fqdn = sh(api, namespace, pod_name(STS, 0), "hostname -f").strip()
    return fqdn.split(f".{HEADLESS}.{namespace}.svc.", 1)[1]


@pytest.mark.behaviour("zk_myid")
def test_zk_myid(api, namespace, pods):
    # Each member is checked as soon as its container runs: a wrong id fails here, at that member,
    # not after the ensemble (which a wrong numbering may never form) is awaited.
    create(api, namespace, "zookeeper", replicas=3)
    for i in range(3):
        member = pod_name(STS, i)
        pods.wait_for(lambda o, member=member: container_running(o.get(member)), f"{member} running")
        myid = written(lambda member=member: run_in(api, namespace, member, ["cat", MYID]).strip())
        assert myid == str(i + 1), f"{member} has myid {myid!r}, expected {i + 1}"


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
@pytest.mark.starts_first  # the suite's longest chain: started late, it alone sets when a run ends
def test_zk_quorum(api, ensemble, pods, statefulsets):
    modes = settled_modes(api, ensemble)
    assert modes == QUORUM, f"modes after {ELECTION_SECONDS}s: {modes}"

    zk_cli(api, ensemble, 0, "create", "/hello", "world")
    assert "world" in zk_cli(api, ensemble, 1, "get", "/hello"), "a znode written on zk-0 is not read on zk-1"

    # One member down for as long as the test needs: held by a finalizer, the deleted zk-2 stays
    # Terminating with its container stopped, and the controller makes no replacement until it is
    # released. Only then do reads and a write on the other two prove they are a quorum of their own.
    victim = pod_name(STS, 2)
    old_uid = pods.snapshot()[0][victim]["metadata"]["uid"]
    hold_on_delete(api, ensemble, victim)
    pods.mark(f"delete {victim}")
    client.CoreV1Api(api).delete_namespaced_pod(victim, ensemble)
    pods.wait_for(lambda o: containers_stopped(o, victim), f"{victim}'s container stopped")
    read = write_then_read(api, ensemble, 0, 1, "/one-down", "two")
    assert "two" in read, f"no write served {ELECTION_SECONDS}s after losing {victim}: {read[-600:]}"
    assert "world" in zk_cli(api, ensemble, 1, "get", "/hello"), "the ensemble stopped serving with one member down"
    pods.mark(f"release {victim}")
    release_finalizer(api, ensemble, victim)
    pods.wait_for(lambda o: replaced(o, victim, old_uid) and running_and_ready(STS, range(3))(o), "a new zk-2 Ready")
    assert settled_modes(api, ensemble) == QUORUM, "the ensemble did not re-form after losing a member"
    assert "two" in zk_cli(api, ensemble, 2, "get", "/one-down"), "the returned member lacks the write made without it"

    # Upstream's clustered-app spec (statefulset.go:1500, clusterAppTester.run) on this ensemble: written
    # on member 0, Restart (scale to 0, status.replicas 0, back to 3), read on member 2. Every member
    # must be a new pod, or the read proves nothing about data that outlives its pods.
    members = {name: obj["metadata"]["uid"] for name, obj in pods.snapshot()[0].items() if name.startswith(f"{STS}-")}
    restart(api, ensemble, statefulsets, STS, 3)
    pods.wait_for(
        lambda o: all(replaced(o, name, uid) for name, uid in members.items()) and running_and_ready(STS, range(3))(o),
        "3 new zk members Ready after scaling to 0 and back",
    )
    assert settled_modes(api, ensemble) == QUORUM, "the restarted ensemble elected no leader"
    assert "world" in zk_cli(api, ensemble, 2, "get", "/hello"), "the data did not survive scaling to 0 and back"

    pods.mark("delete and re-create the StatefulSet")
    docs = manifests.load("zookeeper", ensemble, replicas=3)
    client.AppsV1Api(api).delete_namespaced_stateful_set(STS, ensemble)
    pods.wait_for(lambda objs: not any(n.startswith(f"{STS}-") for n in objs), "all members gone")
    manifests.apply(api, [manifests.one(docs, "StatefulSet")])
    pods.wait_for(running_and_ready(STS, range(3)), "the ensemble back")
    assert settled_modes(api, ensemble) == QUORUM, "the re-created ensemble elected no leader"
    assert "world" in zk_cli(api, ensemble, 2, "get", "/hello"), "the data did not survive re-creating the set"


@pytest.mark.behaviour("pdb_eviction")
def test_pdb_eviction_on_the_ensemble(api, ensemble, pods, budgets):
    budgets.wait_for(budget_allows_one("zk-pdb", healthy=3), "zk-pdb to allow 1 disruption")
    evicted = pod_name(STS, 0)
    old_uid = pods.snapshot()[0][evicted]["metadata"]["uid"]
    pods.mark(f"evict {evicted}")
    assert evict(api, ensemble, evicted) == 201, "the first eviction was refused"
    assert evict(api, ensemble, pod_name(STS, 1)) == 429, "a second eviction was allowed with one member down"
    pods.wait_for(lambda o: replaced(o, evicted, old_uid) and running_and_ready(STS, range(3))(o), "a new zk-0 Ready")
