"""A real Kubernetes API server for the lab and the tests: etcd + kube-apiserver on loopback.

The binaries come from scripts/build-kube.sh (built from the Go module proxy by `make setup`, cached under
/var/cache/ambit keyed by version). There is no controller-manager, scheduler or kubelet: nothing creates
default ServiceAccounts (the ServiceAccount admission plugin is off), allocates EndpointSlices, collects
garbage or finishes namespace deletion; callers write pod status and EndpointSlices themselves.

Credentials: a throw-away CA signs the serving certificate; callers authenticate with a random bearer token
mapped to `system:masters` (RBAC on, so other identities get only what a test grants them). The work
directory lives on tmpfs (/dev/shm) when there is one: the test bed's private keys and etcd's data stay in
memory, and etcd's fsyncs cost nothing.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import ipaddress
import os
import secrets
import shutil
import socket
import ssl
import subprocess
import tempfile
import time
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import NameOID

from agent import netns as nsx
from agent.errors import UsageError

T = TypeVar("T")

SETPRIV = "/usr/bin/setpriv"  # util-linux, on every Debian system
BUILD_SCRIPT = Path(__file__).resolve().parents[2] / "scripts" / "build-kube.sh"
SERVICE_CIDR = "10.96.0.0/16"
ADMIN_USER = "ambit-admin"
READY_TIMEOUT_S = 60.0
# kube-apiserver serves the API groups it registers at start; the rest of its flags keep it small.
_APISERVER_FLAGS = (
    "--authorization-mode=RBAC",
    "--disable-admission-plugins=ServiceAccount",
    "--endpoint-reconciler-type=none",  # loopback cannot be the advertised `kubernetes` endpoint
    "--allow-privileged=true",  # the agent DaemonSet is privileged (server-side dry runs of the chart)
    f"--service-cluster-ip-range={SERVICE_CIDR}",
    "--profiling=false",
    "--enable-priority-and-fairness=false",
    "--event-ttl=10m",
    "--v=0",
)


def bin_dir() -> Path:
    """Where build-kube.sh keeps the binaries; a clear error when `make setup` has not built them."""
    override = os.environ.get("AMBIT_KUBE_BIN")
    if override:
        return Path(override)
    out = subprocess.run(["bash", str(BUILD_SCRIPT), "--path"], capture_output=True, text=True)
    if out.returncode != 0:
        raise UsageError("kube-apiserver/etcd are not built: run `make setup` (or scripts/build-kube.sh)")
    return Path(out.stdout.strip())


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _pem_cert(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.PEM)


def _pem_key(key: Any) -> bytes:
    return bytes(
        key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
    )


def _write_private(path: Path, data: bytes) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(data)


def _issue_certs(work: Path) -> None:
    """A CA, the serving certificate (127.0.0.1, localhost, kubernetes.default.svc) and the SA key pair."""
    now = dt.datetime.now(dt.UTC)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "ambit test-bed CA")])
    ca = (
        x509.CertificateBuilder()
        .subject_name(ca_name)
        .issuer_name(ca_name)
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=2))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .sign(ca_key, hashes.SHA256())
    )
    key = ec.generate_private_key(ec.SECP256R1())
    sans: list[x509.GeneralName] = [
        x509.IPAddress(ipaddress.ip_address("127.0.0.1")),
        x509.IPAddress(ipaddress.ip_address(SERVICE_CIDR.split("/")[0][:-1] + "1")),
        x509.DNSName("localhost"),
        x509.DNSName("kubernetes"),
        x509.DNSName("kubernetes.default.svc"),
    ]
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "kube-apiserver")]))
        .issuer_name(ca_name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=2))
        .add_extension(x509.SubjectAlternativeName(sans), critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    (work / "ca.crt").write_bytes(_pem_cert(ca))
    (work / "apiserver.crt").write_bytes(_pem_cert(cert))
    _write_private(work / "apiserver.key", _pem_key(key))
    # ServiceAccount tokens are RS256-signed by default (the issuer's JWKS); 2048 bits is what kubeadm uses.
    sa_key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    _write_private(work / "sa.key", _pem_key(sa_key))
    (work / "sa.pub").write_bytes(
        sa_key.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        )
    )


@dataclass(frozen=True)
class ApiAccess:
    """What a client needs to reach the server; picklable, so a lab child in another netns can use it."""

    url: str
    ca_file: str
    token: str

    def client(self) -> Any:
        """A `kubernetes.client.ApiClient` authenticated as the admin."""
        from kubernetes import client

        cfg = client.Configuration()
        cfg.host = self.url
        cfg.ssl_ca_cert = self.ca_file
        cfg.api_key = {"authorization": self.token}
        cfg.api_key_prefix = {"authorization": "Bearer"}
        return client.ApiClient(cfg)


def readyz(access: ApiAccess) -> str:
    """Empty when /readyz answers 200, else why not."""
    ctx = ssl.create_default_context(cafile=access.ca_file)
    req = urllib.request.Request(f"{access.url}/readyz", headers={"Authorization": f"Bearer {access.token}"})
    try:
        with urllib.request.urlopen(req, context=ctx, timeout=2) as resp:
            return "" if resp.status == 200 else f"HTTP {resp.status}"
    except OSError as exc:
        return str(exc)


@dataclass
class ApiServer:
    """etcd + kube-apiserver on loopback; `start()` waits for /readyz, `restart_apiserver()` keeps etcd.

    With `netns`, both run inside that network namespace (the lab's fabric, where its plane runs) on the
    well-known ports; clients then reach it only from inside (see `access` and `in_netns`)."""

    work: Path = field(default_factory=lambda: Path(tempfile.mkdtemp(prefix="ambit-kube-", dir=_tmpfs())))
    port: int = 0
    token: str = field(default_factory=lambda: secrets.token_urlsafe(32))
    netns: str | None = None
    _etcd: subprocess.Popen[bytes] | None = None
    _apiserver: subprocess.Popen[bytes] | None = None
    _etcd_port: int = 0

    @property
    def url(self) -> str:
        return f"https://127.0.0.1:{self.port}"

    @property
    def ca_file(self) -> Path:
        return self.work / "ca.crt"

    @property
    def kubeconfig(self) -> Path:
        return self.work / "kubeconfig"

    @property
    def kubectl(self) -> Path:
        return bin_dir() / "kubectl"

    def start(self) -> ApiServer:
        bins = bin_dir()
        self.work.mkdir(parents=True, exist_ok=True)
        os.chmod(self.work, 0o700)
        _issue_certs(self.work)
        _write_private(self.work / "tokens.csv", f'{self.token},{ADMIN_USER},1,"system:masters"\n'.encode())
        # A fresh namespace has every port free; on the host, ask the kernel for unused ones.
        self._etcd_port = 2379 if self.netns else free_port()
        peer = 2380 if self.netns else free_port()
        etcd_url = f"http://127.0.0.1:{self._etcd_port}"
        self._etcd = self._spawn(
            "etcd",
            [
                str(bins / "etcd"),
                "--name=testbed",
                f"--data-dir={self.work / 'etcd'}",
                f"--listen-client-urls={etcd_url}",
                f"--advertise-client-urls={etcd_url}",
                f"--listen-peer-urls=http://127.0.0.1:{peer}",
                f"--initial-advertise-peer-urls=http://127.0.0.1:{peer}",
                f"--initial-cluster=testbed=http://127.0.0.1:{peer}",
                "--unsafe-no-fsync",  # tmpfs data dir of a throw-away cluster
                "--log-level=warn",
            ],
        )
        self.port = self.port or (6443 if self.netns else free_port())
        self._write_kubeconfig()
        self._start_apiserver()
        return self

    def _spawn(self, name: str, argv: list[str]) -> subprocess.Popen[bytes]:
        log = open(self.work / f"{name}.log", "ab")  # noqa: SIM115 (the child owns it from here)
        try:
            if self.netns:
                return nsx.popen_in(
                    self.netns, argv, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
                )
            # A test session killed before its teardown must not leave an API server behind: the child
            # gets SIGKILL when its parent dies (PR_SET_PDEATHSIG, set by setpriv before it execs argv; no
            # Python preexec_fn, which gRPC's fork handlers break). Lab servers (netns) outlive
            # `ambit lab up` on purpose: `ambit lab down` stops them.
            return subprocess.Popen(
                [SETPRIV, "--pdeathsig=KILL", *argv],
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        finally:
            log.close()

    def _start_apiserver(self) -> None:
        w = self.work
        self._apiserver = self._spawn(
            "kube-apiserver",
            [
                str(bin_dir() / "kube-apiserver"),
                f"--etcd-servers=http://127.0.0.1:{self._etcd_port}",
                "--bind-address=127.0.0.1",
                "--advertise-address=127.0.0.1",
                f"--secure-port={self.port}",
                f"--tls-cert-file={w / 'apiserver.crt'}",
                f"--tls-private-key-file={w / 'apiserver.key'}",
                f"--client-ca-file={w / 'ca.crt'}",
                f"--token-auth-file={w / 'tokens.csv'}",
                f"--service-account-key-file={w / 'sa.pub'}",
                f"--service-account-signing-key-file={w / 'sa.key'}",
                "--service-account-issuer=https://kubernetes.default.svc.cluster.local",
                *_APISERVER_FLAGS,
            ],
        )
        self.wait_ready()

    def wait_ready(self, timeout: float = READY_TIMEOUT_S) -> None:
        deadline = time.monotonic() + timeout
        last = ""
        while time.monotonic() < deadline:
            for name, proc in (("etcd", self._etcd), ("kube-apiserver", self._apiserver)):
                if proc is not None and proc.poll() is not None:
                    raise RuntimeError(f"{name} exited ({proc.returncode}): {self._log_tail(name)}")
            last = self.in_netns(readyz, self.access)
            if not last:
                return
            time.sleep(0.2)
        raise RuntimeError(
            f"kube-apiserver not ready after {timeout:.0f} s ({last}): {self._log_tail('kube-apiserver')}"
        )

    def in_netns(self, fn: Callable[..., T], *args: Any) -> T:  # type: ignore[type-var]
        """fn(*args) where the server is reachable: here, or in a child inside `netns`."""
        return nsx.run_in(self.netns, fn, *args) if self.netns else fn(*args)

    @property
    def pids(self) -> dict[str, int]:
        procs = (("etcd", self._etcd), ("kube-apiserver", self._apiserver))
        return {name: p.pid for name, p in procs if p is not None}

    def _log_tail(self, name: str) -> str:
        try:
            return (self.work / f"{name}.log").read_text(errors="replace")[-2000:]
        except OSError:
            return ""

    def _write_kubeconfig(self) -> None:
        text = f"""apiVersion: v1
kind: Config
clusters:
- name: testbed
  cluster:
    server: {self.url}
    certificate-authority: {self.ca_file}
users:
- name: {ADMIN_USER}
  user:
    token: {self.token}
contexts:
- name: testbed
  context: {{cluster: testbed, user: {ADMIN_USER}}}
current-context: testbed
"""
        _write_private(self.kubeconfig, text.encode())  # holds the bearer token

    def stop_apiserver(self) -> None:
        _stop(self._apiserver)
        self._apiserver = None

    def restart_apiserver(self) -> None:
        """Kill kube-apiserver and start it again on the same port and etcd (clients see broken watches)."""
        if self._apiserver is not None:
            self._apiserver.kill()  # a crash: no graceful close of the watches (which takes 10+ s anyway)
            self._apiserver.wait()
        self._apiserver = None
        self._start_apiserver()

    def stop(self) -> None:
        self.stop_apiserver()
        _stop(self._etcd)
        self._etcd = None
        shutil.rmtree(self.work, ignore_errors=True)

    @property
    def access(self) -> ApiAccess:
        return ApiAccess(self.url, str(self.ca_file), self.token)

    def client(self) -> Any:
        """A `kubernetes.client.ApiClient` authenticated as the admin (from this namespace)."""
        return self.access.client()

    def kubectl_run(
        self, *args: str, stdin: str | None = None, check: bool = True
    ) -> subprocess.CompletedProcess[str]:
        """The pinned kubectl against this server (not the machine's own); `check` raises with its stderr."""
        out = kubectl(self.kubeconfig, *args, netns=self.netns, stdin=stdin)
        if check and out.returncode != 0:
            raise RuntimeError(f"kubectl {' '.join(args)}: exit {out.returncode}: {out.stderr.strip()}")
        return out


def kubectl(
    kubeconfig: Path, *args: str, netns: str | None = None, stdin: str | None = None
) -> subprocess.CompletedProcess[str]:
    """The pinned kubectl with `kubeconfig`, inside `netns` when given (entered by nsenter)."""
    argv = [str(bin_dir() / "kubectl"), f"--kubeconfig={kubeconfig}", *args]
    if netns:
        argv = [nsx.NSENTER, f"--net={nsx.path_of(netns)}", "--", *argv]
    return subprocess.run(argv, input=stdin, capture_output=True, text=True, timeout=60)


def _stop(proc: subprocess.Popen[bytes] | None, timeout: float = 3.0) -> None:
    if proc is None or proc.poll() is not None:
        return
    proc.terminate()
    try:
        proc.wait(timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def _tmpfs() -> str | None:
    return "/dev/shm" if os.path.isdir("/dev/shm") and os.access("/dev/shm", os.W_OK) else None


@contextlib.contextmanager
def running_apiserver() -> Any:
    server = ApiServer()
    try:
        yield server.start()
    finally:
        server.stop()
