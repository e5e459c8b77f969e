"""Packet and socket marks shared by the BPF programs, the routing rule and the proxy's sockets.

The routing mark (set by tc on packets it assigns to an agent socket) and the agent's socket mark (set with
SO_MARK on every socket the agent originates, so BPF never re-captures them) live in separate bits; the ip
rule matches only ROUTE_MASK, so the socket mark can never select the local-delivery table by accident.
"""

ROUTE_MARK = 0x100
ROUTE_MASK = 0xFFF
ROUTE_TABLE = 100
AGENT_SOCKET_MARK = 0x539000  # outside ROUTE_MASK on purpose

OUTBOUND_PORT = 15001
INBOUND_PLAINTEXT_PORT = 15006
HBONE_PORT = 15008
