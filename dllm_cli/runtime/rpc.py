"""Models across machines through ggml's RPC backend (``ggml/src/ggml-rpc``, built with ``GGML_RPC=ON``).

Client: ``--rpc HOST:PORT[,HOST:PORT...]`` registers each worker's devices with ggml
(``ggml_backend_rpc_add_server``); llama.cpp then offloads layers to them as to GPUs (``--n-gpu-layers``,
``--tensor-split``). ggml aborts the process on an unreachable or mismatched worker, so every endpoint is first
checked from Python: a TCP connect plus the protocol's HELLO, whose version must equal this library's.

Worker: ``serve`` runs ``ggml_backend_rpc_start_server`` — the function ggml's ``rpc-server`` tool wraps — from the
same patched library the client uses, so the op set and the protocol version match by construction. The protocol
has no authentication: bind to loopback unless the network is trusted.
"""
from __future__ import annotations

import ctypes
import ipaddress
import os
import socket
import struct
import threading
from dataclasses import dataclass
from typing import Any

from dllm_cli.errors import DllmError, UsageError, clip

PROTO_MAJOR, PROTO_MINOR = 7, 0  # RPC_PROTO_{MAJOR,MINOR}_VERSION of the pinned ggml (include/ggml-rpc.h)
CMD_HELLO = 14                   # RPC_CMD_HELLO, fixed by the protocol
CONN_CAPS = 24                   # RPC_CONN_CAPS_SIZE (ggml-rpc/transport.h)
_FIX = "start it with `dllm rpc-server --host H --port P` on that machine, or drop it from --rpc"


class RpcError(DllmError):
    """An RPC worker is unreachable, speaks another protocol version, or failed mid-run."""


@dataclass(frozen=True)
class Endpoint:
    host: str
    port: int

    def __str__(self) -> str:
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"


def parse_endpoints(text: str) -> tuple[Endpoint, ...]:
    """``"HOST:PORT[,HOST:PORT...]"`` -> endpoints; UsageError names the bad item. IPv6 as ``[::1]:50052``."""
    out = []
    for item in (t.strip() for t in text.split(",")):
        host, sep, port = item.rpartition(":")
        host = host[1:-1] if host.startswith("[") and host.endswith("]") else host
        if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
            raise UsageError(f"--rpc expects HOST:PORT[,HOST:PORT...], got {item[:80]!r}")
        if not _host_name_ok(host):
            raise UsageError(f"--rpc: {clip(host)} is not a host name or IP address",
                             "give HOST:PORT with an address such as 192.168.1.20 or a host name")
        out.append(Endpoint(host, int(port)))
    if len(set(out)) != len(out):
        raise UsageError("--rpc lists a worker twice")
    if len(out) > 16:  # GGML_RPC_MAX_SERVERS
        raise UsageError(f"--rpc takes at most 16 workers, got {len(out)}")
    return tuple(out)


def _host_name_ok(host: str) -> bool:
    """An IP address, or a name the resolver can encode (IDNA: no undecodable bytes, NUL, labels over 63)."""
    try:
        ipaddress.ip_address(host)
        return True
    except ValueError:
        pass
    try:
        host.encode("idna")
    except UnicodeError:
        return False
    return "\0" not in host and not any(c.isspace() for c in host)


def hello(ep: Endpoint, timeout: float = 5.0) -> tuple[int, int, int]:
    """Connect, send HELLO, return the worker's protocol version; RpcError if it cannot be reached or answers
    garbage. The worker serves one client at a time, so the connection is closed at once."""
    try:
        with socket.create_connection((ep.host, ep.port), timeout=timeout) as s:
            s.sendall(struct.pack("<BQ", CMD_HELLO, CONN_CAPS) + bytes(CONN_CAPS))
            head = _recv(s, 8)
            (size,) = struct.unpack("<Q", head)
            if size != 4 + CONN_CAPS:
                raise RpcError(f"RPC worker {ep} answered HELLO with {size} bytes: not a ggml RPC server of protocol "
                               f"{PROTO_MAJOR}.x", _FIX)
            major, minor, patch = _recv(s, size)[:3]
    except OSError as e:
        why = "timed out" if isinstance(e, socket.timeout) else (e.strerror or str(e))
        raise RpcError(f"cannot reach RPC worker {ep}: {why}", _FIX) from None
    return major, minor, patch


def _recv(s: socket.socket, n: int) -> bytes:
    buf = b""
    while len(buf) < n:
        chunk = s.recv(n - len(buf))
        if not chunk:
            raise ConnectionResetError(104, "connection closed by the worker")
        buf += chunk
    return buf


def check(ep: Endpoint) -> None:
    major, minor, patch = hello(ep)
    if major != PROTO_MAJOR or minor > PROTO_MINOR:
        raise RpcError(f"RPC worker {ep} speaks protocol {major}.{minor}.{patch}, this runtime "
                       f"{PROTO_MAJOR}.{PROTO_MINOR}", "run the same dllm version (and patch set) on every machine")


_lock = threading.Lock()
_added: dict[Endpoint, int] = {}  # endpoint -> number of devices it registered


def _lib(rt: Any, name: str) -> ctypes.CDLL:
    libdir = rt.path / "lib"
    for cand in (f"lib{name}.so", f"lib{name}.dylib", f"{name}.dll"):
        if (libdir / cand).exists():
            return ctypes.CDLL(str(libdir / cand))
    raise RpcError(f"the runtime in {libdir} has no {name}", "rebuild it: dllm runtime build --force")


def connect(rt: Any, endpoints: tuple[Endpoint, ...]) -> int:
    """Check every worker, then register its devices with ggml (once per process); returns the device count."""
    for ep in endpoints:
        check(ep)
    rpc = _lib(rt, "ggml-rpc")
    base = _lib(rt, "ggml")
    rpc.ggml_backend_rpc_add_server.restype, rpc.ggml_backend_rpc_add_server.argtypes = ctypes.c_void_p, [ctypes.c_char_p]
    base.ggml_backend_reg_dev_count.restype = ctypes.c_size_t
    base.ggml_backend_reg_dev_count.argtypes = [ctypes.c_void_p]
    base.ggml_backend_reg_dev_get.restype = ctypes.c_void_p
    base.ggml_backend_reg_dev_get.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
    base.ggml_backend_device_register.restype, base.ggml_backend_device_register.argtypes = None, [ctypes.c_void_p]
    with _lock:
        for ep in endpoints:
            if ep not in _added:
                reg = rpc.ggml_backend_rpc_add_server(str(ep).encode())
                if not reg:
                    raise RpcError(f"RPC worker {ep} offers no device", _FIX)
                n = int(base.ggml_backend_reg_dev_count(reg))
                for i in range(n):  # what llama.cpp's --rpc does: make the devices visible to model loading
                    base.ggml_backend_device_register(base.ggml_backend_reg_dev_get(reg, i))
                _added[ep] = n
        return sum(_added[ep] for ep in endpoints)


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def worker_devices(rt: Any, backend: str) -> list[int]:
    """The ggml devices a worker lends: the CPU for ``cpu``, else the runtime's GPUs; RpcError if there are none."""
    base = _lib(rt, "ggml")  # the device registry (it resolves libggml-base's symbols too)
    base.ggml_backend_dev_count.restype = ctypes.c_size_t
    base.ggml_backend_dev_get.restype, base.ggml_backend_dev_get.argtypes = ctypes.c_void_p, [ctypes.c_size_t]
    base.ggml_backend_dev_type.restype, base.ggml_backend_dev_type.argtypes = ctypes.c_int, [ctypes.c_void_p]
    devs = [base.ggml_backend_dev_get(i) for i in range(base.ggml_backend_dev_count())]
    kinds = {d: base.ggml_backend_dev_type(d) for d in devs}  # 0 cpu, 1 gpu, 2 igpu, 3 accel
    chosen = [d for d in devs if (kinds[d] == 0 if backend == "cpu" else kinds[d] in (1, 2))]
    if not chosen:
        raise RpcError(f"this runtime has no {backend} device", "use --backend cpu, or build the runtime for it")
    return chosen


def listen_address(host: str) -> str:
    """The IPv4 address to give ggml's RPC server for ``--host`` (a name is resolved here: ggml takes only a
    dotted IPv4 literal, and would print "Failed to create server socket" after dllm had said "listening").

    RpcError for an IPv6 address, a name that does not resolve to IPv4, or one that cannot be a host name."""
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        ip = None
    if ip is not None:
        if ip.version != 4:
            raise RpcError(f"--host {host}: ggml's RPC server listens on IPv4 addresses only",
                           "use an IPv4 address such as 127.0.0.1, or 0.0.0.0 for every interface")
        return str(ip)
    try:
        infos = socket.getaddrinfo(host, None, socket.AF_INET, socket.SOCK_STREAM)
    except socket.gaierror as e:
        raise RpcError(f"cannot resolve --host {clip(host)}: {(e.strerror or str(e)).lower()}",
                       "give an IPv4 address, or a host name this machine resolves") from None
    except (UnicodeError, ValueError):  # a label over 63 characters, a NUL byte, undecodable bytes
        raise RpcError(f"--host {clip(host)} is not a valid host name", "give an IPv4 address or a host name") from None
    if not infos:
        raise RpcError(f"--host {clip(host)} has no IPv4 address", "give an IPv4 address such as 127.0.0.1")
    return str(infos[0][4][0])


def listen_check(host: str, port: int) -> None:
    """RpcError naming the fix when ``host:port`` cannot be listened on (ggml would only print and return)."""
    try:
        with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            probe.bind((host, port))
            probe.listen(1)
    except OSError as e:
        raise RpcError(f"cannot listen on {host}:{port}: {e.strerror or e}",
                       "pick a free --port or another --host") from None


def serve(rt: Any, host: str, port: int, devices: list[int], threads: int) -> None:
    """Run ggml's RPC server on ``host:port`` lending ``devices`` (``worker_devices``); blocks while it serves.
    ggml prints its banner and per-client lines on stdout, which is pointed at stderr first."""
    rpc = _lib(rt, "ggml-rpc")
    arr = (ctypes.c_void_p * len(devices))(*devices)
    fn = rpc.ggml_backend_rpc_start_server
    fn.restype = None
    fn.argtypes = [ctypes.c_char_p, ctypes.c_char_p, ctypes.c_size_t, ctypes.c_size_t, ctypes.POINTER(ctypes.c_void_p)]
    os.dup2(2, 1)
    fn(f"{host}:{port}".encode(), None, threads, len(devices), arr)
    raise RpcError(f"ggml's RPC server on {host}:{port} stopped", "see the messages above; pick another --port")
