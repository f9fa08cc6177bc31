"""The no-op worker process (``python -m bench.noop_worker``): workflows and activity of
``bench.noop``, kept apart from them so that the workflow sandbox never imports the codec.

Each completed no-op activity's time is appended to the ``--completions`` file (flushed every
``FLUSH_SECONDS``). Payloads go through the same codec as the billing worker's (``CB_CODEC_*``
from the stack's environment).
"""

from __future__ import annotations

import argparse
import asyncio
import signal
from pathlib import Path

from temporalio.client import Client
from temporalio.worker import Worker

import codec
from bench.noop import COMPLETIONS, NoopCycleWorkflow, noop
from settings import Settings

FLUSH_SECONDS = 0.25


async def _flush(path: Path) -> None:
    with path.open("a") as out:
        while True:
            taken = len(COMPLETIONS)
            if taken:
                out.write("".join(f"{t:.6f}\n" for t in COMPLETIONS[:taken]))
                out.flush()
                del COMPLETIONS[:taken]
            await asyncio.sleep(FLUSH_SECONDS)


async def serve(address: str, queue: str, completions: Path, max_activities: int,
                max_workflow_tasks: int) -> None:
    # the payload codec the stack's environment configures, as the billing worker uses it
    converter = codec.data_converter(Settings())
    client = await asyncio.wait_for(Client.connect(address, data_converter=converter), timeout=30)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    flusher = asyncio.create_task(_flush(completions))
    async with Worker(client, task_queue=queue, workflows=[NoopCycleWorkflow], activities=[noop],
                      max_concurrent_activities=max_activities,
                      max_concurrent_workflow_tasks=max_workflow_tasks):
        print(f"no-op worker polling {queue}", flush=True)
        await stop.wait()
    await asyncio.sleep(FLUSH_SECONDS * 2)
    flusher.cancel()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--address", required=True)
    parser.add_argument("--queue", required=True)
    parser.add_argument("--completions", type=Path, required=True)
    parser.add_argument("--max-concurrent-activities", type=int, default=200)
    parser.add_argument("--max-concurrent-workflow-tasks", type=int, default=200)
    args = parser.parse_args()
    asyncio.run(serve(args.address, args.queue, args.completions,
                      args.max_concurrent_activities, args.max_concurrent_workflow_tasks))


if __name__ == "__main__":
    main()
