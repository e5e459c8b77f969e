"""Kubernetes-style resources (apiVersion/kind/metadata/spec) turned into typed, validated domain objects.

Every kind registers one parser here; the config store and the agent both parse through `parse`, so the
rest of the code never handles raw YAML dicts. Unknown fields are errors, not ignored.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol


class ResourceError(ValueError):
    """A document that is not a valid resource; `where` names the file/line or the wire object."""

    def __init__(self, reason: str, where: str = "") -> None:
        super().__init__(f"{where}: {reason}" if where else reason)
        self.reason = reason
        self.where = where


@dataclass(frozen=True)
class Meta:
    name: str
    namespace: str = ""
    labels: Mapping[str, str] = field(default_factory=dict)
    annotations: Mapping[str, str] = field(default_factory=dict)  # e.g. Istio's istio.io/dry-run


class Resource(Protocol):
    kind: str
    meta: Meta


@dataclass(frozen=True)
class ResourceKey:
    kind: str
    namespace: str
    name: str

    def __str__(self) -> str:
        return f"{self.kind}/{self.namespace}/{self.name}" if self.namespace else f"{self.kind}/{self.name}"


Parser = Callable[[Meta, Mapping[str, Any]], Any]


@dataclass(frozen=True)
class KindInfo:
    kind: str
    api_versions: frozenset[str]
    namespaced: bool
    parse_spec: Parser
    # Core kinds that keep their content beside metadata rather than under spec (a Secret's type and data):
    # these top-level fields are handed to parse_spec as its "spec", and spec itself is not allowed.
    top_level: frozenset[str] = frozenset()


KINDS: dict[str, KindInfo] = {}


def register(
    kind: str, api_versions: set[str], namespaced: bool = True, top_level: frozenset[str] = frozenset()
) -> Callable[[Parser], Parser]:
    def deco(fn: Parser) -> Parser:
        KINDS[kind] = KindInfo(kind, frozenset(api_versions), namespaced, fn, top_level)
        return fn

    return deco


def key_of(res: Resource) -> ResourceKey:
    return ResourceKey(res.kind, res.meta.namespace, res.meta.name)


def _labels(raw: Any, where: str, name: str = "labels") -> dict[str, str]:
    if raw is None:
        return {}
    if not isinstance(raw, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in raw.items()
    ):
        raise ResourceError(f"metadata.{name} must be a map of strings", where)
    return dict(raw)


def parse(doc: Any, where: str = "") -> Any:
    """Parse one document into its domain object, or raise ResourceError naming `where` and the reason."""
    if not isinstance(doc, dict):
        raise ResourceError("document is not a mapping", where)
    kind = doc.get("kind")
    if kind not in KINDS:
        known = ", ".join(sorted(KINDS))
        raise ResourceError(f"unknown kind {kind!r} (known: {known})", where)
    info = KINDS[kind]
    content = info.top_level or {"spec"}
    unknown = set(doc) - {"apiVersion", "kind", "metadata"} - content
    if unknown:
        raise ResourceError(f"unknown top-level field(s): {', '.join(sorted(unknown))}", where)
    if doc.get("apiVersion") not in info.api_versions:
        raise ResourceError(
            f"{kind}: apiVersion must be one of {', '.join(sorted(info.api_versions))}, "
            f"got {doc.get('apiVersion')!r}",
            where,
        )
    md = doc.get("metadata")
    if not isinstance(md, dict) or not isinstance(md.get("name"), str) or not md["name"]:
        raise ResourceError(f"{kind}: metadata.name is required", where)
    extra_md = set(md) - {"name", "namespace", "labels", "annotations"}
    if extra_md:
        raise ResourceError(f"{kind}: unknown metadata field(s): {', '.join(sorted(extra_md))}", where)
    namespace = md.get("namespace", "default" if info.namespaced else "")
    if not isinstance(namespace, str) or (info.namespaced and not namespace):
        raise ResourceError(f"{kind}: metadata.namespace must be a non-empty string", where)
    if not info.namespaced and namespace:
        raise ResourceError(f"{kind} is cluster-scoped: metadata.namespace is not allowed", where)
    meta = Meta(
        md["name"],
        namespace,
        _labels(md.get("labels"), where),
        _labels(md.get("annotations"), where, "annotations"),
    )
    spec = {k: doc[k] for k in info.top_level if k in doc} if info.top_level else doc.get("spec", {})
    if spec is None:
        spec = {}
    if not isinstance(spec, dict):
        raise ResourceError(f"{kind} {meta.name}: spec must be a mapping", where)
    try:
        return info.parse_spec(meta, spec)
    except ResourceError as exc:
        raise ResourceError(f"{kind} {meta.name}: {exc.reason}", where) from None


def load_kinds() -> None:
    """Import every module that registers kinds (they register on import)."""
    import importlib
    import pkgutil

    for mod in pkgutil.iter_modules(__path__):
        importlib.import_module(f"{__name__}.{mod.name}")
