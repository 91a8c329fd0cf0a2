"""What the container test runs beside the agent: standard library only, so the same file
runs in the host's network namespace of a container (``nsenter --net``) and inside a second
container from the image itself (mounted read-only), as an app container of the pod would.

    probe.py ready URL TIMEOUT          wait for 200; prints {"seconds": ...}
    probe.py post URL|unix:PATH BODY    POST /v1/events; prints {"status": ..., "body": ...}
                                        or {"error": "EACCES", ...} when it cannot connect
    probe.py get URL                    prints {"status": ..., "body": ...}
"""

from __future__ import annotations

import errno
import http.client
import json
import socket
import sys
import time
import urllib.error
import urllib.request


class UnixConnection(http.client.HTTPConnection):
    def __init__(self, path: str, timeout: float = 10) -> None:
        super().__init__("agent", timeout=timeout)
        self.path = path

    def connect(self) -> None:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(self.timeout)
        sock.connect(self.path)
        self.sock = sock


def request(method: str, target: str, body: bytes | None = None) -> dict[str, object]:
    headers = {"Content-Type": "application/json"}
    try:
        if target.startswith("unix:"):
            conn = UnixConnection(target[len("unix:"):])
            conn.request(method, "/v1/events", body=body, headers=headers)
            response = conn.getresponse()
            status, text = response.status, response.read().decode()
            conn.close()
        else:
            req = urllib.request.Request(target, data=body, method=method, headers=headers)
            try:
                with urllib.request.urlopen(req, timeout=10) as response:
                    status, text = response.status, response.read().decode()
            except urllib.error.HTTPError as exc:
                status, text = exc.code, exc.read().decode()
    except OSError as exc:
        # urllib wraps the socket's error in URLError.reason; a timeout has no errno.
        code = exc.errno if exc.errno is not None else getattr(
            getattr(exc, "reason", None), "errno", None)
        name = errno.errorcode.get(code) if code else type(exc).__name__
        return {"error": name, "message": str(exc)}
    return {"status": status, "body": text}


def ready(url: str, timeout: float) -> dict[str, object]:
    start = time.monotonic()
    last: dict[str, object] = {}
    while time.monotonic() - start < timeout:
        last = request("GET", url)
        if last.get("status") == 200:
            return {"seconds": round(time.monotonic() - start, 3)}
        time.sleep(0.02)
    return {"error": "TIMEOUT", "last": last}


def main(argv: list[str]) -> int:
    command = argv[0]
    if command == "ready":
        result = ready(argv[1], float(argv[2]))
    elif command == "post":
        result = request("POST", argv[1], argv[2].encode())
    elif command == "get":
        result = request("GET", argv[1])
    else:
        raise SystemExit(f"unknown command {command}")
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
