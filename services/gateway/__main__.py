import asyncio
import signal

from services.common.logs import setup_logging
from services.common.settings import load_service_config
from services.gateway.server import serve


async def main() -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await serve(load_service_config(), stop)


if __name__ == "__main__":
    setup_logging()
    asyncio.run(main())
