"""Prometheus metrics: events appended, each projection's position and lag, a read replica's lag.

Projection figures come from the database at scrape time (any process may run the workers), so
the handler fetches them and a collector of this app's own registry reports them.
"""

from __future__ import annotations

from collections.abc import Iterator

from prometheus_client import CollectorRegistry
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from projections.worker import ProjectionStatus
from service.eventstore import EventStore
from service.replicas import ReplicaStatus


class ChatlogCollector(Collector):
    def __init__(self) -> None:
        self.store: EventStore | None = None  # set once the app has started
        self.projections: dict[str, ProjectionStatus] = {}
        self.horizon_held_seconds = 0.0
        self.replica: ReplicaStatus | None = None  # with a read replica, as of the last scrape

    def collect(self) -> Iterator[Metric]:
        appended = self.store.appended_events if self.store is not None else 0
        yield CounterMetricFamily("chatlog_events_appended", "Events appended by this process", value=appended)
        gauges = {
            "position": GaugeMetricFamily(
                "chatlog_projection_position", "Log position of the projection's checkpoint", labels=["projection"]
            ),
            "lag": GaugeMetricFamily(
                "chatlog_projection_lag_events", "Events in the log after the checkpoint", labels=["projection"]
            ),
            "lag_seconds": GaugeMetricFamily(
                "chatlog_projection_lag_seconds", "Age of the oldest event not yet applied", labels=["projection"]
            ),
            "failed": GaugeMetricFamily(
                "chatlog_projection_failed", "1 when the projection stopped on an event", labels=["projection"]
            ),
        }
        for name, status in self.projections.items():
            gauges["position"].add_metric([name], status.position)
            gauges["lag"].add_metric([name], status.lag)
            gauges["lag_seconds"].add_metric([name], status.lag_seconds)
            gauges["failed"].add_metric([name], 1.0 if status.status == "failed" else 0.0)
        yield from gauges.values()
        yield GaugeMetricFamily(
            "chatlog_horizon_held_seconds",
            "Age of the oldest transaction on the server that holds the projections back (0: none)",
            value=self.horizon_held_seconds,
        )
        if self.replica is not None:
            up = 1.0 if self.replica.status == "ok" else 0.0
            yield GaugeMetricFamily("chatlog_replica_up", "1 when the read replica answers", value=up)
            if self.replica.lag_bytes is not None:
                yield GaugeMetricFamily(
                    "chatlog_replica_lag_bytes",
                    "WAL written on the primary that the read replica has not replayed",
                    value=self.replica.lag_bytes,
                )
            if self.replica.lag_seconds is not None:
                yield GaugeMetricFamily(
                    "chatlog_replica_lag_seconds",
                    "Age of the read replica's last replayed commit while WAL is still to replay (0: none)",
                    value=self.replica.lag_seconds,
                )


def make_registry() -> tuple[CollectorRegistry, ChatlogCollector]:
    """A registry of this app's own (tests build several apps in one process)."""
    registry = CollectorRegistry(auto_describe=False)
    collector = ChatlogCollector()
    registry.register(collector)
    return registry, collector
