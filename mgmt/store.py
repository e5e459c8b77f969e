"""The management plane's config store, and its file source: a directory of Kubernetes-style YAML, watched.

`ConfigStore` owns the versioned ConfigSnapshot whatever feeds it: the file source here (`load`, `watch`), or
the Kubernetes source (mgmt/kube), which hands it whole resource sets through `publish`. Each accepted
change that alters the content gets the next version; the version and the content hash persist in the state
dir so a restarted plane keeps counting from where it was (nodes resume from their ACKed version).

Validity is per document: an invalid document (bad field, unknown kind, duplicate name or YAML key) is
reported with `file:line: reason`, logged once, counted, and skipped; every other document applies. An
object that was valid before and is now broken keeps its last good version in force (a typo in a DENY
policy must not open what it denied); a file that no longer parses as YAML keeps all its last good objects.
Kinds that only allow (ALLOWS_ONLY: ReferenceGrant) are the exception: broken, they are dropped.

The watch polls mtimes (every 200 ms by default): inotify misses edits on some mounts (bind-mounted
ConfigMaps, network filesystems), and a poll of a few hundred files costs nothing measurable.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from api.resources import ResourceError, ResourceKey, key_of, load_kinds, parse
from api.resources.workload import Workload
from mgmt.documents import is_list, key_hint, normalized
from mgmt.kube.translate import from_kubernetes

log = logging.getLogger("ambit.mgmt.store")

YAML_SUFFIXES = (".yaml", ".yml")
VERSION_FILE = "config-version.json"


def canonical_json(doc: Any) -> bytes:
    """One byte form per document, so equal content hashes equally on the plane and the node."""
    return json.dumps(doc, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()


def content_hash(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


@dataclass(frozen=True)
class ConfigError:
    """Why a document was rejected, and where: `file:line`."""

    where: str
    reason: str
    key: str = ""  # str(ResourceKey) of the object the document names, when it names one

    def __str__(self) -> str:
        return f"{self.where}: {self.reason}"


@dataclass(frozen=True)
class StoredResource:
    key: ResourceKey
    obj: Any  # the parsed domain object (Workload, Service, a policy kind, ...)
    document: bytes  # canonical JSON of the original document
    hash: str
    where: str  # file:line it came from

    @property
    def kind(self) -> str:
        return self.key.kind


@dataclass(frozen=True)
class ConfigSnapshot:
    """One accepted version of the whole configuration (immutable; swapped atomically)."""

    version: int = 0
    content_hash: str = ""
    resources: Mapping[str, StoredResource] = field(default_factory=dict)  # by str(ResourceKey)

    def of_kind(self, kind: str) -> list[StoredResource]:
        return [r for r in self.resources.values() if r.key.kind == kind]

    def workloads(self) -> list[Workload]:
        return [r.obj for r in self.resources.values() if isinstance(r.obj, Workload)]


class ConfigLoadError(Exception):
    def __init__(self, errors: list[ConfigError]) -> None:
        super().__init__("; ".join(str(e) for e in errors))
        self.errors = errors


# libyaml's parser runs ~10x faster than the pure-Python one and reports the same marks.
_BaseLoader: Any = getattr(yaml, "CSafeLoader", yaml.SafeLoader)


class _Loader(_BaseLoader):  # type: ignore[misc]
    """The safe loader, refusing duplicate mapping keys: YAML says they are an error, PyYAML keeps the last
    one silently (`action: DENY` then `action: ALLOW` further down would allow)."""


def _mapping_without_duplicates(loader: Any, node: yaml.MappingNode) -> dict[Any, Any]:
    seen: set[Any] = set()
    for key_node, _ in node.value:
        if key_node.tag == "tag:yaml.org,2002:merge":
            continue
        key = loader.construct_object(key_node, deep=True)
        if key in seen:
            raise yaml.constructor.ConstructorError(
                "while constructing a mapping", node.start_mark, f"duplicate key {key!r}", key_node.start_mark
            )
        seen.add(key)
    return dict(loader.construct_mapping(node, deep=True))


_Loader.add_constructor("tag:yaml.org,2002:map", _mapping_without_duplicates)


@dataclass(frozen=True)
class _FileResult:
    """One file's parse, reused while its (inode, mtime, size) stamp is unchanged."""

    stamp: tuple[int, int, int]
    read_at: float
    resources: tuple[StoredResource, ...]
    errors: tuple[ConfigError, ...]
    readable: bool = True  # False: the file as a whole did not parse; its last good objects stay


FileCache = dict[Path, _FileResult]
# A file modified within this long of our read may have changed again in the same mtime tick ("racy git").
RACY_WINDOW_S = 0.1


def _yaml_error(path: Path, exc: yaml.YAMLError) -> ConfigError:
    mark = getattr(exc, "problem_mark", None) or getattr(exc, "context_mark", None)
    line = mark.line + 1 if mark is not None else 1
    problem = getattr(exc, "problem", None) or str(exc)
    return ConfigError(f"{path}:{line}", f"invalid YAML: {problem}")


def _documents(path: Path, text: str) -> tuple[list[tuple[int, Any]], list[ConfigError]]:
    """(1-based line, document) for every non-empty document of one YAML stream, and the documents that
    could not be constructed (a duplicate key spoils one document, not the file). A syntax error ends the
    stream: raises ConfigLoadError, since nothing after it can be trusted to be what the author meant."""
    loader = _Loader(text)
    out: list[tuple[int, Any]] = []
    errors: list[ConfigError] = []
    try:
        while loader.check_node():
            node = loader.get_node()
            if node is None:
                continue
            try:
                doc = loader.construct_document(node)
            except yaml.constructor.ConstructorError as exc:
                errors.append(_yaml_error(path, exc))
                continue
            if doc is None:
                continue
            out.extend(_expand(node, doc))
    except yaml.YAMLError as exc:
        raise ConfigLoadError([_yaml_error(path, exc)]) from None
    finally:
        loader.dispose()
    return out, errors


def _expand(node: yaml.Node, doc: Any) -> list[tuple[int, Any]]:
    """A `kind: List` (as `kubectl get` prints) becomes its items, each with its own line."""
    if not is_list(doc):
        return [(node.start_mark.line + 1, doc)]
    items_node = next(
        (v for k, v in node.value if isinstance(k, yaml.ScalarNode) and k.value == "items"), None
    )
    lines = [n.start_mark.line + 1 for n in items_node.value] if items_node is not None else []
    return [
        (lines[i] if i < len(lines) else node.start_mark.line + 1, item)
        for i, item in enumerate(doc["items"])
    ]


def _stamp(path: Path) -> tuple[int, int, int]:
    st = path.stat()
    return (st.st_ino, st.st_mtime_ns, st.st_size)


def _parse_file_cached(path: Path, cache: FileCache) -> _FileResult:
    try:
        stamp = _stamp(path)
    except OSError as exc:
        return _FileResult((0, 0, 0), 0.0, (), (ConfigError(f"{path}:1", f"unreadable: {exc}"),), False)
    hit = cache.get(path)
    if hit is not None and hit.stamp == stamp and hit.read_at > stamp[1] / 1e9 + RACY_WINDOW_S:
        return hit
    read_at = time.time()
    result = _parse_file(path, stamp, read_at)
    cache[path] = result
    return result


def _parse_file(path: Path, stamp: tuple[int, int, int], read_at: float) -> _FileResult:
    try:
        text = path.read_text(encoding="utf-8")
        docs, errors = _documents(path, text)
    except ConfigLoadError as exc:
        return _FileResult(stamp, read_at, (), tuple(exc.errors), False)
    except (OSError, UnicodeDecodeError) as exc:
        return _FileResult(stamp, read_at, (), (ConfigError(f"{path}:1", f"unreadable: {exc}"),), False)
    resources: list[StoredResource] = []
    for line, raw in docs:
        native, translated = from_kubernetes(raw)
        if native and translated is None:
            continue  # a Kubernetes object that is not (yet) part of the mesh: a pending Pod, ...
        res = stored(translated if native else raw, f"{path}:{line}")
        if isinstance(res, ConfigError):
            errors.append(res)
        else:
            resources.append(res)
    return _FileResult(stamp, read_at, tuple(resources), tuple(errors))


def stored(raw: Any, where: str) -> StoredResource | ConfigError:
    """One document, normalized (mgmt/documents) and parsed, or why not (naming its key when it has one)."""
    doc = normalized(raw)
    try:
        obj = parse(doc, where)
        data = canonical_json(doc)
    except ResourceError as exc:
        return ConfigError(where, exc.reason, key_hint(doc))
    except (TypeError, ValueError) as exc:  # e.g. a YAML timestamp, which JSON cannot carry
        return ConfigError(where, f"value not representable as JSON: {exc}", key_hint(doc))
    return StoredResource(key_of(obj), obj, data, content_hash(data), where)


def _config_files(config_dir: Path) -> list[Path]:
    return sorted(
        p for p in config_dir.rglob("*") if p.suffix in YAML_SUFFIXES and p.is_file() and not _hidden(p)
    )


def _hidden(path: Path) -> bool:
    # Editors' swap files and Kubernetes ConfigMap "..data" symlink farms start with a dot.
    return any(part.startswith(".") for part in path.parts[-1:])


# Kinds that only ever allow something (a ReferenceGrant lets a Gateway use another namespace's Secret): a
# broken edit revokes them rather than keep the last good version, the fail-closed side for an allow.
ALLOWS_ONLY = frozenset({"ReferenceGrant"})


def read_config(
    config_dir: Path,
    cache: FileCache | None = None,
    previous: Mapping[str, StoredResource] | None = None,
) -> tuple[dict[str, StoredResource], list[ConfigError]]:
    """Parse every YAML file under `config_dir`: the valid resources, and every problem found.

    An invalid document is skipped; if it names an object of `previous` (the config in force), that last
    good version is kept. A file that does not parse at all keeps every object `previous` had from it.
    With a `cache`, files whose stamp did not change are not parsed again (a 1,000-workload tree reloads
    in the time of the one file that changed). Raises ConfigLoadError only when the directory is missing."""
    load_kinds()
    cache = {} if cache is None else cache
    previous = previous or {}
    if not config_dir.is_dir():
        raise ConfigLoadError([ConfigError(str(config_dir), "config directory does not exist")])
    files = _config_files(config_dir)
    for gone in set(cache) - set(files):
        del cache[gone]
    resources: dict[str, StoredResource] = {}
    errors: list[ConfigError] = []
    kept: list[StoredResource] = []
    for path in files:
        result = _parse_file_cached(path, cache)
        errors.extend(result.errors)
        if not result.readable:
            kept.extend(r for r in previous.values() if r.where.startswith(f"{path}:"))
        kept.extend(previous[e.key] for e in result.errors if e.key in previous)
        for res in result.resources:
            key = str(res.key)
            first = resources.get(key)
            if first is None:
                resources[key] = res
                continue
            # The definition in force wins over one added elsewhere later; otherwise the first in path order.
            in_force = previous.get(key)
            if in_force is not None and in_force.where == res.where:
                resources[key], first, res = res, res, first
            errors.append(ConfigError(res.where, f"duplicate {key} (first defined at {first.where})", key))
    for res in kept:
        if res.kind not in ALLOWS_ONLY:
            resources.setdefault(str(res.key), res)
    return resources, errors


def _hash_of(resources: Mapping[str, StoredResource]) -> str:
    h = hashlib.sha256()
    for key in sorted(resources):
        h.update(key.encode() + b"\0" + resources[key].hash.encode() + b"\n")
    return h.hexdigest()


Listener = Callable[[ConfigSnapshot], None]


class ConfigStore:
    """Owns the current ConfigSnapshot: `load()` once, `watch()` follows edits; listeners hear of changes."""

    def __init__(
        self,
        config_dir: Path | str | None,
        state_dir: Path | str | None = None,
        poll_interval: float = 0.2,
        trust_domain: str = "cluster.local",
    ) -> None:
        # None: another source (mgmt/kube) publishes; load/watch/poll then have nothing to read.
        self.config_dir = Path(config_dir) if config_dir is not None else None
        # Only to spell workload SPIFFE IDs for identities_on_node (the CSR service compares full IDs).
        self.trust_domain = trust_domain
        self.state_dir = Path(state_dir) if state_dir is not None else None
        self.poll_interval = poll_interval
        self._lock = threading.Lock()
        self._current = ConfigSnapshot()
        self._errors: list[ConfigError] = []
        self._listeners: list[Listener] = []
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._signature: tuple[tuple[str, int, int], ...] | None = None
        self._files: FileCache = {}
        self._counters = {
            "loads": 0,
            "rejected_loads": 0,
            "versions": 0,
            "invalid_documents": 0,  # now (a gauge)
            "rejected_documents": 0,  # distinct problems seen since start
        }
        self._persisted = self._read_persisted()

    # -- state -----------------------------------------------------------------------------------------
    @property
    def current(self) -> ConfigSnapshot:
        return self._current

    @property
    def version(self) -> int:
        return self._current.version

    @property
    def content_hash(self) -> str:
        return self._current.content_hash

    @property
    def errors(self) -> list[ConfigError]:
        """The invalid documents of the last load, left out of the config (or why the load failed)."""
        with self._lock:
            return list(self._errors)

    def counters(self) -> dict[str, int]:
        with self._lock:
            return dict(self._counters)

    def workloads_on_node(self, node: str) -> list[Workload]:
        return sorted((w for w in self._current.workloads() if w.node == node), key=lambda w: w.uid)

    def identities_on_node(self, node: str) -> frozenset[str]:
        return frozenset(str(w.spiffe_id(self.trust_domain)) for w in self.workloads_on_node(node))

    def add_listener(self, listener: Listener) -> None:
        with self._lock:
            self._listeners.append(listener)

    def remove_listener(self, listener: Listener) -> None:
        with self._lock:
            if listener in self._listeners:
                self._listeners.remove(listener)

    # -- loading ---------------------------------------------------------------------------------------
    def load(self) -> list[ConfigError]:
        """Read the directory now and apply every valid document. Returns the invalid ones (empty: all
        applied); a missing directory changes nothing."""
        if self.config_dir is None:
            return []
        self._signature = self._scan()
        try:
            resources, errors = read_config(self.config_dir, self._files, self._current.resources)
        except ConfigLoadError as exc:
            with self._lock:
                repeated = exc.errors == self._errors
                self._errors = exc.errors
                self._counters["rejected_loads"] += 1
            # The watch reads a rejected tree once more (it may have been caught half-written): the same
            # errors again are not news, so each is logged once.
            for err in [] if repeated else exc.errors:
                log.error("config rejected, keeping version %d: %s", self.version, err)
            return exc.errors
        self.publish(resources, errors)
        return errors

    def publish(self, resources: Mapping[str, StoredResource], errors: Sequence[ConfigError] = ()) -> int:
        """Make `resources` (by str(ResourceKey)) the config; `errors` are the source's invalid objects,
        already left out. Returns the version now in force (unchanged when the content is)."""
        self._report(errors)
        self._accept(dict(resources))
        return self.version

    def _report(self, errors: Sequence[ConfigError]) -> None:
        with self._lock:
            before = {str(e) for e in self._errors}
            self._errors = list(errors)
            self._counters["invalid_documents"] = len(errors)
            new = [e for e in errors if str(e) not in before]
            self._counters["rejected_documents"] += len(new)
        for err in new:  # once per distinct problem, not on every reload of an unrelated file
            log.error("config: skipped invalid document: %s", err)

    def _accept(self, resources: dict[str, StoredResource]) -> None:
        digest = _hash_of(resources)
        with self._lock:
            self._counters["loads"] += 1
            if digest == self._current.content_hash:
                return
            version = self._next_version(digest)
            snapshot = ConfigSnapshot(version, digest, resources)
            self._current = snapshot
            self._counters["versions"] += 1
            listeners = list(self._listeners)
        self._persist(snapshot)
        log.info("config version %d (%s, %d resources)", version, digest[:12], len(resources))
        for listener in listeners:
            try:
                listener(snapshot)
            except Exception:
                log.exception("config listener failed at version %d", version)

    def _next_version(self, digest: str) -> int:
        base = max(self._current.version, int(self._persisted.get("version", 0)))
        if self._current.version == 0 and self._persisted.get("content_hash") == digest:
            return base  # restart on unchanged content: same version, nodes have nothing to fetch
        return base + 1

    def _read_persisted(self) -> dict[str, Any]:
        if self.state_dir is None:
            return {}
        try:
            data = json.loads((self.state_dir / VERSION_FILE).read_text())
        except (OSError, ValueError):
            return {}
        return data if isinstance(data, dict) and isinstance(data.get("version"), int) else {}

    def _persist(self, snapshot: ConfigSnapshot) -> None:
        if self.state_dir is None:
            return
        self.state_dir.mkdir(parents=True, exist_ok=True)
        tmp = self.state_dir / (VERSION_FILE + ".tmp")
        tmp.write_text(json.dumps({"version": snapshot.version, "content_hash": snapshot.content_hash}))
        os.replace(tmp, self.state_dir / VERSION_FILE)  # atomic: a crash leaves the old or the new file
        self._persisted = {"version": snapshot.version, "content_hash": snapshot.content_hash}

    # -- watching --------------------------------------------------------------------------------------
    def _scan(self) -> tuple[tuple[str, int, int], ...]:
        if self.config_dir is None:
            return ()
        try:
            files = _config_files(self.config_dir)
        except OSError:
            return ()
        out = []
        for p in files:
            try:
                st = p.stat()
            except OSError:
                continue
            out.append((str(p), st.st_mtime_ns, st.st_size))
        return tuple(out)

    def poll(self) -> bool:
        """One watch step: reload if any file was added, removed or modified. True if something changed."""
        signature = self._scan()
        if signature == self._signature:
            return False
        self.load()
        return True

    def watch(self) -> None:
        if self._thread is not None or self.config_dir is None:
            return
        self._stop.clear()
        self._thread = threading.Thread(target=self._watch_loop, name="config-watch", daemon=True)
        self._thread.start()

    def _watch_loop(self) -> None:
        retry = False
        while not self._stop.wait(self.poll_interval):
            try:
                changed = self.poll()
                if retry and not changed:
                    self.load()
                # A file caught half-written fails to parse; read once more even if its mtime did not move.
                retry = changed and bool(self.errors)
            except Exception:
                log.exception("config watch step failed")

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
            self._thread = None
