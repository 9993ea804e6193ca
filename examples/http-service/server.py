"""A tiny HTTP service: GET / reports who and where it runs; other paths are files in the cwd.

SIGTERM stops it cleanly (exit 0), the way an orchestrator expects a service to stop.
"""

import getpass
import os
import signal
import sys
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer


class Handler(SimpleHTTPRequestHandler):
    def do_GET(self) -> None:
        if self.path != "/":
            super().do_GET()
            return
        body = (
            f"greeting={os.environ.get('GREETING', '')}\n"
            f"user={getpass.getuser()} uid={os.getuid()} gid={os.getgid()}\n"
            f"cwd={os.getcwd()}\n"
            f"home={os.environ.get('HOME', '')}\n"
        ).encode()
        self.send_response(200)
        self.send_header("Content-Type", "text/plain; charset=utf-8")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: object) -> None:
        pass  # one line per request would flood the console under load


def main() -> None:
    server = ThreadingHTTPServer(("0.0.0.0", int(os.environ.get("PORT", "8080"))), Handler)

    def stop(signum: int, frame: object) -> None:
        print("http-service: SIGTERM, stopping", flush=True)
        sys.exit(0)

    signal.signal(signal.SIGTERM, stop)
    print(f"http-service: listening on {server.server_address[1]}", flush=True)
    server.serve_forever()


if __name__ == "__main__":
    main()
