"""Node and workload identities: bootstrap with a join token, SVIDs from the plane's CA, rotation, bundles."""
