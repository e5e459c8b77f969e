"""What the node agent tells operators: Prometheus metrics, access and audit logs, metrics/readiness HTTP."""
