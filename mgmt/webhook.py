"""The validating admission webhook (port 15017, HTTPS): the API server asks before it stores a policy object.

OpenAPI (deploy/crds) rejects unknown fields, bad enums and port ranges at apply time; this answers what
it cannot check (mgmt/policy_check.py: the data path's own parser and compiler, principals, selectors).
The serving certificate comes from the mesh CA (SPIFFE ID spiffe://<td>/mgmt plus the Service's DNS names,
which is what the API server verifies against the caBundle of the ValidatingWebhookConfiguration); it is
re-issued after a CA change or at half life, for new connections. The answer is a verdict without side
effects, so callers are not authenticated.

Bounded: at most MAX_INFLIGHT connections are served at once (more are closed and counted), a request body
is at most MAX_BODY_BYTES, a connection idles at most IO_TIMEOUT_S.
"""

from __future__ import annotations

import datetime as dt
import http.server
import json
import logging
import socket
import ssl
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterable, Mapping
from typing import Any

from cryptography.hazmat.primitives.asymmetric import ec

from agent.identity.svid import Svid
from api.spiffe import SpiffeId
from mgmt.ca import CertificateAuthority, certs_pem, private_key_pem
from mgmt.policy_check import PolicyRejected, check_policy
from mgmt.waf_check import check_waf_policy

log = logging.getLogger("ambit.mgmt.webhook")

WEBHOOK_PORT = 15017
WEBHOOK_PATH = "/validate"
ADMISSION_API = "admission.k8s.io/v1"
MAX_BODY_BYTES = 4 * 1024 * 1024  # etcd's object limit is 1.5 MiB; a review carries object + oldObject
MAX_INFLIGHT = 16
IO_TIMEOUT_S = 10.0
SERVING_TTL = dt.timedelta(days=7)
LOG_INTERVAL_S = 1.0  # at most one rejection line a second; the rest are counted in the next line


class WebhookTls:
    """The webhook's TLS context, re-issued from the CA when its generation changes or at half life."""

    def __init__(self, ca: CertificateAuthority, dns_names: tuple[str, ...]) -> None:
        self._ca = ca
        self._dns_names = dns_names
        self._lock = threading.Lock()
        self._ctx: ssl.SSLContext | None = None
        self._generation = -1
        self._renew_at = 0.0

    def _issue(self) -> ssl.SSLContext:
        key = ec.generate_private_key(ec.SECP256R1())
        spiffe_id = SpiffeId.parse(f"spiffe://{self._ca.trust_domain}/mgmt")
        chain = self._ca.issue(spiffe_id, key.public_key(), SERVING_TTL, self._dns_names)
        svid = Svid.from_pem(str(spiffe_id), certs_pem(chain), private_key_pem(key))
        ctx = svid.ssl_context(self._ca.bundle_pem(), server=True)
        # The API server presents no client certificate to webhooks unless configured to; the verdict is
        # not a secret, so none is asked for.
        ctx.verify_mode = ssl.CERT_NONE
        leaf = chain[0]
        lifetime = leaf.not_valid_after_utc - leaf.not_valid_before_utc
        self._renew_at = (leaf.not_valid_before_utc + lifetime / 2).timestamp()
        self._generation = self._ca.generation
        return ctx

    def context(self) -> ssl.SSLContext:
        with self._lock:
            if self._ctx is None or self._ca.generation != self._generation or time.time() >= self._renew_at:
                self._ctx = self._issue()
            return self._ctx


def _admission_response(uid: str, problem: str | None, warnings: list[str] | None = None) -> dict[str, Any]:
    response: dict[str, Any] = {"uid": uid, "allowed": problem is None}
    if problem is not None:
        response["status"] = {"code": 422, "reason": "Invalid", "message": problem}
    if warnings:
        response["warnings"] = warnings
    return {"apiVersion": ADMISSION_API, "kind": "AdmissionReview", "response": response}


class Validator:
    """AdmissionReview v1 in, AdmissionReview v1 out. Counted; rejections logged (rate-limited)."""

    def __init__(self, trust_domain: str, mesh_configs: Callable[[], Iterable[str]] | None = None) -> None:
        self.trust_domain = trust_domain
        # Names of the MeshConfigs in force: the mesh-wide settings must stay one object.
        self._mesh_configs = mesh_configs or tuple
        self._lock = threading.Lock()
        self.counts: Counter[str] = Counter()
        self._last_log = 0.0
        self._unlogged = 0

    def count(self, what: str) -> None:
        with self._lock:
            self.counts[what] += 1

    def _log_rejection(self, where: str, problem: str) -> None:
        now = time.monotonic()
        with self._lock:
            if now - self._last_log < LOG_INTERVAL_S:
                self._unlogged += 1
                return
            self._last_log, unlogged, self._unlogged = now, self._unlogged, 0
        more = f" (+{unlogged} more since the last line)" if unlogged else ""
        log.warning("admission refused %s: %s%s", where, problem, more)

    def review(self, body: Any) -> dict[str, Any]:
        """The response to one AdmissionReview; ValueError when `body` is not one (HTTP 400)."""
        if not isinstance(body, Mapping) or body.get("kind") != "AdmissionReview":
            raise ValueError("not an AdmissionReview")
        if body.get("apiVersion") != ADMISSION_API:
            raise ValueError(f"AdmissionReview apiVersion must be {ADMISSION_API}")
        request = body.get("request")
        if not isinstance(request, Mapping) or not isinstance(request.get("uid"), str):
            raise ValueError("AdmissionReview without request.uid")
        uid = request["uid"]
        if request.get("operation") not in ("CREATE", "UPDATE"):
            self.count("allowed_other_operation")
            return _admission_response(uid, None)
        obj = request.get("object")
        if not isinstance(obj, Mapping):
            self.count("rejected")
            return _admission_response(uid, "the request carries no object")
        namespace = request.get("namespace") or ""
        where = f"{obj.get('kind')} {namespace + '/' if namespace else ''}{request.get('name') or ''}"
        try:
            if obj.get("kind") == "WafPolicy":  # the gateway's kind: its config-time check (mgmt/waf_check)
                policy: Any = check_waf_policy(obj, namespace if isinstance(namespace, str) else "")
            else:
                policy = check_policy(obj, self.trust_domain, namespace if isinstance(namespace, str) else "")
            if policy.kind == "MeshConfig":
                others = sorted(set(self._mesh_configs()) - {policy.meta.name})
                if others:
                    raise PolicyRejected(
                        f"MeshConfig {policy.meta.name}: MeshConfig {others[0]} already holds the mesh-wide "
                        "settings; edit that one (two would be ambiguous, and every node would refuse both)"
                    )
        except PolicyRejected as exc:
            self.count("rejected")
            self.count(f"rejected_{obj.get('kind')}")
            self._log_rejection(where, str(exc))
            return _admission_response(uid, str(exc))
        except Exception as exc:  # a checker bug must refuse the object, not crash the server
            self.count("rejected_internal_error")
            log.exception("checking %s failed", where)
            return _admission_response(uid, f"internal error while checking the object: {exc}")
        self.count("allowed")
        # What the node enforces differently from Istio (L7 attributes, targetRefs): kubectl prints these.
        return _admission_response(uid, None, list(getattr(policy, "warnings", ())))


class _Handler(http.server.BaseHTTPRequestHandler):
    server: _HttpsServer
    protocol_version = "HTTP/1.1"
    timeout = IO_TIMEOUT_S

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 (BaseHTTPRequestHandler's name)
        log.debug("%s %s", self.address_string(), format % args)

    def _reply(self, status: int, doc: Mapping[str, Any]) -> None:
        data = json.dumps(doc).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def do_GET(self) -> None:  # noqa: N802
        if self.path == "/healthz/ready":
            self._reply(200, {"ready": True})
        else:
            self._reply(404, {"error": f"no such path {self.path}"})

    def do_POST(self) -> None:  # noqa: N802
        validator = self.server.validator
        if self.path.split("?", 1)[0] != WEBHOOK_PATH:
            self._reply(404, {"error": f"no such path {self.path} (the webhook is at {WEBHOOK_PATH})"})
            return
        try:
            length = int(self.headers.get("Content-Length", ""))
        except ValueError:
            length = -1
        if not 0 <= length <= MAX_BODY_BYTES:
            validator.count("bad_requests")
            self.close_connection = True
            error = f"Content-Length must be set, at most {MAX_BODY_BYTES} bytes"
            self._reply(413 if length > MAX_BODY_BYTES else 411, {"error": error})
            return
        try:
            doc = validator.review(json.loads(self.rfile.read(length)))
        except ValueError as exc:  # JSON errors are ValueErrors too
            validator.count("bad_requests")
            self._reply(400, {"error": str(exc)})
            return
        self._reply(200, doc)


class _HttpsServer(http.server.ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True

    def __init__(self, address: tuple[str, int], tls: WebhookTls, validator: Validator) -> None:
        self.tls = tls
        self.validator = validator
        self._slots = threading.BoundedSemaphore(MAX_INFLIGHT)
        super().__init__(address, _Handler)

    def get_request(self) -> tuple[socket.socket, Any]:
        sock, addr = super().get_request()
        # The handshake runs in the handler's thread (first read), so a slow client never stalls accept().
        sock.settimeout(IO_TIMEOUT_S)
        return self.tls.context().wrap_socket(sock, server_side=True, do_handshake_on_connect=False), addr

    def process_request(self, request: Any, client_address: Any) -> None:
        if not self._slots.acquire(blocking=False):
            self.validator.count("overloaded")
            self.shutdown_request(request)
            return
        try:
            super().process_request(request, client_address)
        except Exception:
            self._slots.release()
            raise

    def process_request_thread(self, request: Any, client_address: Any) -> None:
        try:
            super().process_request_thread(request, client_address)
        finally:
            self._slots.release()

    def handle_error(self, request: Any, client_address: Any) -> None:
        self.validator.count("connection_errors")  # TLS handshake failures, resets, timeouts
        log.debug("webhook connection from %s failed", client_address, exc_info=True)


class WebhookServer:
    def __init__(
        self,
        ca: CertificateAuthority,
        trust_domain: str,
        listen: str = f"0.0.0.0:{WEBHOOK_PORT}",
        dns_names: tuple[str, ...] = (),
        mesh_configs: Callable[[], Iterable[str]] | None = None,
    ) -> None:
        host, _, port = listen.rpartition(":")
        self.validator = Validator(trust_domain, mesh_configs)
        self.tls = WebhookTls(ca, dns_names)
        self.tls.context()  # fail at start, not at the first review, if the CA cannot issue
        self._server = _HttpsServer((host.strip("[]") or "0.0.0.0", int(port)), self.tls, self.validator)
        self.port = int(self._server.server_address[1])
        self._thread: threading.Thread | None = None

    def counters(self) -> dict[str, int]:
        with self.validator._lock:
            return dict(self.validator.counts)

    def start(self) -> None:
        self._thread = threading.Thread(
            target=self._server.serve_forever, args=(0.05,), name="webhook", daemon=True
        )
        self._thread.start()
        log.info("admission webhook listening on port %d (%s)", self.port, WEBHOOK_PATH)

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        if self._thread is not None:
            self._thread.join(5)
