"""The document forms both config sources accept before `api.resources.parse` sees them.

What `kubectl get -o yaml` (or the API server) adds to an object is server-owned state, not configuration:
`status`, and metadata such as uid, resourceVersion, creationTimestamp and managedFields. It is dropped here,
once, so a document saved from a cluster applies unchanged and hashes the same as the hand-written one
(the plane's version does not move when only a resourceVersion did). `kind: List` (what `kubectl get` prints
for several objects) is expanded into its items.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from api.resources import KINDS

# Set by the API server, never by the author of the object.
SERVER_METADATA = frozenset(
    {
        "uid",
        "resourceVersion",
        "generation",
        "creationTimestamp",
        "deletionTimestamp",
        "deletionGracePeriodSeconds",
        "managedFields",
        "selfLink",
        "ownerReferences",
        "finalizers",
        "generateName",
    }
)
# kubectl's copy of the whole object as last applied: large, and never configuration of its own.
LAST_APPLIED = "kubectl.kubernetes.io/last-applied-configuration"


def is_list(doc: Any) -> bool:
    return (
        isinstance(doc, dict)
        and isinstance(doc.get("kind"), str)
        and doc["kind"].endswith("List")
        and doc["kind"][: -len("List")] not in KINDS
        and isinstance(doc.get("items"), list)
    )


def normalized(doc: Any) -> Any:
    """`doc` without server-owned fields (a new dict; the input is left alone). Non-mappings pass through
    for the parser to reject with its own message."""
    if not isinstance(doc, dict):
        return doc
    out = {k: v for k, v in doc.items() if k != "status"}
    md = out.get("metadata")
    if isinstance(md, Mapping):
        md = {k: v for k, v in md.items() if k not in SERVER_METADATA}
        annotations = md.get("annotations")
        if isinstance(annotations, Mapping):
            kept = {k: v for k, v in annotations.items() if k != LAST_APPLIED}
            if kept:
                md["annotations"] = kept
            else:
                md.pop("annotations")
        out["metadata"] = md
    # A Namespace's only spec field is the server's finalizer list.
    if out.get("kind") == "Namespace" and isinstance(out.get("spec"), Mapping):
        spec = {k: v for k, v in out["spec"].items() if k != "finalizers"}
        if spec:
            out["spec"] = spec
        else:
            out.pop("spec")
    return out


def key_hint(doc: Any) -> str:
    """`Kind/namespace/name` of a document that may be invalid ("" if it does not say), to keep the last
    good version of that object in force."""
    if not isinstance(doc, Mapping):
        return ""
    kind, md = doc.get("kind"), doc.get("metadata")
    if not isinstance(kind, str) or not isinstance(md, Mapping) or not isinstance(md.get("name"), str):
        return ""
    info = KINDS.get(kind)
    namespace = md.get("namespace")
    if not isinstance(namespace, str) or not namespace:
        namespace = "default" if info is not None and info.namespaced else ""
    return f"{kind}/{namespace}/{md['name']}" if namespace else f"{kind}/{md['name']}"
