"""llama.cpp's RPC backend (ggml-rpc): workers that hold some of a model's layers and compute
them for a client, through ctypes (llama-cpp-python binds none of it).

Why a Python handshake first: the native client (``ggml_backend_rpc_add_server``) aborts the
whole process when an endpoint does not answer, when its handshake fails or its version
differs, and a worker serves one client at a time (a second client waits in the handshake,
forever). ``probe`` speaks the protocol's first commands itself, with a timeout, and turns each
of those cases into a typed error naming the worker, before the native client is ever asked.

The wire format, as this llama.cpp build (0c1e570) speaks it; every message is packed,
little-endian:

- request: 1 byte command, u64 payload size, payload; reply: u64 size, payload;
- HELLO (command 14) is the first command of every connection: payload 24 bytes of transport
  capabilities (zeros: plain TCP); reply 28 bytes: major, minor, patch, padding, 24 bytes of
  capabilities. The client accepts a worker whose major equals its own and whose minor is not
  newer;
- DEVICE_COUNT (15): no payload; reply u32;
- GET_DEVICE_MEMORY (11): payload u32 device; reply u64 free, u64 total.

The protocol has neither authentication nor encryption: a worker runs whatever graph a client
sends and holds whatever it is given. Only run one on a trusted network.

Library module: no printing; errors are ``infer_cli.errors`` types.
"""

from __future__ import annotations

import ctypes
import ipaddress
import os
import socket
import struct
from dataclasses import dataclass, field

from infer_cli.engine.binding import RPC_PROTOCOL, native_library, require
from infer_cli.errors import (BadOption, RpcUnavailable, WorkerBusy, WorkerUnreachable,
                              WorkerVersionMismatch)

PROTOCOL = RPC_PROTOCOL  # what this build's libggml-rpc speaks
DEFAULT_PORT = 50052
PROBE_TIMEOUT = 3.0

CMD_GET_DEVICE_MEMORY = 11
CMD_HELLO = 14
CMD_DEVICE_COUNT = 15
CAPS_SIZE = 24
_HELLO_REPLY = struct.Struct("<BBBB24s")
_MEMORY_REPLY = struct.Struct("<QQ")


# ----------------------------------------------------------------------------------------------
# Endpoints


@dataclass(frozen=True)
class Endpoint:
    host: str
    port: int

    def __str__(self) -> str:
        return f"{self.host}:{self.port}"

    @property
    def loopback(self) -> bool:
        if self.host == "localhost":
            return True
        try:
            return ipaddress.ip_address(self.host).is_loopback
        except ValueError:
            return False


def parse_endpoint(text: str, option: str = "--rpc") -> Endpoint:
    """'HOST:PORT' -> Endpoint; BadOption for anything llama.cpp could not connect to (no port,
    port 0 or above 65535, an IPv6 address: llama.cpp splits at the first colon)."""
    raw = text.strip()
    expected = "HOST:PORT with a port from 1 to 65535 (e.g. 192.168.1.20:50052)"
    host, sep, port = raw.partition(":")
    if not sep or not host or not port or ":" in port or any(c.isspace() for c in raw):
        raise BadOption(option, repr(text), expected)
    if not port.isdigit() or not 1 <= int(port) <= 65535:
        raise BadOption(option, repr(text), expected)
    return Endpoint(host, int(port))


def parse_endpoints(value, option: str = "--rpc") -> tuple[Endpoint, ...]:
    """'a:1,b:2' (or a list of such strings) -> endpoints, in order; each at most once."""
    items = value if isinstance(value, (list, tuple)) else [value]
    out: list[Endpoint] = []
    for item in items:
        if isinstance(item, Endpoint):
            out.append(item)
            continue
        for part in str(item).split(","):
            if part.strip():
                out.append(parse_endpoint(part, option))
    seen = set()
    for ep in out:
        if str(ep) in seen:
            raise BadOption(option, str(ep), "each worker once (one worker serves one client)")
        seen.add(str(ep))
    return tuple(out)


# ----------------------------------------------------------------------------------------------
# The handshake, in Python


@dataclass(frozen=True)
class DeviceMemory:
    free: int
    total: int


@dataclass(frozen=True)
class WorkerInfo:
    """What a worker said in a probe: its protocol version and the memory of each device."""

    endpoint: Endpoint
    version: tuple[int, int, int]
    devices: tuple[DeviceMemory, ...] = field(default_factory=tuple)

    @property
    def free(self) -> int:
        return sum(d.free for d in self.devices)

    @property
    def total(self) -> int:
        return sum(d.total for d in self.devices)


def _recv_exact(sock: socket.socket, n: int) -> bytes:
    buf = bytearray()
    while len(buf) < n:
        chunk = sock.recv(n - len(buf))
        if not chunk:
            raise ConnectionError("the worker closed the connection")
        buf += chunk
    return bytes(buf)


def _command(sock: socket.socket, cmd: int, payload: bytes, reply_size: int) -> bytes:
    sock.sendall(struct.pack("<BQ", cmd, len(payload)) + payload)
    (size,) = struct.unpack("<Q", _recv_exact(sock, 8))
    if size != reply_size:
        raise ValueError(f"a {size}-byte reply where {reply_size} were expected")
    return _recv_exact(sock, size)


def _reset_close(sock: socket.socket) -> None:
    """Close with a reset, not a FIN. A worker that accepts this connection later (it was
    queued behind another client) then fails its first read and never writes to a closed
    socket, which would kill a worker that does not ignore SIGPIPE."""
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    except OSError:
        pass
    sock.close()


def probe(endpoint: Endpoint | str, timeout: float = PROBE_TIMEOUT) -> WorkerInfo:
    """Connect, say HELLO, ask for the devices and their memory, disconnect.

    WorkerUnreachable: nothing listens there, or the host does not answer within ``timeout``;
    WorkerBusy: the connection was accepted but the handshake got no answer within ``timeout``
    (the worker is serving another client); WorkerVersionMismatch: another protocol version, or
    a reply that is not this protocol at all."""
    ep = endpoint if isinstance(endpoint, Endpoint) else parse_endpoint(endpoint)
    try:
        sock = socket.create_connection((ep.host, ep.port), timeout=timeout)
    except socket.gaierror as e:
        raise WorkerUnreachable(str(ep), f"unknown host ({e.strerror or e})") from None
    except TimeoutError:
        raise WorkerUnreachable(str(ep), f"no answer within {timeout:g} s") from None
    except OSError as e:
        raise WorkerUnreachable(str(ep), e.strerror or str(e)) from None
    clean = False
    try:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        try:
            reply = _command(sock, CMD_HELLO, bytes(CAPS_SIZE), _HELLO_REPLY.size)
        except TimeoutError:
            raise WorkerBusy(str(ep), timeout) from None
        except ValueError as e:
            raise WorkerVersionMismatch(str(ep), None, PROTOCOL, f"not an RPC worker of this protocol: {e}") from None
        except OSError as e:
            raise WorkerUnreachable(str(ep), f"the handshake failed: {e.strerror or e}") from None
        major, minor, patch, _, _ = _HELLO_REPLY.unpack(reply)
        if major != PROTOCOL[0] or minor > PROTOCOL[1]:
            raise WorkerVersionMismatch(str(ep), (major, minor, patch), PROTOCOL)
        try:
            (count,) = struct.unpack("<I", _command(sock, CMD_DEVICE_COUNT, b"", 4))
            devices = []
            for dev in range(min(count, 64)):
                free, total = _MEMORY_REPLY.unpack(
                    _command(sock, CMD_GET_DEVICE_MEMORY, struct.pack("<I", dev), _MEMORY_REPLY.size))
                devices.append(DeviceMemory(free, total))
        except (OSError, ValueError) as e:
            raise WorkerUnreachable(str(ep), f"it stopped answering after the handshake ({e})") from None
        clean = True
        return WorkerInfo(ep, (major, minor, patch), tuple(devices))
    finally:
        if clean:
            sock.close()
        else:
            _reset_close(sock)


def probe_all(endpoints, timeout: float = PROBE_TIMEOUT) -> list[WorkerInfo]:
    """``probe`` each endpoint in order; the first failure raises (naming its worker)."""
    return [probe(ep, timeout) for ep in parse_endpoints(endpoints)]


def alive(endpoint: Endpoint | str, timeout: float = 1.0) -> bool:
    """Whether something still accepts connections at ``endpoint`` (no handshake: a worker busy
    with this very process would not answer one)."""
    ep = endpoint if isinstance(endpoint, Endpoint) else parse_endpoint(endpoint)
    try:
        socket.create_connection((ep.host, ep.port), timeout=timeout).close()
        return True
    except OSError:
        return False


def addresses(endpoints) -> dict[str, tuple[frozenset, int]]:
    """Each endpoint's name -> (the IP addresses its host resolves to, its port), resolved once
    for ``connected`` (which runs every second and should not ask a name server each time)."""
    out = {}
    for ep in parse_endpoints(endpoints):
        try:
            ips = frozenset(ai[4][0] for ai in socket.getaddrinfo(ep.host, ep.port,
                                                                   proto=socket.IPPROTO_TCP))
        except OSError:
            ips = frozenset()
        out[str(ep)] = (ips, ep.port)
    return out


def connected(pid: int, targets: dict[str, tuple[frozenset, int]]) -> set[str] | None:
    """The endpoints (of ``addresses``) to which process ``pid`` holds an established TCP
    connection, as the kernel sees it; None when the system will not say (no such process, no
    permission). A worker that exits or is killed closes its end: the client's socket leaves
    ESTABLISHED at once (CLOSE_WAIT after its FIN, gone after a reset), long before the client
    writes to it again."""
    import psutil

    try:
        proc = psutil.Process(pid)
        conns = (getattr(proc, "net_connections", None) or proc.connections)(kind="tcp")
    except (psutil.Error, OSError):
        return None
    held = set()
    for c in conns:
        if c.status != psutil.CONN_ESTABLISHED or not c.raddr:
            continue
        for name, (ips, port) in targets.items():
            if c.raddr.port == port and c.raddr.ip in ips:
                held.add(name)
    return held


# ----------------------------------------------------------------------------------------------
# The native library


class _Libs:
    def __init__(self, llama_cpp):
        self.rpc = native_library(llama_cpp, "libggml-rpc")
        self.ggml = native_library(llama_cpp, "libggml")
        if self.rpc is None or self.ggml is None:
            return
        r, g = self.rpc, self.ggml
        vp, cp, sz = ctypes.c_void_p, ctypes.c_char_p, ctypes.c_size_t
        r.ggml_backend_rpc_add_server.restype, r.ggml_backend_rpc_add_server.argtypes = vp, [cp]
        r.ggml_backend_rpc_start_server.restype = None
        r.ggml_backend_rpc_start_server.argtypes = [cp, cp, sz, sz, ctypes.POINTER(vp)]
        g.ggml_backend_dev_count.restype, g.ggml_backend_dev_count.argtypes = sz, []
        g.ggml_backend_dev_get.restype, g.ggml_backend_dev_get.argtypes = vp, [sz]
        g.ggml_backend_reg_dev_count.restype, g.ggml_backend_reg_dev_count.argtypes = sz, [vp]
        g.ggml_backend_reg_dev_get.restype, g.ggml_backend_reg_dev_get.argtypes = vp, [vp, sz]
        g.ggml_backend_dev_name.restype, g.ggml_backend_dev_name.argtypes = cp, [vp]
        g.ggml_backend_dev_description.restype, g.ggml_backend_dev_description.argtypes = cp, [vp]
        g.ggml_backend_dev_memory.restype = None
        g.ggml_backend_dev_memory.argtypes = [vp, ctypes.POINTER(sz), ctypes.POINTER(sz)]


_LIBS: _Libs | None = None


def _libs() -> _Libs:
    global _LIBS
    if _LIBS is None:
        _LIBS = _Libs(require())
    return _LIBS


def available() -> bool:
    """Whether the installed llama.cpp build carries the RPC backend (libggml-rpc)."""
    try:
        return _libs().rpc is not None
    except Exception:  # noqa: BLE001 - a broken install is reported elsewhere
        return False


def _require_rpc() -> _Libs:
    libs = _libs()
    if libs.rpc is None:
        raise RpcUnavailable()
    return libs


@dataclass(frozen=True)
class LocalDevice:
    name: str
    description: str
    free: int
    total: int
    handle: int = 0


def device_memory(dev: int) -> DeviceMemory:
    """``ggml_backend_dev_memory`` of a device handle (a local one, or a client device of a
    worker: it asks the worker)."""
    g = _libs().ggml
    free, total = ctypes.c_size_t(0), ctypes.c_size_t(0)
    g.ggml_backend_dev_memory(dev, ctypes.byref(free), ctypes.byref(total))
    return DeviceMemory(free.value, total.value)


def local_devices() -> list[LocalDevice]:
    """This machine's ggml devices (CPU, CUDA0, ...), with their memory."""
    import llama_cpp

    llama_cpp.llama_backend_init()
    g = _libs().ggml
    out = []
    for i in range(g.ggml_backend_dev_count()):
        h = g.ggml_backend_dev_get(i)
        name = (g.ggml_backend_dev_name(h) or b"").decode(errors="replace")
        if name.upper().startswith("RPC"):
            continue
        mem = device_memory(h)
        out.append(LocalDevice(name, (g.ggml_backend_dev_description(h) or b"").decode(errors="replace"),
                               mem.free, mem.total, h))
    return out


def pick_devices(names: list[str] | None) -> list[LocalDevice]:
    """The local devices a worker offers: those named (CPU, CUDA0, ...; case-insensitive), or
    the first GPU when there is one, else the CPU (what llama.cpp's rpc-server picks)."""
    devices = local_devices()
    if not names:
        gpus = [d for d in devices if d.name.upper() != "CPU"]
        return gpus[:1] or [d for d in devices if d.name.upper() == "CPU"][:1]
    by_name = {d.name.upper(): d for d in devices}
    picked = []
    for n in names:
        d = by_name.get(n.strip().upper())
        if d is None:
            raise BadOption("--device", n, "one of " + ", ".join(d.name for d in devices))
        if d not in picked:
            picked.append(d)
    return picked


def serve_worker(endpoint: Endpoint, devices: list[LocalDevice], *, threads: int,
                 cache_dir: str | None = None) -> None:
    """Run a worker on ``endpoint`` serving ``devices``: blocks in llama.cpp for as long as the
    process lives (it returns only when the socket cannot be created). llama.cpp prints its
    banner and each client's arrival and departure on stdout."""
    libs = _require_rpc()
    arr = (ctypes.c_void_p * len(devices))(*[d.handle for d in devices])
    libs.rpc.ggml_backend_rpc_start_server(str(endpoint).encode(),
                                           cache_dir.encode() if cache_dir else None,
                                           max(1, threads), len(devices), arr)


# ----------------------------------------------------------------------------------------------
# Client devices


@dataclass
class ClientDevices:
    """The client devices (RPC0, RPC1, ...) of some workers, as llama_model_params.devices wants
    them: a NULL-terminated array, kept alive here for as long as the model loads."""

    workers: list[WorkerInfo]
    handles: list[int]
    names: list[str]
    owner: list[str]                  # the endpoint of each device
    array: object = None

    @property
    def pointer(self) -> int:
        return ctypes.cast(self.array, ctypes.c_void_p).value


_ADDED: dict[str, list[int]] = {}


def client_devices(endpoints, timeout: float = PROBE_TIMEOUT) -> ClientDevices:
    """Probe every endpoint (each failure is a typed error naming its worker), then add each
    one as a client device through llama.cpp. Adding is safe only after a probe succeeded: the
    native call aborts the process on any failure."""
    libs = _require_rpc()
    import llama_cpp

    llama_cpp.llama_backend_init()
    workers = probe_all(endpoints, timeout)
    handles, names, owner = [], [], []
    g = libs.ggml
    for w in workers:
        key = str(w.endpoint)
        if key not in _ADDED:
            reg = libs.rpc.ggml_backend_rpc_add_server(key.encode())
            if not reg:
                raise WorkerUnreachable(key, "it offers no device")
            _ADDED[key] = [g.ggml_backend_reg_dev_get(reg, i) for i in range(g.ggml_backend_reg_dev_count(reg))]
        for h in _ADDED[key]:
            handles.append(h)
            names.append((g.ggml_backend_dev_name(h) or b"").decode(errors="replace"))
            owner.append(key)
    arr = (ctypes.c_void_p * (len(handles) + 1))(*handles, None)
    return ClientDevices(workers, handles, names, owner, arr)
