"""Real HTTP servers on the loopback interface for the teacher tests, and batches to score.

``serving`` runs any ASGI app under uvicorn in a thread on a free port and stops it on exit;
``free_port`` finds a port for a server started as a subprocess.
"""

from __future__ import annotations

import contextlib
import socket
import threading
import time
from collections.abc import Iterator

import torch

from kdrl.rollout import RolloutBatch


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Served:
    def __init__(self, server, thread: threading.Thread, url: str) -> None:
        self.server, self.thread, self.url = server, thread, url

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=10)
        assert not self.thread.is_alive(), "loopback server did not stop"


@contextlib.contextmanager
def serving(app) -> Iterator[Served]:
    """``app`` served on ``http://127.0.0.1:PORT`` until the block ends (or ``stop()``)."""
    import uvicorn

    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 10
    while not server.started:
        assert time.monotonic() < deadline and thread.is_alive(), "loopback server did not start"
        time.sleep(0.01)
    served = Served(server, thread, f"http://127.0.0.1:{port}")
    try:
        yield served
    finally:
        if thread.is_alive():
            served.stop()
        sock.close()


def batch_of(rows: list[tuple[list[int], list[int]]], *, pad: int) -> RolloutBatch:
    """Right-padded ``[prompt | response | pad]`` rows, the rollout's layout."""
    ids = torch.full((len(rows), max(len(p) + len(r) for p, r in rows)), pad, dtype=torch.long)
    attn = torch.zeros_like(ids)
    resp = torch.zeros_like(ids, dtype=torch.bool)
    for b, (p, r) in enumerate(rows):
        ids[b, : len(p) + len(r)] = torch.tensor(p + r)
        attn[b, : len(p) + len(r)] = 1
        resp[b, len(p) : len(p) + len(r)] = True
    return RolloutBatch(
        input_ids_BT=ids, attention_mask_BT=attn, response_mask_BT=resp,
        behav_logprobs_BT=torch.zeros(ids.shape), prompt_index_B=list(range(len(rows))),
        truncated_B=torch.zeros(len(rows), dtype=torch.bool),
    )  # fmt: skip


def random_batch(
    n: int, vocab: int, *, pad: int, seed: int = 0, max_prompt: int = 12, max_response: int = 15
) -> RolloutBatch:
    """``n`` rows of random ids, prompt and response lengths."""
    g = torch.Generator().manual_seed(seed)
    rows = []
    for _ in range(n):
        p = int(torch.randint(1, max_prompt + 1, (1,), generator=g))
        r = int(torch.randint(1, max_response + 1, (1,), generator=g))
        ids = torch.randint(0, vocab, (p + r,), generator=g).tolist()
        rows.append((ids[:p], ids[p:]))
    return batch_of(rows, pad=pad)
