"""How long one heavy request body freezes the other streams of a server.

    python bench/server_stall.py [--baseline-src OTHER/src] [--rounds 3]

A server over the FakeEngine of tests/server_fakes.py (one token per 5 ms step) streams to one
client while a second client posts a heavy body: one 14 MB chat message, 200k short chat messages
(12.6 MB), or a completions prompt of 3M token ids (26 MB, over the default body limit, so sent
with a larger one). Reported: the longest gap between two events of the stream while the heavy
request is in flight (without interference ~5 ms) and the heavy request's own time and status.
With --baseline-src the same measurement runs on another checkout's package (e.g. the code
before the request work moved to worker threads), the two alternating round by round in
subprocesses. Prints a table and writes bench/results/server_stall.json.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SHAPES = ("one_14mb_message", "200k_messages", "3m_token_ids")


def _heavy_body(shape: str) -> tuple[str, bytes]:
    if shape == "one_14mb_message":
        body = {"messages": [{"role": "user", "content": "word " * (14 * 2**20 // 5)}]}
        return "/v1/chat/completions", json.dumps({**body, "max_tokens": 1}).encode()
    if shape == "200k_messages":
        body = {"messages": [{"role": "user", "content": "w" * 30}] * 200_000}
        return "/v1/chat/completions", json.dumps({**body, "max_tokens": 1}).encode()
    return "/v1/completions", json.dumps({"prompt": list(range(3_000_000))}).encode()


def child(shape: str) -> dict:
    """One measurement in this process (whichever qwen35 is importable)."""
    import httpx
    import uvicorn

    sys.path.insert(0, str(ROOT / "tests"))
    from qwen35.server.app import ServerConfig, create_app
    from server_fakes import FakeEngine

    eng = FakeEngine(max_model_len=4096)
    eng.step_delay = 0.005
    app = create_app(eng, ServerConfig(served_model_name="m", max_body_bytes=64 << 20))
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    sock.bind(("127.0.0.1", 0))
    url = f"http://127.0.0.1:{sock.getsockname()[1]}"
    server = uvicorn.Server(uvicorn.Config(app, log_level="critical", lifespan="on"))
    threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True).start()
    while not server.started:
        time.sleep(0.01)
    path, raw = _heavy_body(shape)
    stamps: list[float] = []
    window: dict[str, float] = {}

    def stream() -> None:
        body = {"prompt": "x", "max_tokens": 1500, "ignore_eos": True, "stream": True}
        with httpx.stream("POST", url + "/v1/completions", json=body, timeout=120) as r:
            for line in r.iter_lines():
                if line:
                    stamps.append(time.perf_counter())
                if "end" in window and stamps[-1] > window["end"] + 0.3:
                    break

    t = threading.Thread(target=stream)
    t.start()
    while len(stamps) < 50:
        time.sleep(0.01)
    window["start"] = time.perf_counter()
    r = httpx.post(url + path, content=raw, timeout=120,
                   headers={"content-type": "application/json"})  # fmt: skip
    window["end"] = time.perf_counter()
    t.join()
    server.should_exit = True
    inside = [
        b - a for a, b in zip(stamps, stamps[1:]) if b > window["start"] and a < window["end"]
    ]
    before = [b - a for a, b in zip(stamps, stamps[1:]) if b < window["start"]]
    return {
        "shape": shape,
        "max_gap_ms": 1000 * max(inside, default=0.0),
        "median_gap_before_ms": 1000 * statistics.median(before),
        "heavy_request_s": window["end"] - window["start"],
        "heavy_status": r.status_code,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--baseline-src", default=None, help="another checkout's src/ to compare")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--shapes", nargs="+", default=list(SHAPES), choices=SHAPES)
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        print(json.dumps(child(args.child)))
        return
    variants = {"this": str(ROOT / "src")}
    if args.baseline_src:
        variants = {"baseline": str(Path(args.baseline_src).resolve()), **variants}
    results: dict[str, dict[str, list[dict]]] = {v: {s: [] for s in args.shapes} for v in variants}
    for _ in range(args.rounds):  # interleaved: every round runs each variant on each shape
        for shape in args.shapes:
            for name, src in variants.items():
                env = {**os.environ, "PYTHONPATH": src}
                out = subprocess.run(
                    [sys.executable, __file__, "--child", shape],
                    env=env, capture_output=True, text=True, check=True, timeout=600,
                )  # fmt: skip
                results[name][shape].append(json.loads(out.stdout.strip().splitlines()[-1]))
    print(f"{'variant':<10}{'shape':<18}{'max stream gap ms':>19}{'heavy request s':>17}  status")
    table = []
    for name in variants:
        for shape in args.shapes:
            runs = results[name][shape]
            row = {
                "variant": name,
                "shape": shape,
                "max_gap_ms": statistics.median(r["max_gap_ms"] for r in runs),
                "heavy_request_s": statistics.median(r["heavy_request_s"] for r in runs),
                "status": sorted({r["heavy_status"] for r in runs}),
                "runs": runs,
            }
            table.append(row)
            print(f"{name:<10}{shape:<18}{row['max_gap_ms']:>19.0f}"
                  f"{row['heavy_request_s']:>17.2f}  {row['status']}")  # fmt: skip
    out_dir = ROOT / "bench" / "results"
    out_dir.mkdir(parents=True, exist_ok=True)
    tmp = out_dir / "server_stall.json.tmp"
    tmp.write_text(json.dumps(table, indent=1))
    tmp.rename(out_dir / "server_stall.json")


if __name__ == "__main__":
    main()
