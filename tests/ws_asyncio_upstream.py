"""A `websockets` (asyncio) upstream for the tunnel tests, run as its own process:

    python tests/ws_asyncio_upstream.py --port P

Echoes messages with permessage-deflate on offer; "close:CODE" makes it close
with that code; "!closes" answers with the close codes it has received from
its clients so far, as JSON.
"""

import argparse
import asyncio
import json

from websockets.asyncio.server import serve
from websockets.exceptions import ConnectionClosed

CLOSES: list[int] = []


async def handler(ws):
    try:
        async for message in ws:
            if message == "!closes":
                await ws.send(json.dumps(CLOSES))
            elif isinstance(message, str) and message.startswith("close:"):
                await ws.close(int(message[6:]), "asked to")
                return
            else:
                await ws.send(message)
    except ConnectionClosed:
        pass
    finally:
        if ws.protocol.close_rcvd is not None:
            CLOSES.append(ws.protocol.close_rcvd.code)


async def main(port):
    async with serve(handler, "127.0.0.1", port, compression="deflate", max_size=None,
                     ping_interval=None):
        print(f"asyncio ws upstream on {port}", flush=True)
        await asyncio.Future()


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--port", type=int, required=True)
    asyncio.run(main(parser.parse_args().port))
