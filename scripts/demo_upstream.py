"""A small upstream to put behind rproxy: answers every request with what it
received (method, path, headers), so `curl localhost:8080/` shows what the
proxy forwards, X-Forwarded-* headers included.

    python3 scripts/demo_upstream.py [--port 8081]
"""

import argparse
import json

from gevent.pywsgi import WSGIServer


def app(environ, start_response):
    headers = {k[5:].replace("_", "-").title(): v for k, v in environ.items() if k.startswith("HTTP_")}
    body = json.dumps({
        "upstream": "rproxy demo upstream",
        "method": environ["REQUEST_METHOD"],
        "path": environ.get("PATH_INFO", "/") + ("?" + environ["QUERY_STRING"] if environ.get("QUERY_STRING") else ""),
        "headers": headers,
    }, indent=2).encode() + b"\n"
    start_response("200 OK", [("Content-Type", "application/json"), ("Content-Length", str(len(body)))])
    return [body]


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8081)
    args = parser.parse_args()
    print(f"demo upstream on http://{args.host}:{args.port}/", flush=True)
    WSGIServer((args.host, args.port), app, log=None).serve_forever()


if __name__ == "__main__":
    main()
