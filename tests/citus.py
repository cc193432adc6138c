"""A 3-node Citus cluster that a test module makes (a coordinator and two workers, each a cluster
of tests/clusters.py with Citus preloaded), and its databases.

Citus is not in Debian's archive: `.ci/run` builds it from ../shared/citus when it is missing.
Without it the Citus tests skip, unless CHATLOG_TEST_REQUIRE_CITUS=1 (CI), where they fail.

A Citus database is one database of the same name on every node, each with the extension, and
the workers registered in the coordinator's. Making one costs seconds, so the cluster migrates
(and so distributes) one template, and each fresh database is a copy of it on every node, made
side by side: the copies' metadata and shards match as the template's did.
"""

from __future__ import annotations

import os
import subprocess
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from tests.clusters import Cluster, require_pg_bin

SHARD_COUNT = 8  # per distributed table: enough for two workers, quick to make


def require_citus() -> Path:
    """The server binaries, if Citus is installed beside them; else skip (or fail on CI)."""
    bin_dir = require_pg_bin()
    libdir = subprocess.run(
        [str(bin_dir / "pg_config"), "--pkglibdir"], capture_output=True, text=True, check=False
    ).stdout.strip()
    if not (Path(libdir) / "citus.so").exists():
        reason = f"Citus is not installed in {libdir}: run ../shared/citus/build.sh (as root)"
        if os.environ.get("CHATLOG_TEST_REQUIRE_CITUS") == "1":
            pytest.fail(reason)
        pytest.skip(reason)
    return bin_dir


class CitusCluster:
    def __init__(self, bin_dir: Path) -> None:
        self.coordinator, *self.workers = self.nodes = [Cluster(bin_dir) for _ in range(3)]
        self.template: str | None = None
        self.made: list[str] = []

    def start(self) -> CitusCluster:
        def up(node: Cluster) -> None:
            node.init()
            with (node.data / "postgresql.conf").open("a") as conf:
                conf.write("shared_preload_libraries = 'citus'\nmax_prepared_transactions = 100\n")
            node.start()

        with ThreadPoolExecutor(3) as pool:
            list(pool.map(up, self.nodes))
        return self

    def destroy(self) -> None:
        for node in self.nodes:
            node.destroy()

    def url(self, database: str) -> str:
        """The coordinator's database, in the form chatlog (and conftest) use."""
        from service.settings import database_url

        return database_url(self.coordinator.url(database))

    def _on_all(self, sql: str, database: str = "postgres") -> None:
        with ThreadPoolExecutor(3) as pool:
            list(pool.map(lambda node: node.psql(sql, database), self.nodes))

    def create_bare(self) -> str:
        """A new Citus database with the extension on every node and the workers registered."""
        name = f"citus_{uuid.uuid4().hex[:10]}"
        self._on_all(f"CREATE DATABASE {name}")
        self._on_all("CREATE EXTENSION citus", name)
        self.coordinator.psql(
            f"ALTER DATABASE {name} SET citus.shard_count = {SHARD_COUNT}; "
            f"SELECT citus_set_coordinator_host('127.0.0.1', {self.coordinator.port}); "
            + "; ".join(f"SELECT citus_add_node('127.0.0.1', {w.port})" for w in self.workers),
            name,
        )
        self.made.append(name)
        return name

    def copy(self, template: str) -> str:
        """A copy of `template` on every node (which then takes no more connections)."""
        name = f"citus_{uuid.uuid4().hex[:10]}"
        self._on_all(
            f"ALTER DATABASE {template} ALLOW_CONNECTIONS false; "
            f"SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity WHERE datname = '{template}'"
        )
        self._on_all(f"CREATE DATABASE {name} TEMPLATE {template}")
        self.made.append(name)
        return name

    def placements(self, database: str) -> dict[int, set[str]]:
        """Worker port -> the users whose events it holds."""
        out = self.coordinator.psql(
            "SELECT p.nodeport, e.user_id FROM (SELECT DISTINCT user_id FROM events) AS e "
            "JOIN pg_dist_shard_placement AS p "
            "ON p.shardid = get_shard_id_for_distribution_column('events', e.user_id)",
            database,
        )
        found: dict[int, set[str]] = {}
        for line in out.splitlines():
            port, user = line.split("|", 1)
            found.setdefault(int(port), set()).add(user)
        return found


class CitusDatabases:
    """conftest's `Databases` on a Citus cluster: `fresh()` is a migrated, distributed, empty database."""

    def __init__(self, cluster: CitusCluster) -> None:
        self.cluster = cluster
        self.server_url = cluster.url("postgres")
        self.template: str | None = None

    async def create(self, template: str | None = None) -> str:
        return self.cluster.url(self.cluster.copy(template) if template else self.cluster.create_bare())

    async def fresh(self) -> str:
        from service.database import make_engine, migrate

        if self.template is None:
            name = self.cluster.create_bare()
            engine = make_engine(self.cluster.url(name), pool_size=1)
            await migrate(engine)
            await engine.dispose()
            self.template = name
        return self.cluster.url(self.cluster.copy(self.template))

    async def drop_all(self) -> None:
        """Nothing: the cluster goes with its folders."""
