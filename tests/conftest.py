from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tests import sshd
from tests.support import Cluster


@pytest.fixture(scope="module")
def hosts(tmp_path_factory: pytest.TempPathFactory) -> Iterator[sshd.SshHosts]:
    """Two real sshd "hosts" on loopback, web01 and web02, for the file (tests/sshd.py)."""
    if not sshd.available():
        pytest.skip("needs openssh-server (sshd)")
    started = sshd.SshHosts(tmp_path_factory.mktemp("sshd"), ["web01", "web02"]).start()
    yield started
    started.stop()


@pytest.fixture
def make_cluster(tmp_path: Path) -> Iterator[Callable[..., Cluster]]:
    """Build a cluster config: make_cluster({"bj": ["bj-1", "bj-2"]}, limits={...})."""
    made: list[Cluster] = []

    def make(idcs: dict[str, list[str]] | None = None, **kw) -> Cluster:
        cluster = Cluster(tmp_path / f"cluster{len(made)}", idcs or {"local": ["m1"]}, **kw)
        made.append(cluster)
        return cluster

    yield make
    for cluster in made:
        cluster.stop_all()


@pytest.fixture
def cluster(make_cluster: Callable[..., Cluster]) -> Iterator[Cluster]:
    """One IDC ("local") with one running master ("m1")."""
    c = make_cluster()
    c.start("m1")
    yield c


@pytest.fixture
def router(cluster: Cluster):
    r = cluster.router()
    yield r
    r.close()
