"""The agent side of the configuration relay (see client.py and docs/relay.md)."""
