"""The node proxy: outbound capture (15001), HBONE (15008) and plaintext inbound (15006) listeners.

Python decides (lookups, identities, policy) and hands sockets to the native engine, which moves the bytes.
"""
