"""ambit node agent."""
