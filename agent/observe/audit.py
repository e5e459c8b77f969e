"""The agent's audit log. It lives in api.jsonlog because the management plane writes one too (joins,
CSRs) and mgmt/ must not depend on agent/."""

from api.jsonlog import AuditLog

__all__ = ["AuditLog"]
