"""The gateway's Prometheus metrics. Request counts per route and WAF action are kept in C (no Python per
request) and read at scrape time; per-rule counts come from the WAF events (blocked and detected requests
only: a rule that matched below the threshold on a blocking route is not counted)."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping

from prometheus_client import CollectorRegistry, Counter
from prometheus_client.core import CounterMetricFamily, Metric
from prometheus_client.registry import Collector

from gateway.dataplane import ACTIONS


class _DataplaneCollector(Collector):
    def __init__(
        self,
        route_stats: Callable[[], Mapping[str, Mapping[str, int]]],
        counters: Callable[[], Mapping[str, int]],
    ) -> None:
        self._route_stats = route_stats
        self._counters = counters

    def collect(self) -> Iterable[Metric]:
        waf = CounterMetricFamily(
            "ambit_waf_requests",
            "Requests by route and action: allowed, blocked, detected (detect-only), error, "
            "refused (broke HTTP or a limit)",
            labels=["action", "route"],
        )
        for route, stats in sorted(self._route_stats().items()):
            for action in ACTIONS:
                waf.add_metric([action, route], stats.get(action, 0))
        yield waf
        for name, value in sorted(self._counters().items()):
            if name != "conns_active":
                yield CounterMetricFamily(f"ambit_gateway_{name}", f"gateway data plane: {name}", value=value)


class GatewayMetrics:
    def __init__(
        self,
        route_stats: Callable[[], Mapping[str, Mapping[str, int]]],
        counters: Callable[[], Mapping[str, int]],
    ) -> None:
        self.registry = CollectorRegistry()
        self.registry.register(_DataplaneCollector(route_stats, counters))
        self.rule_matches = Counter(
            "ambit_waf_rule_matches",
            "CRS/custom rule matches on blocked or detected requests",
            ["rule", "route", "action"],
            registry=self.registry,
        )
        self.audit_errors = Counter(
            "ambit_gateway_audit_dropped",
            "WAF events lost before Python saw them (event queue full)",
            registry=self.registry,
        )
