"""A real Redis Sentinel set for tests: a primary, replicas and three sentinels on 127.0.0.1.

Every process is a plain ``redis-server`` (the sentinels run ``redis-server FILE --sentinel``)
on a free port, with its files in one temp dir; nothing here touches the shared Redis on 6379.
The data nodes run like deploy/ha's: AOF with ``appendfsync always``, ``noeviction``, a
password (``requirepass``, and ``masterauth`` on every node since roles swap), and the
sentinels give it with ``sentinel auth-pass``; the sentinels themselves take no password.
"""

from __future__ import annotations

import contextlib
import shutil
import signal
import subprocess
import tempfile
from pathlib import Path

import redis

from tests.support import free_port, wait_until

MASTER = "mymaster"
PASSWORD = "sentinel-test-password"
#: A primary that does not answer for this long is "subjectively down" for a sentinel.
DOWN_AFTER_MS = 1000
#: Small, so a failover that stalls is retried soon; it also bounds the replicas' reconfiguration.
FAILOVER_TIMEOUT_MS = 4000


class Node:
    """One ``redis-server`` data node; ``kill()`` SIGKILLs it, ``start()`` brings it back on the
    same port with the same files and the same command line (as a restarted machine would)."""

    def __init__(self, name: str, root: Path, replica_of: int | None = None) -> None:
        self.name = name
        self.port = free_port()
        self.dir = root / name
        self.dir.mkdir()
        self.replica_of = replica_of
        self.proc: subprocess.Popen[bytes] | None = None

    def command(self) -> list[str]:
        cmd = ["redis-server", "--port", str(self.port), "--bind", "127.0.0.1",
               "--dir", str(self.dir), "--appendonly", "yes", "--appendfsync", "always",
               "--save", "", "--maxmemory-policy", "noeviction",
               "--requirepass", PASSWORD, "--masterauth", PASSWORD,
               "--logfile", str(self.dir / "redis.log"), "--loglevel", "notice"]
        if self.replica_of is not None:
            cmd += ["--replicaof", "127.0.0.1", str(self.replica_of)]
        return cmd

    def start(self) -> None:
        self.proc = subprocess.Popen(self.command(), stdout=subprocess.DEVNULL,
                                     stderr=subprocess.DEVNULL, start_new_session=True)
        wait_until(self.answers, 15, 0.05, what=f"{self.name} on port {self.port}")

    def client(self, **options: object) -> redis.Redis:
        return redis.Redis(port=self.port, password=PASSWORD, socket_timeout=5,
                           socket_connect_timeout=2, **options)  # type: ignore[arg-type]

    def answers(self) -> bool:
        try:
            with self.client() as c:
                return bool(c.ping())
        except (redis.RedisError, OSError):
            return False

    def role(self) -> str:
        with self.client() as c:
            return str(c.info("replication")["role"])

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(10)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.kill()


class SentinelSet:
    """A primary, ``replicas`` replicas of it and three sentinels (quorum 2) watching it.

    ``start()`` returns once the sentinels know the primary, its replicas and each other (only
    then can two of them agree on a failover and elect a leader).
    """

    def __init__(self, replicas: int = 1, sentinels: int = 3, quorum: int = 2) -> None:
        self.root = Path(tempfile.mkdtemp(prefix="relay-test-sentinel-"))
        self.primary = Node("redis-1", self.root)
        self.replicas = [Node(f"redis-{i + 2}", self.root, replica_of=self.primary.port)
                         for i in range(replicas)]
        self.nodes = [self.primary, *self.replicas]
        self.quorum = quorum
        self.sentinel_ports = [free_port() for _ in range(sentinels)]
        self.sentinel_procs: list[subprocess.Popen[bytes]] = []

    @property
    def hosts(self) -> list[str]:
        """``redis.sentinel.hosts`` of the hub's config."""
        return [f"127.0.0.1:{port}" for port in self.sentinel_ports]

    def _sentinel_conf(self, i: int, port: int) -> Path:
        # Sentinel rewrites its file as it learns (the other sentinels, the replicas, a new
        # primary), so each has its own, writable, in the temp dir.
        path = self.root / f"sentinel-{i + 1}.conf"
        path.write_text("\n".join([
            f"port {port}",
            "bind 127.0.0.1",
            f"dir {self.root}",
            f"logfile {self.root / f'sentinel-{i + 1}.log'}",
            f"sentinel monitor {MASTER} 127.0.0.1 {self.primary.port} {self.quorum}",
            f"sentinel down-after-milliseconds {MASTER} {DOWN_AFTER_MS}",
            f"sentinel failover-timeout {MASTER} {FAILOVER_TIMEOUT_MS}",
            f"sentinel parallel-syncs {MASTER} 1",
            f"sentinel auth-pass {MASTER} {PASSWORD}",
            "",
        ]))
        return path

    def start(self, timeout: float = 30.0) -> SentinelSet:
        for node in self.nodes:
            node.start()
        for i, port in enumerate(self.sentinel_ports):
            conf = self._sentinel_conf(i, port)
            self.sentinel_procs.append(subprocess.Popen(
                ["redis-server", str(conf), "--sentinel"], stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL, start_new_session=True))
        wait_until(self.ready, timeout, 0.2,
                   what="sentinels that know the primary, its replicas and each other")
        return self

    def sentinel(self, i: int = 0) -> redis.Redis:
        return redis.Redis(port=self.sentinel_ports[i], socket_timeout=2,
                           socket_connect_timeout=1, decode_responses=True)

    def ready(self) -> bool:
        """Every sentinel sees the primary up, every replica online and the other sentinels,
        and the primary has every replica in sync."""
        try:
            for i in range(len(self.sentinel_ports)):
                with self.sentinel(i) as s:
                    master = s.sentinel_master(MASTER)
                    if master["is_sdown"] or master["is_odown"]:
                        return False
                    if int(master["num-other-sentinels"]) < len(self.sentinel_ports) - 1:
                        return False
                    replicas = s.sentinel_slaves(MASTER)
                    online = [r for r in replicas
                              if r["master-link-status"] == "ok" and not r["is_sdown"]]
                    if len(online) < len(self.replicas):
                        return False
            return self.in_sync(self.master_node())
        except (redis.RedisError, OSError, KeyError):
            return False

    def master_port(self, i: int = 0) -> int | None:
        """The primary's port according to sentinel ``i`` (None if it does not answer)."""
        try:
            with self.sentinel(i) as s:
                addr = s.sentinel_get_master_addr_by_name(MASTER)
        except (redis.RedisError, OSError):
            return None
        return int(addr[1]) if addr else None

    def master_node(self) -> Node:
        port = self.master_port()
        for node in self.nodes:
            if node.port == port:
                return node
        raise AssertionError(f"the sentinels name port {port}, not one of the set's nodes")

    def in_sync(self, master: Node, replicas: int | None = None) -> bool:
        """``master`` is a primary with at least ``replicas`` (default: all others) replicas
        online and caught up with its replication offset."""
        want = len(self.nodes) - 1 if replicas is None else replicas
        try:
            with master.client() as c:
                info = c.info("replication")
        except (redis.RedisError, OSError):
            return False
        if info.get("role") != "master":
            return False
        offset = int(info.get("master_repl_offset", 0))
        online = [v for k, v in info.items() if k.startswith("slave") and isinstance(v, dict)
                  and v.get("state") == "online" and int(v.get("offset", -1)) >= offset]
        return len(online) >= want

    def wait_new_master(self, old_port: int, timeout: float = 30.0) -> Node:
        """Wait until a majority of the sentinels name a primary other than ``old_port``, and
        that node says it is one."""

        def moved() -> Node | None:
            ports = [self.master_port(i) for i in range(len(self.sentinel_ports))]
            new = [p for p in ports if p is not None and p != old_port]
            if len(new) <= len(ports) // 2:
                return None
            node = self.master_node()
            try:
                return node if node.port != old_port and node.role() == "master" else None
            except (redis.RedisError, OSError):
                return None

        return wait_until(moved, timeout, 0.05, what=f"a new primary instead of port {old_port}")

    def cleanup(self) -> None:
        for proc in self.sentinel_procs:
            if proc.poll() is None:
                proc.terminate()
        for proc in self.sentinel_procs:
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(10)
            if proc.poll() is None:
                proc.kill()
                proc.wait(5)
        for node in self.nodes:
            node.stop()
        shutil.rmtree(self.root, ignore_errors=True)

