"""The load client of ``bench_server.py``: one Trio process, N connections.

It is the same client for every server (the bare echo server and
trio_aggregates' server), so their ratio is fair. The parent
(``bench_server.py``) starts it as a subprocess and drives it with JSON
lines on its stdin; it answers each with one JSON line on stdout:

* ``{"cmd": "setup", "type": T, "accounts": N}``: create the accounts
  ``acct-0`` .. ``acct-{N-1}`` (``create`` ``OpenAccount``; ``already_exists``
  is fine), not timed.
* ``{"cmd": "run", "workload": W, "depth": D, "start_ns": S, "warmup": s,
  "duration": s, "type": T, "accounts": N}``: at ``time.monotonic_ns() == S``
  every connection sends ``D`` requests, then one new request for each answer
  (a closed loop: ``D`` requests in flight per connection). Answers that
  arrive in ``[S + warmup, S + warmup + duration)`` are counted, with their
  latency (from the ``send_all`` that carried the request to the receive
  that brought its answer) in a histogram of whole microseconds. At the end
  of the window no new request is sent and the connections drain.
* ``{"cmd": "balances", "type": T, "accounts": N}``: the sum of the
  accounts' balances (``GetBalance``), and the number of deposits this
  client saw acknowledged, for the parent's check that the work was real.
* ``{"cmd": "quit"}``.

Requests are built from bytes templates (``b"..." % (id, key)``); answers
are read without ``json.loads`` when they start with ``{"id":`` (the id and
the ``ok`` flag are sliced out), and parsed in full otherwise or when they
are errors (to count them by code). The client measures its own CPU time and
the server's (``/proc/PID/stat``) over the window, so the parent can tell
which side was saturated.
"""

from __future__ import annotations

import argparse
import json
import os
import select
import socket
import sys
import time
from typing import Any

import trio

_RECEIVE_SIZE = 65536
_CLOCK_TICK = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100

#: Request templates by workload: ``@TYPE@`` and ``@KEY@`` are baked in by
#: :func:`bake`, which leaves one ``%d`` for the id.
TEMPLATES: dict[str, bytes] = {
    "deposit": (
        b'{"id":%d,"op":"execute","type":"@TYPE@","key":"@KEY@",'
        b'"command":"Deposit","data":{"amount":1}}\n'
    ),
    "balance": (
        b'{"id":%d,"op":"execute","type":"@TYPE@","key":"@KEY@","command":"GetBalance","data":{}}\n'
    ),
    "ping": b'{"id":%d,"op":"ping"}\n',
    "create": (
        b'{"id":%d,"op":"create","type":"@TYPE@","key":"@KEY@",'
        b'"command":"OpenAccount","data":{"owner":"bench"}}\n'
    ),
}

#: The step between the keys one connection uses in turn (coprime with 1,000).
KEY_STRIDE = 7


def account_keys(n: int) -> list[bytes]:
    return [b"acct-%d" % i for i in range(n)]


def bake(workload: str, type_name: bytes, key: bytes) -> bytes:
    """The request template of ``workload`` for one key: ``result % id`` is a line."""
    return TEMPLATES[workload].replace(b"@TYPE@", type_name).replace(b"@KEY@", key)


def process_cpu_seconds(pid: int) -> float | None:
    """User + system CPU seconds of process ``pid`` (all its threads), or None."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            fields = f.read().rsplit(b")", 1)[1].split()
    except OSError:
        return None
    # fields[0] is the state (field 3); utime and stime are fields 14 and 15
    return (int(fields[11]) + int(fields[12])) / _CLOCK_TICK


def machine_busy_seconds() -> float | None:
    """CPU seconds all processes on the machine have used (``/proc/stat``), or None."""
    try:
        with open("/proc/stat", "rb") as f:
            fields = [int(x) for x in f.readline().split()[1:]]
    except (OSError, ValueError):
        return None
    idle = fields[3] + (fields[4] if len(fields) > 4 else 0)  # idle + iowait
    return (sum(fields[:8]) - idle) / _CLOCK_TICK


class CellError(Exception):
    """The server answered something the client cannot match to a request."""


class Client:
    def __init__(self, host: str, port: int, connections: int, server_pid: int, index: int) -> None:
        self.host = host
        self.port = port
        self.n_connections = connections
        self.server_pid = server_pid
        self.index = index
        self.streams: list[trio.SocketStream] = []
        self.acked_deposits = 0

    async def connect(self) -> None:
        for _ in range(self.n_connections):
            stream = await trio.open_tcp_stream(self.host, self.port)
            self.streams.append(stream)

    async def aclose(self) -> None:
        for stream in self.streams:
            await stream.aclose()

    # -- one batch of requests per connection, answers parsed in full (not timed) --

    async def _exchange(self, stream: trio.SocketStream, lines: list[bytes]) -> list[Any]:
        answers: list[Any] = []
        buf = b""
        await stream.send_all(b"".join(lines))
        while len(answers) < len(lines):
            data = await stream.receive_some(_RECEIVE_SIZE)
            if not data:
                raise CellError("the server closed the connection")
            parts = (buf + data).split(b"\n")
            buf = parts.pop()
            answers.extend(json.loads(p) for p in parts if p.strip())
        return answers

    async def exchange_all(self, lines: list[bytes]) -> list[Any]:
        """Send ``lines`` spread over the connections (at most 16 at once on each)."""
        results: list[Any] = []
        per: list[list[bytes]] = [[] for _ in self.streams]
        for n, line in enumerate(lines):
            per[n % len(per)].append(line)

        async def one(stream: trio.SocketStream, mine: list[bytes]) -> None:
            for start in range(0, len(mine), 16):
                results.extend(await self._exchange(stream, mine[start : start + 16]))

        async with trio.open_nursery() as nursery:
            for stream, mine in zip(self.streams, per, strict=True):
                if mine:
                    nursery.start_soon(one, stream, mine)
        return results

    async def setup(self, cmd: dict[str, Any]) -> dict[str, Any]:
        type_name = cmd["type"].encode()
        keys = account_keys(cmd["accounts"])
        lines = [bake("create", type_name, key) % n for n, key in enumerate(keys)]
        answers = await self.exchange_all(lines)
        bad = [a for a in answers if not a.get("ok") and a["error"]["code"] != "already_exists"]
        if bad:
            raise CellError(f"creating the accounts failed: {bad[:3]}")
        return {"created": len(answers)}

    async def balances(self, cmd: dict[str, Any]) -> dict[str, Any]:
        type_name = cmd["type"].encode()
        keys = account_keys(cmd["accounts"])
        lines = [bake("balance", type_name, key) % n for n, key in enumerate(keys)]
        answers = await self.exchange_all(lines)
        bad = [a for a in answers if not a.get("ok")]
        if bad:
            raise CellError(f"reading the balances failed: {bad[:3]}")
        total = sum(a["result"] or 0 for a in answers)
        return {"total": total, "acked_deposits": self.acked_deposits}

    # -- the timed closed loop, on epoll (the default) -------------------------------

    def run_epoll(self, cmd: dict[str, Any]) -> dict[str, Any]:
        """The closed loop on raw non-blocking sockets and ``select.epoll``.

        The same requests, the same measurements as :meth:`run`, without Trio's
        scheduling per receive and send (about a third of the client's CPU per
        request): the client must stay cheaper than the servers it measures.
        It blocks the Trio loop for the cell, which has nothing else to do.
        """
        workload: str = cmd["workload"]
        depth: int = cmd["depth"]
        start_ns: int = cmd["start_ns"]
        w0 = start_ns + int(cmd["warmup"] * 1e9)
        w1 = w0 + int(cmd["duration"] * 1e9)
        type_name = cmd["type"].encode()
        if workload == "ping":
            templates = [TEMPLATES["ping"]]
        else:
            templates = [bake(workload, type_name, key) for key in account_keys(cmd["accounts"])]
        n_templates = len(templates)
        hist: dict[int, int] = {}
        errors: dict[str, int] = {}
        cpu: dict[str, float | None] = {}
        now = time.monotonic_ns
        loads = json.loads
        EPOLLIN, EPOLLOUT = select.EPOLLIN, select.EPOLLOUT

        socks: dict[int, socket.socket] = {}
        sent: dict[int, dict[int, int]] = {}
        next_ids: dict[int, int] = {}
        positions: dict[int, int] = {}
        bufs: dict[int, bytes] = {}
        pending: dict[int, bytes] = {}  # bytes a partial send left over
        epoll = select.epoll()
        in_window = 0
        ok_total = 0
        try:
            for conn, stream in enumerate(self.streams):
                sock = socket.socket(fileno=os.dup(stream.socket.fileno()))
                sock.setblocking(False)
                fd = sock.fileno()
                socks[fd] = sock
                sent[fd] = {}
                next_ids[fd] = 0
                positions[fd] = (conn * 10 + self.index * 1009) % n_templates
                bufs[fd] = b""
                epoll.register(fd, EPOLLIN)
            time.sleep(max(0.0, (start_ns - now()) / 1e9))

            def send(fd: int, data: bytes) -> None:
                if fd in pending:
                    pending[fd] += data
                    return
                try:
                    n = socks[fd].send(data)
                except BlockingIOError:
                    n = 0
                if n < len(data):
                    pending[fd] = data[n:]
                    epoll.modify(fd, EPOLLIN | EPOLLOUT)

            t = now()
            for fd in socks:
                out = []
                mine = sent[fd]
                k = positions[fd]
                i = next_ids[fd]
                for _ in range(depth):
                    out.append(templates[k] % i)
                    mine[i] = t
                    i += 1
                    k = (k + KEY_STRIDE) % n_templates
                positions[fd] = k
                next_ids[fd] = i
                send(fd, b"".join(out))
            active = len(socks)
            marks = [w0, w1]
            samples: list[tuple[float, float | None, float | None, float]] = []
            give_up = w1 + 30_000_000_000  # answers still missing 30 s after the window
            while active:
                t = now()
                if t > give_up:
                    raise CellError(f"{sum(map(len, sent.values()))} answers still missing")
                events = epoll.poll(max(0.0, ((marks[0] if marks else give_up) - t) / 1e9))
                t = now()
                if marks and t >= marks[0]:
                    marks.pop(0)
                    samples.append(
                        (
                            time.process_time(),
                            process_cpu_seconds(self.server_pid),
                            machine_busy_seconds(),
                            time.monotonic(),
                        )
                    )
                counting = w0 <= t < w1
                sending = t < w1
                for fd, event in events:
                    if event & EPOLLOUT:
                        data = pending.pop(fd)
                        epoll.modify(fd, EPOLLIN)
                        send(fd, data)
                    if not event & EPOLLIN:
                        if event & (select.EPOLLHUP | select.EPOLLERR):
                            raise CellError("the server closed the connection")
                        continue
                    try:
                        data = socks[fd].recv(_RECEIVE_SIZE)
                    except BlockingIOError:
                        continue
                    if not data:
                        raise CellError("the server closed the connection")
                    buf = bufs[fd]
                    if buf:
                        data = buf + data
                    lines = data.split(b"\n")
                    bufs[fd] = lines.pop()
                    mine = sent[fd]
                    out = []
                    k = positions[fd]
                    i = next_ids[fd]
                    for line in lines:
                        ok = False
                        rid = -1
                        if line.startswith(b'{"id":'):
                            comma = line.find(b",", 6)
                            try:
                                rid = int(line[6:comma])
                            except ValueError:
                                rid = -1
                            else:
                                j = line.find(b'"ok":', comma) + 5
                                if line[j] == 32:  # a space after the colon
                                    j += 1
                                ok = line[j] == 116  # "t" of true
                        if rid < 0 or not ok:
                            if not line.strip():
                                continue
                            answer = loads(line)
                            rid_any = answer.get("id")
                            if not isinstance(rid_any, int):
                                raise CellError(f"an answer without our id: {line[:300]!r}")
                            rid = rid_any
                            ok = answer.get("ok") is True
                            if not ok:
                                code = answer.get("error", {}).get("code", "?")
                                errors[code] = errors.get(code, 0) + 1
                        t_sent = mine.pop(rid)
                        if ok:
                            ok_total += 1
                            if counting:
                                in_window += 1
                                lat = (t - t_sent) // 1000
                                hist[lat] = hist.get(lat, 0) + 1
                        if sending:
                            out.append(templates[k] % i)
                            mine[i] = t
                            i += 1
                            k = (k + KEY_STRIDE) % n_templates
                    positions[fd] = k
                    next_ids[fd] = i
                    if out:
                        send(fd, b"".join(out))
                    elif not mine and not sending:
                        active -= 1
                        epoll.unregister(fd)
        finally:
            epoll.close()
            for sock in socks.values():
                sock.close()
        if len(samples) == 2:
            (c0, s0, m0, t0), (c1, s1, m1, t1) = samples
            cpu["client"] = (c1 - c0) / (t1 - t0)
            cpu["server"] = None if s0 is None or s1 is None else (s1 - s0) / (t1 - t0)
            cpu["machine"] = None if m0 is None or m1 is None else (m1 - m0) / (t1 - t0)
        if workload == "deposit":
            self.acked_deposits += ok_total
        return {
            "count": in_window,
            "seconds": (w1 - w0) / 1e9,
            "ok_total": ok_total,
            "errors": errors,
            "hist": hist,
            "client_cpu": cpu.get("client"),
            "server_cpu": cpu.get("server"),
            "machine_cpu": cpu.get("machine"),
        }

    # -- the timed closed loop, on Trio (--impl trio) ---------------------------------

    async def run(self, cmd: dict[str, Any]) -> dict[str, Any]:
        workload: str = cmd["workload"]
        depth: int = cmd["depth"]
        start_ns: int = cmd["start_ns"]
        w0 = start_ns + int(cmd["warmup"] * 1e9)
        w1 = w0 + int(cmd["duration"] * 1e9)
        type_name = cmd["type"].encode()
        if workload == "ping":
            templates = [TEMPLATES["ping"]]
        else:
            templates = [bake(workload, type_name, key) for key in account_keys(cmd["accounts"])]
        hist: dict[int, int] = {}
        errors: dict[str, int] = {}
        counts = [0, 0]  # ok answers in the window, all ok answers
        cpu: dict[str, float | None] = {}

        async def monitor() -> None:
            await trio.sleep(max(0.0, (w0 - time.monotonic_ns()) / 1e9))
            c0, s0, m0 = (
                time.process_time(),
                process_cpu_seconds(self.server_pid),
                machine_busy_seconds(),
            )
            t0 = time.monotonic()
            await trio.sleep(max(0.0, (w1 - time.monotonic_ns()) / 1e9))
            c1, s1, m1 = (
                time.process_time(),
                process_cpu_seconds(self.server_pid),
                machine_busy_seconds(),
            )
            t1 = time.monotonic()
            cpu["client"] = (c1 - c0) / (t1 - t0)
            cpu["server"] = None if s0 is None or s1 is None else (s1 - s0) / (t1 - t0)
            cpu["machine"] = None if m0 is None or m1 is None else (m1 - m0) / (t1 - t0)

        async def drive(stream: trio.SocketStream, conn: int) -> None:
            now = time.monotonic_ns
            loads = json.loads
            n_templates = len(templates)
            k = (conn * 10 + self.index * 1009) % n_templates
            sent: dict[int, int] = {}
            next_id = 0
            in_window = 0
            ok_total = 0
            out = []
            t = now()
            for _ in range(depth):
                out.append(templates[k] % next_id)
                sent[next_id] = t
                next_id += 1
                k = (k + KEY_STRIDE) % n_templates
            await stream.send_all(b"".join(out))
            buf = b""
            while sent:
                data = await stream.receive_some(_RECEIVE_SIZE)
                if not data:
                    raise CellError("the server closed the connection")
                t = now()
                if buf:
                    data = buf + data
                lines = data.split(b"\n")
                buf = lines.pop()
                counting = w0 <= t < w1
                sending = t < w1
                out = []
                for line in lines:
                    ok = False
                    rid = -1
                    if line.startswith(b'{"id":'):
                        comma = line.find(b",", 6)
                        try:
                            rid = int(line[6:comma])
                        except ValueError:
                            rid = -1
                        else:
                            j = line.find(b'"ok":', comma) + 5
                            if line[j] == 32:  # a space after the colon
                                j += 1
                            ok = line[j] == 116  # "t" of true
                    if rid < 0 or not ok:
                        if not line.strip():
                            continue
                        answer = loads(line)
                        rid_any = answer.get("id")
                        if not isinstance(rid_any, int):
                            raise CellError(f"an answer without our id: {line[:300]!r}")
                        rid = rid_any
                        ok = answer.get("ok") is True
                        if not ok:
                            code = answer.get("error", {}).get("code", "?")
                            errors[code] = errors.get(code, 0) + 1
                    t_sent = sent.pop(rid)
                    if ok:
                        ok_total += 1
                        if counting:
                            in_window += 1
                            lat = (t - t_sent) // 1000
                            hist[lat] = hist.get(lat, 0) + 1
                    if sending:
                        out.append(templates[k] % next_id)
                        sent[next_id] = t
                        next_id += 1
                        k = (k + KEY_STRIDE) % n_templates
                if out:
                    await stream.send_all(b"".join(out))
            counts[0] += in_window
            counts[1] += ok_total

        await trio.sleep(max(0.0, (start_ns - time.monotonic_ns()) / 1e9))
        # answers still missing 30 s after the window: TooSlowError
        with trio.fail_after((w1 - time.monotonic_ns()) / 1e9 + 30):
            async with trio.open_nursery() as nursery:
                nursery.start_soon(monitor)
                for conn, stream in enumerate(self.streams):
                    nursery.start_soon(drive, stream, conn)
        if workload == "deposit":
            self.acked_deposits += counts[1]
        return {
            "count": counts[0],
            "seconds": (w1 - w0) / 1e9,
            "ok_total": counts[1],
            "errors": errors,
            "hist": hist,
            "client_cpu": cpu.get("client"),
            "server_cpu": cpu.get("server"),
            "machine_cpu": cpu.get("machine"),
        }


async def main_async(args: argparse.Namespace) -> None:
    client = Client(args.host, args.port, args.connections, args.server_pid, args.index)
    await client.connect()
    reply({"ready": True})
    try:
        while True:
            line = await trio.to_thread.run_sync(sys.stdin.readline)
            if not line:
                return
            cmd = json.loads(line)
            what = cmd["cmd"]
            if what == "quit":
                return
            try:
                if what == "setup":
                    reply(await client.setup(cmd))
                elif what == "run" and args.impl == "trio":
                    reply(await client.run(cmd))
                elif what == "run":
                    reply(client.run_epoll(cmd))
                elif what == "balances":
                    reply(await client.balances(cmd))
                else:
                    reply({"error": f"unknown command {what!r}"})
            except (CellError, OSError, trio.BrokenResourceError, trio.TooSlowError) as exc:
                reply({"error": f"{type(exc).__name__}: {exc}"})
                return
    finally:
        with trio.CancelScope(shield=True):
            await client.aclose()


def reply(data: dict[str, Any]) -> None:
    sys.stdout.write(json.dumps(data) + "\n")
    sys.stdout.flush()


def main() -> None:
    parser = argparse.ArgumentParser(description="bench_server.py's load client")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--connections", type=int, default=100)
    parser.add_argument("--server-pid", type=int, required=True)
    parser.add_argument("--index", type=int, default=0, help="this client's number (0, 1, ...)")
    parser.add_argument("--impl", choices=["epoll", "trio"], default="epoll")
    trio.run(main_async, parser.parse_args())


if __name__ == "__main__":
    main()
