"""ambit management plane: config store, node-scoped pull relay, certificate authority."""
