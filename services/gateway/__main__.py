import asyncio
import signal

from livelens.config import load_config
from livelens.logs import setup_logging
from services.gateway.server import serve


async def main() -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await serve(load_config(), stop)


if __name__ == "__main__":
    setup_logging()
    asyncio.run(main())
