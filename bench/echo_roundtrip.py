"""Echo round trips through a real master, against a raw rpyc + NaCl echo of the same frame size.

    .venv/bin/python bench/echo_roundtrip.py [--n 300] [--warmup 20] [--message hello]

Prints figures, asserts nothing. Three series, interleaved so machine noise hits them alike:

  ombot echo   Router.submit("echo") + Router.follow until finished: the whole client library and
               master path, replay cache and job records on, as the bot and the CLI use it.
  ombot health one signed+sealed `health` request: the envelope and rpyc, without the job machinery.
  raw echo     a tiny rpyc service in its own process whose one method opens a Box frame and seals
               the same bytes back; the frame is as large as an OMBot submit frame.

The issue's goal: ombot echo p50 <= 5 ms and <= 4x the raw echo.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
from bench.runs import timed as timed_s  # noqa: E402  (after the path it is found on)


# -- the raw baseline: its own process, nothing of OMBot imported ------------------------------------


def serve_raw(ready_file: Path) -> None:
    """An rpyc service with one method: open a Box frame (sender key | Box), seal the plaintext back."""
    import rpyc
    from nacl.public import Box, PrivateKey, PublicKey
    from rpyc.utils.server import ThreadedServer

    key = PrivateKey.generate()
    boxes: dict[bytes, Box] = {}  # precomputed per sender, as the master's Opener does

    class RawEcho(rpyc.Service):
        def exposed_echo(self, frame: bytes) -> bytes:
            sender = frame[:32]
            box = boxes.get(sender) or boxes.setdefault(sender, Box(key, PublicKey(sender)))
            return bytes(box.encrypt(box.decrypt(frame[32:])))

    server = ThreadedServer(RawEcho(), hostname="127.0.0.1", port=0, protocol_config={"allow_pickle": False})
    ready_file.write_text(f"{server.listener.getsockname()[1]} {bytes(key.public_key).hex()}\n")
    server.start()


class RawClient:
    def __init__(self, ready_file: Path, payload_size: int) -> None:
        import rpyc
        from nacl.public import Box, PrivateKey, PublicKey

        self.proc = subprocess.Popen([sys.executable, __file__, "--raw-server", str(ready_file)])
        deadline = time.monotonic() + 30
        while not ready_file.exists() or not ready_file.read_text().endswith("\n"):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError("the raw echo server did not start")
            time.sleep(0.05)
        port, server_key = ready_file.read_text().split()
        me = PrivateKey.generate()
        self.box, self.me = Box(me, PublicKey(bytes.fromhex(server_key))), bytes(me.public_key)
        self.conn = rpyc.connect("127.0.0.1", int(port), config={"allow_pickle": False})
        self.echo = self.conn.root.echo
        # plaintext sized so that key + nonce + MAC + plaintext == the OMBot frame size
        self.payload = os.urandom(max(1, payload_size - 32 - 24 - 16))

    def round_trip(self) -> None:
        reply = self.echo(self.me + bytes(self.box.encrypt(self.payload)))
        if self.box.decrypt(reply) != self.payload:
            raise RuntimeError("raw echo returned something else")

    def close(self) -> None:
        self.conn.close()
        self.proc.terminate()
        self.proc.wait(timeout=10)


# -- the OMBot path ---------------------------------------------------------------------------------------


class OmbotClient:
    def __init__(self, root: Path, message: str) -> None:
        from tests.support import Cluster

        self.message = message
        self.cluster = Cluster(root / "cluster", {"local": ["m1"]})
        self.cluster.start("m1")
        self.router = self.cluster.router()  # cli:test: the requester its key is registered as
        self.calls: Counter[str] = Counter()
        for link in self.router.links.values():
            link.call = self._counting(link.call)

    def _counting(self, call: Callable[..., dict[str, Any]]) -> Callable[..., dict[str, Any]]:
        def counted(op: str, *args: Any, **kw: Any) -> dict[str, Any]:
            self.calls[op] += 1
            return call(op, *args, **kw)

        return counted

    def frame_size(self) -> int:
        from ombot.envelope import Peer, new_request
        from ombot.keys import Identity, decode_public

        conf = self.cluster.config()
        peer = Peer(Identity.load(conf.require_client().key_file), decode_public(conf.masters["m1"].public_key))
        args = {"module": "echo", "params": {"message": self.message}, "hosts": ["localhost"], "idc": "local",
                "approvers": [], "timeout": None}
        return len(peer.seal_request(new_request("submit", "m1", "cli:test", "cli", args)))

    def echo(self) -> None:
        ref, reply = self.router.submit("local", "echo", {"message": self.message}, ["localhost"])
        state = self.router.follow(ref, lambda event: None, first=reply.get("events", []))
        if state != "ok":
            raise RuntimeError(f"echo job ended {state}:\n{self.cluster.processes['m1'].log()[-2000:]}")

    def health(self) -> None:
        self.router.links["m1"].call("health", {})

    def close(self) -> None:
        self.router.close()
        self.cluster.stop_all()


# -- measuring ------------------------------------------------------------------------------------------


def timed(fn: Callable[[], None]) -> float:
    return timed_s(fn, 1000)


def percentiles(samples: list[float]) -> dict[str, float]:
    cuts = statistics.quantiles(samples, n=100, method="inclusive")
    return {"p50": statistics.median(samples), "p90": cuts[89], "p99": cuts[98], "mean": statistics.fmean(samples)}


def show(name: str, samples: list[float]) -> dict[str, float]:
    p = percentiles(samples)
    print(f"  {name:<13} p50 {p['p50']:7.2f}   p90 {p['p90']:7.2f}   p99 {p['p99']:7.2f}   mean {p['mean']:7.2f}  ms")
    return p


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=300, help="round trips per series (default 300)")
    parser.add_argument("--warmup", type=int, default=20, help="unmeasured round trips first (default 20)")
    parser.add_argument("--message", default="hello", help="the echo module's message")
    parser.add_argument("--raw-server", type=Path, help=argparse.SUPPRESS)
    opts = parser.parse_args()
    if opts.raw_server:
        return serve_raw(opts.raw_server)
    if opts.n < 2:
        parser.error("--n must be at least 2 to have percentiles")

    with tempfile.TemporaryDirectory(prefix="ombot-bench-") as tmp:
        ombot = OmbotClient(Path(tmp), opts.message)
        raw = RawClient(Path(tmp) / "raw.ready", ombot.frame_size())
        try:
            for _ in range(opts.warmup):
                ombot.echo(), ombot.health(), raw.round_trip()
            ombot.calls.clear()
            series: dict[str, list[float]] = {"ombot echo": [], "ombot health": [], "raw echo": []}
            for _ in range(opts.n):  # interleaved: a noisy moment costs every series alike
                series["ombot echo"].append(timed(ombot.echo))
                series["ombot health"].append(timed(ombot.health))
                series["raw echo"].append(timed(raw.round_trip))
            calls = {op: count / opts.n for op, count in ombot.calls.items() if op != "health"}
            report(opts, ombot.frame_size(), series, calls)
        finally:
            raw.close()
            ombot.close()


def report(opts: argparse.Namespace, frame_size: int, series: dict[str, list[float]], calls: dict[str, float]) -> None:
    print(f"echo round trips: n={opts.n} (after {opts.warmup} warm-up), frame {frame_size} bytes, "
          f"python {sys.version.split()[0]}, {os.cpu_count()} CPUs, load {os.getloadavg()[0]:.1f}")
    stats = {name: show(name, samples) for name, samples in series.items()}
    ratio = stats["ombot echo"]["p50"] / stats["raw echo"]["p50"]
    print("  rpc calls per ombot echo: " + ", ".join(f"{op} {n:.2f}" for op, n in sorted(calls.items())))
    print(f"  ombot echo / raw echo at p50: {ratio:.1f}x   (goal: <= 4x, and p50 <= 5 ms)")
    print(f"  ombot health / raw echo at p50: {stats['ombot health']['p50'] / stats['raw echo']['p50']:.1f}x")


if __name__ == "__main__":
    main()
