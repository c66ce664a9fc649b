"""``kdrl serve-teacher``'s app, served by uvicorn, that dies at a known point of a training run:
at the first ``POST /v1/score`` that arrives once the file ``--die-when`` exists, the process
ends at once (``os._exit``, as under SIGKILL: no reply, the connection is dropped).

tests/test_train_remote_teacher.py points ``--die-when`` at the trainer's second checkpoint, so
the server answers steps 1 and 2 and vanishes at step 3's scoring, however fast the machine.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

import uvicorn

from kdrl.teacher_server import load_app


def dies_when(app, path: Path):
    async def wrapped(scope, receive, send):
        if scope["type"] == "http" and scope["path"] == "/v1/score" and path.exists():
            os._exit(137)  # the teacher's machine disappears
        await app(scope, receive, send)

    return wrapped


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", required=True)
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--vocab", type=int, required=True)
    parser.add_argument("--die-when", type=Path, required=True)
    args = parser.parse_args()
    app = load_app(args.model, vocab=args.vocab)
    app = dies_when(app, args.die_when)
    uvicorn.run(app, host="127.0.0.1", port=args.port, log_level="warning")


if __name__ == "__main__":
    main()
