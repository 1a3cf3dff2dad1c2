"""Prometheus metrics (prometheus-client), one registry per broker, served at ``/metrics``
when ``metrics.enabled`` (see ``web.metrics``).

    broker_refreshes_total{integration, outcome}     refreshed, recovered, transient,
                                                     reauth, operator, rejected
    broker_refresh_duration_seconds{integration}     the token request, success or not
    broker_credential_reads_total{source}            cache, store
    broker_proxy_requests_total{integration, status} the upstream status, or the broker's
                                                     error code when there was no answer
    broker_proxy_request_duration_seconds{integration}
    broker_webhook_deliveries_total{outcome}         delivered, retry, failed
    broker_events_pruned_total
    broker_connections{integration, status}          shown status (overview), at each scrape
    broker_connections_overdue                       connected rows whose next refresh is
                                                     more than one sweep interval past: the
                                                     sweep's lag (alert on > 0 for 5 minutes)

No label holds a group id, a credential or anything a user typed: integrations are the
operator's names, statuses and outcomes fixed words.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from datetime import datetime, timedelta
from typing import TYPE_CHECKING

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector
from sqlalchemy import func, select

from .store.models import Connection

if TYPE_CHECKING:
    from .store.database import Database

__all__ = ["Metrics"]

_DURATIONS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)


class Metrics:
    """The broker's counters and histograms, and the scrape that adds the database's
    gauges."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.refreshes = Counter(
            "broker_refreshes", "Token renewals by outcome.", ["integration", "outcome"],
            registry=r)
        self.refresh_seconds = Histogram(
            "broker_refresh_duration_seconds", "Token renewal requests, seconds.",
            ["integration"], buckets=_DURATIONS, registry=r)
        self.credential_reads = Counter(
            "broker_credential_reads", "Credentials handed out, by where they came from.",
            ["source"], registry=r)
        # The hot path's two children, bound once (``labels()`` costs a lock and a lookup).
        self.reads_from_cache = self.credential_reads.labels("cache")
        self.reads_from_store = self.credential_reads.labels("store")
        self.proxy_requests = Counter(
            "broker_proxy_requests", "Proxied provider API calls by upstream status.",
            ["integration", "status"], registry=r)
        self.proxy_seconds = Histogram(
            "broker_proxy_request_duration_seconds",
            "Proxied calls, seconds until the provider's answer began.", ["integration"],
            buckets=_DURATIONS, registry=r)
        self.webhook_deliveries = Counter(
            "broker_webhook_deliveries", "Webhook delivery attempts by outcome.", ["outcome"],
            registry=r)
        self.events_pruned = Counter(
            "broker_events_pruned", "Events deleted by retention.", registry=r)

    async def scrape(self, database: Database, *, now: datetime, interval: float) -> bytes:
        """The text exposition: the counters, and gauges read from ``database`` now."""
        from .overview import counts_by_status

        async with database.session() as db:
            by_status = await counts_by_status(db, now=now)
            overdue = int(await db.scalar(
                select(func.count()).select_from(Connection).where(
                    Connection.status == "connected",
                    Connection.next_refresh_at < now - timedelta(seconds=interval),
                )
            ) or 0)
        connections = GaugeMetricFamily(
            "broker_connections", "Connections by integration and status.",
            labels=["integration", "status"])
        for integration, per in by_status.items():
            for status, count in per.items():
                connections.add_metric([integration, status], count)
        lag = GaugeMetricFamily(
            "broker_connections_overdue",
            "Connected rows whose next refresh is more than one sweep interval past.",
            value=overdue)
        gauges = CollectorRegistry(auto_describe=False)
        gauges.register(_Fixed([connections, lag]))
        return generate_latest(self.registry) + generate_latest(gauges)


class _Fixed(Collector):
    def __init__(self, families: Iterable[Metric]) -> None:
        self._families = list(families)

    def collect(self) -> Iterator[Metric]:
        return iter(self._families)
