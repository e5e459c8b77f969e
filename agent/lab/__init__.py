"""The netns lab: nodes and pods as network namespaces on one Linux machine (ambit's embedded default)."""
