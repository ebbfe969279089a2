"""Prometheus metrics of one server, in its own registry (several servers can share a process)."""

from __future__ import annotations

from collections.abc import Callable, Mapping

import orjson

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

# Release → sink success, from a few ms (small studies) to minutes (a FHIR server that was down).
_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300, 900, 3600)


class Metrics:
    """The counters, gauges and histograms the server updates as it works."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.associations = Counter("imagingstudy_scp_associations", "Associations requested, by outcome",
                                    ["outcome"], registry=r)
        self.instances = Counter("imagingstudy_scp_instances_stored", "Instances stored (C-STORE success)",
                                 registry=r)
        self.bytes = Counter("imagingstudy_scp_bytes_stored", "Bytes of stored instance files", registry=r)
        self.store_failures = Counter("imagingstudy_scp_store_failures", "C-STORE failures, by DIMSE status",
                                      ["status"], registry=r)
        self.duplicates = Counter("imagingstudy_scp_duplicates", "Instances received again (same SOP Instance "
                                  "UID), by whether the content was identical", ["identical"], registry=r)
        self.publication_latency = Histogram(
            "imagingstudy_scp_publication_latency_seconds",
            "From the end of an association to a sink's success, per study and sink", ["sink"],
            buckets=_LATENCY_BUCKETS, registry=r)
        self.publications = Counter("imagingstudy_scp_publications", "Publications, by sink and result",
                                    ["sink", "result"], registry=r)
        self.queue_depth = Gauge("imagingstudy_scp_outbox_depth", "Studies waiting to be published",
                                 registry=r)
        self.queue_oldest = Gauge("imagingstudy_scp_outbox_oldest_age_seconds",
                                  "Age of the oldest study waiting to be published (0 when none)", registry=r)
        self.outbox_dead = Gauge("imagingstudy_scp_outbox_dead", "Publications a sink refused for good "
                                 "(dead-lettered until `imagingstudy-scp outbox retry`)", registry=r)

        # what receiver processes count (scp.workers), by family name: their increments are added here
        self._receiving_counters = {family.name: counter for counter in (
            self.associations, self.instances, self.bytes, self.store_failures, self.duplicates)
            for family in counter.collect()}

    def counter_values(self) -> dict[str, float]:
        """Every counter's value, keyed by name and labels: what a receiver process reports to the server."""
        values: dict[str, float] = {}
        for family in self.registry.collect():
            if family.type == "counter":
                for sample in family.samples:
                    if sample.name.endswith("_total"):
                        values[orjson.dumps([family.name, sample.labels]).decode()] = sample.value
        return values

    def add_counts(self, increments: Mapping[str, float]) -> None:
        """Add increments keyed as :meth:`counter_values` keys them (a receiver process's, to the server's)."""
        for key, amount in increments.items():
            name, labels = orjson.loads(key)
            counter = self._receiving_counters.get(name)
            if counter is not None and amount > 0:
                (counter.labels(**labels) if labels else counter).inc(amount)

    def track_queue(self, depth: Callable[[], int], oldest_age: Callable[[], float]) -> None:
        """Read the publication queue's depth and oldest age at scrape time."""
        self.queue_depth.set_function(lambda: float(depth()))
        self.queue_oldest.set_function(oldest_age)

    def exposition(self) -> bytes:
        """The Prometheus text format of every metric."""
        return generate_latest(self.registry)
