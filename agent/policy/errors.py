"""The one error the policy engine raises: a policy set that cannot be compiled (the relay NACKs it)."""


class PolicyError(ValueError):
    """An invalid policy set; the message names the policy and the reason. The previous set stays."""
