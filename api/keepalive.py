"""One keepalive policy for the relay's two ends, so the node's pings and the plane's ping policy agree.

A node pings its relay stream to notice a silently dead plane (a partition without RST); the plane answers
pings that come sooner than its minimum interval with a strike, and after `max_ping_strikes` strikes it ends
the connection with GOAWAY ENHANCE_YOUR_CALM "too_many_pings". Both sides are derived from one
`interval_ms` here, so changing one cannot break the other.

gRPC core channel-argument names (grpc/impl/channel_arg_names.h) are not what their C macros suggest:
the server's minimum receive interval is "grpc.http2.min_ping_interval_without_data_ms"
(GRPC_ARG_HTTP2_MIN_RECV_PING_INTERVAL_WITHOUT_DATA_MS). An unknown argument is silently ignored, so a
misspelt one leaves the 5-minute default in force: 30 s pings then strike out in 3 minutes.
"""

from __future__ import annotations

from dataclasses import dataclass

GrpcOptions = list[tuple[str, int]]


@dataclass(frozen=True)
class Keepalive:
    interval_ms: int = 30_000  # the node pings this often while its stream is idle
    timeout_ms: int = 10_000  # a ping unanswered this long means the peer is gone
    max_ping_strikes: int = 2  # pings sooner than the plane allows, tolerated before GOAWAY

    def client_options(self) -> GrpcOptions:
        return [
            ("grpc.keepalive_time_ms", self.interval_ms),
            ("grpc.keepalive_timeout_ms", self.timeout_ms),
            ("grpc.keepalive_permit_without_calls", 1),  # the Lookup channel may be between calls
            # Without this, after 2 pings with no data the client throttles itself to one ping a minute.
            ("grpc.http2.max_pings_without_data", 0),
        ]

    def server_options(self) -> GrpcOptions:
        return [
            ("grpc.keepalive_permit_without_calls", 1),
            # Half the client's interval: timer jitter and a ping right after a data frame never strike.
            ("grpc.http2.min_ping_interval_without_data_ms", self.interval_ms // 2),
            ("grpc.http2.max_ping_strikes", self.max_ping_strikes),
            # The plane pings too, to notice dead nodes' streams (it holds a worker thread for each).
            ("grpc.keepalive_time_ms", 2 * self.interval_ms),
            ("grpc.keepalive_timeout_ms", 2 * self.timeout_ms),
        ]


RELAY_KEEPALIVE = Keepalive()
