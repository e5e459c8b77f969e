"""The strict parser of the CONNECT's `forwarded` header (RFC 7239): one for=<ip>[:port] (our engine's and
ztunnel's forms) and at most one host= (ztunnel's), nothing else."""

from __future__ import annotations

import pytest

from agent.proxy.forwarded import (
    Belief,
    Forwarded,
    ForwardedError,
    believe,
    parse_forwarded,
    parse_forwarded_for,
)
from agent.state import MeshSnapshot
from api.resources import Meta
from api.resources.workload import Namespace, Node, Workload
from api.spiffe import SpiffeId
from native.engine import EngineError, forwarded_for


@pytest.mark.parametrize(
    "value,ip",
    [
        ("", None),
        ("for=10.244.1.2", "10.244.1.2"),
        ('for="10.244.1.2"', "10.244.1.2"),
        ("For=10.244.1.2", "10.244.1.2"),
        (' for="[fd00:0:0::2]" ', "fd00::2"),
        ('for="10.244.1.2:43210"', "10.244.1.2"),  # ztunnel: for="<source ip:port>"
        ('for="[fd00::2]:43210"', "fd00::2"),
        ('for="10.244.1.2:1"', "10.244.1.2"),
        ('for="10.244.1.2:65535"', "10.244.1.2"),
        ('for="10.244.1.2:43210";host=reviews.bookinfo.svc.cluster.local', "10.244.1.2"),  # ztunnel via a VIP
        ('host="reviews.bookinfo.svc.cluster.local:9080";For="[fd00::2]:1"', "fd00::2"),
        ('FOR="10.244.1.2"', "10.244.1.2"),
        ('for="[::ffff:10.244.1.2]:80"', "10.244.1.2"),  # IPv4-mapped: the IPv4 address (ipBlocks)
        ('for="10.244.1.2:80";host=*.example.com', "10.244.1.2"),
    ],
)
def test_accepted(value: str, ip: str | None) -> None:
    assert parse_forwarded_for(value) == ip


@pytest.mark.parametrize(
    "value,claim",
    [
        ("for=10.244.1.2", Forwarded("10.244.1.2")),
        ('for="[fd00::2]:80"', Forwarded("fd00::2", 80)),
        ('for="10.244.1.2:43210";host=web.shop', Forwarded("10.244.1.2", 43210, "web.shop")),
    ],
)
def test_claim_fields(value: str, claim: Forwarded) -> None:
    assert parse_forwarded(value) == claim


@pytest.mark.parametrize(
    "value",
    [
        "for=10.244.1.2, for=10.244.1.3",  # a list: which hop?
        "for=10.244.1.2;by=10.0.0.1",  # other parameters
        "by=10.244.1.2",
        "for=10.244.1.2:8080",  # a port needs the quoted-string (":" is not a token character)
        'for="10.244.1.2:0"',
        'for="10.244.1.2:65536"',
        'for="10.244.1.2:080"',  # leading zero
        'for="10.244.1.2:"',
        'for="10.244.1.2:_obf"',  # obfuscated port
        'for="10.244.1.2:80:81"',
        'for="10.244.1.2:+80"',
        'for="[fd00::2]:"',
        'for="[fd00::2]x"',
        'for="[fd00::2]:0"',
        'for="[fd00::2"',
        'for="fd00::2:80"',  # IPv6 with a port, unbracketed
        'for="[10.244.1.2]:80"',
        'for="[fe80::1%eth0]:80"',
        'for="127.0.0.1:80"',
        'for="[::1]:80"',
        'for="[::ffff:127.0.0.1]"',
        "for=10.244.1.2;host=*",
        "for=10.244.1.2;for=10.244.1.3",  # two claims
        "for=10.244.1.2;host=a;host=b",
        "for=10.244.1.2;",  # empty pair
        ";for=10.244.1.2",
        "for=10.244.1.2;;host=a",
        "for=10.244.1.2;proto=https",  # other RFC 7239 parameters are not accepted
        "for=10.244.1.2;x=y",
        "host=web.shop",  # no for
        "for=10.244.1.2; host=web.shop",  # whitespace around ";"
        'for=10.244.1.2;host="web shop"',
        "for=10.244.1.2;host=-web",
        'for=10.244.1.2;host="web.shop:0"',
        'for=10.244.1.2;host="[fd00::1]"',
        'for="10.244.1.2";host=web\\x',
        'for="_hidden:80"',
        'for="unknown"',
        'for=""',
        "for=[fd00::2]",  # IPv6 must be quoted
        'for="fd00::2"',  # ... and bracketed
        'for="[10.244.1.2]"',
        "for=unknown",
        "for=_hidden",
        "for=010.244.1.2",  # leading zeros: ambiguous (octal)
        "for=10.244.1",
        'for="[fe80::1%eth0]"',
        "for=127.0.0.1",
        "for=0.0.0.0",
        "for=224.0.0.1",
        'for="[::1]"',
        "for =10.244.1.2",
        "for= 10.244.1.2",
        'for="10.244.1.2',
        'for="10.244.1.2\\"',
        "for=10.244.1.2\r\nx: y",
        "for=١٠.244.1.2",  # non-ASCII digits
        "for=10.244.1.2" + " " * 300,
        "x" * 1000,
        " invalid (repeated or too long)",  # the engine's marker
        "for=",
        "=",
    ],
)
def test_refused(value: str) -> None:
    for _ in range(2):  # the address verdicts are cached: a refusal stays a refusal the second time
        with pytest.raises(ForwardedError):
            parse_forwarded_for(value)


def test_cached_address_verdicts_keep_the_claims_own_port_and_text() -> None:
    assert parse_forwarded('for="10.1.2.3:40000"') == Forwarded("10.1.2.3", 40000)
    assert parse_forwarded('for="10.1.2.3:40001"') == Forwarded("10.1.2.3", 40001)  # same address, cached
    assert parse_forwarded('for="[::ffff:10.1.2.3]:7"') == Forwarded("10.1.2.3", 7)
    for value, why in (('for="[::1]:7"', "::1 cannot be a pod"), ('for="[10.1.2.3]"', "must be bracketed")):
        for _ in range(2):
            with pytest.raises(ForwardedError, match=why):
                parse_forwarded(value)


def test_what_the_engine_sends_parses_back() -> None:
    for ip in ("10.244.1.2", "fd00::2", "2001:db8:cafe::17"):
        assert parse_forwarded_for(forwarded_for(ip).decode()) == ip
    assert forwarded_for("fd00::2") == b'for="[fd00::2]"'
    for ip, port in (("10.244.1.2", 40123), ("fd00::2", 1)):  # with the client's port: ip and port back
        assert parse_forwarded(forwarded_for(ip, port).decode()) == Forwarded(ip, port)
    for bad in ("10.244.1.256", "fe80::1%eth0", "node-1", ""):
        with pytest.raises(EngineError):
            forwarded_for(bad)


def _view() -> MeshSnapshot:
    ns = Namespace(Meta(name="app"))
    pods = [
        Workload(Meta(name="a", namespace="app"), "sa-a", "node-1", ("10.244.1.2",)),
        Workload(Meta(name="b", namespace="app"), "sa-b", "node-1", ("10.244.1.3",)),
        # A hostNetwork workload shares its node's address: that address is still nobody's alone.
        Workload(Meta(name="h", namespace="app"), "sa-a", "node-1", ("172.30.0.1",)),
    ]
    nodes = [Node(Meta(name="node-1"), ("172.30.0.1",))]
    return MeshSnapshot.from_objects(1, "cluster.local", "node-2", [ns, *pods, *nodes])


A = "spiffe://cluster.local/ns/app/sa/sa-a"


@pytest.mark.parametrize(
    "ip,peer,belief,workload",
    [
        ("10.244.1.2", A, Belief.BELIEVED, "app/a"),  # its own pod
        ("10.244.1.3", A, Belief.OTHER_IDENTITY, "app/b"),  # another identity's pod
        ("10.244.9.9", A, Belief.UNKNOWN, None),  # nobody known there: never believed
        ("172.30.0.1", A, Belief.NODE_ADDRESS, None),  # a node's address, even with a workload on it
        ("10.244.9.9", "spiffe://cluster.local/node/node-1", Belief.UNKNOWN, None),
        ("10.244.1.2", "spiffe://other.td/ns/app/sa/sa-a", Belief.OTHER_IDENTITY, "app/a"),
    ],
)
def test_a_claim_is_believed_only_for_a_workload_of_exactly_the_peers_identity(
    ip: str, peer: str, belief: Belief, workload: str | None
) -> None:
    got, known = believe(ip, SpiffeId.parse(peer), _view())
    assert got is belief
    assert (known.uid if known else None) == workload


def test_hostile_values_only_ever_raise_forwarded_error() -> None:
    """Mutations of valid headers (seeded: reproducible) give a claim or ForwardedError, nothing else."""
    import random

    rng = random.Random(7239)
    seeds = ['for="10.244.1.2:43210";host=web.shop', 'for="[fd00::2]:80"', "for=10.244.1.2"]
    alphabet = '";=:[],%_\\ \t.0123456789abcdef:xXforhst*-/'
    for _ in range(3000):
        chars = list(rng.choice(seeds))
        for _ in range(rng.randint(1, 4)):
            at = rng.randrange(len(chars) + 1)
            op = rng.randrange(3)
            if op == 0:
                chars.insert(at, rng.choice(alphabet))
            elif chars and op == 1:
                del chars[min(at, len(chars) - 1)]
            elif chars:
                chars[min(at, len(chars) - 1)] = rng.choice(alphabet)
        value = "".join(chars)
        try:
            claim = parse_forwarded(value)
        except ForwardedError:
            continue
        assert claim is None or isinstance(claim, Forwarded)
