"""A stock web server (Debian's nginx) serving a PXE bundle as plain files, for the tests
and benchmarks that show a bundle needs no code of this project on its server. The
configuration is what a site would write (README: "A bundle on any web server"), plus an
access log this module reads back, and a rate limit the tests set to pace a transfer."""

from __future__ import annotations

import logging
import re
import subprocess
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType

from cbios import ports
from cbios.errors import StepError

log = logging.getLogger("cbios")

NGINX = "/usr/sbin/nginx"
START_TIMEOUT = 10.0
STOP_TIMEOUT = 10.0
# One line a request: what was asked, with what Range, and how many bytes of the body went out.
LOG_FORMAT = '$status $body_bytes_sent "$http_range" "$request_uri"'
LOG_LINE = re.compile(r'(\d{3}) (\d+) "([^"]*)" "([^"]*)"')


@dataclass(frozen=True)
class Served:
    status: int
    sent: int
    range: str  # "-": none
    path: str  # without the query

    @property
    def name(self) -> str:
        """The file's name, whatever folder of the site it is in."""
        return self.path.rsplit("/", 1)[-1]


def conf(root: Path, workdir: Path, port: int, *, workers: int | str = 1, rate: str = "",
         rate_after: str = "") -> str:
    """nginx.conf serving ROOT on 127.0.0.1:PORT. RATE/RATE_AFTER: nginx's limit_rate and
    limit_rate_after for every transfer (e.g. '1m', '40m'), for tests that pace one."""
    limit = (f"        limit_rate_after {rate_after};\n" if rate_after else "") + \
        (f"        limit_rate {rate};\n" if rate else "")
    return f"""# A PXE bundle as plain files: the whole of what a site's nginx needs is the location.
worker_processes {workers};
user root;
pid {workdir}/nginx.pid;
error_log {workdir}/error.log;
daemon off;
events {{ worker_connections 1024; }}
http {{
    client_body_temp_path {workdir}/body;
    log_format served '{LOG_FORMAT}';
    access_log {workdir}/access.log served;
    sendfile on;
    tcp_nopush on;
    keepalive_timeout 60;
    default_type application/octet-stream;
    server {{
        listen 127.0.0.1:{port};
        root {root};
        location / {{
{limit}        }}
    }}
}}
"""


class Nginx:
    """nginx in the foreground on 127.0.0.1 (a free port unless given), serving ROOT."""

    def __init__(self, root: Path, workdir: Path, *, port: int = 0, workers: int | str = 1, rate: str = "",
                 rate_after: str = "") -> None:
        if not Path(NGINX).is_file():
            raise StepError("nginx", f"{NGINX} is missing", hint="run 'make deps' (nginx-light)")
        self.root, self.workdir = root.resolve(), workdir
        self.port = port or ports.free_port()
        self.workers, self.rate, self.rate_after = workers, rate, rate_after
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self, *, rate: str | None = None, rate_after: str | None = None) -> None:
        """Start (again, on the same port), with a new rate limit if one is given."""
        self.rate = self.rate if rate is None else rate
        self.rate_after = self.rate_after if rate_after is None else rate_after
        (self.workdir / "body").mkdir(parents=True, exist_ok=True)
        path = self.workdir / "nginx.conf"
        path.write_text(conf(self.root, self.workdir, self.port, workers=self.workers, rate=self.rate,
                             rate_after=self.rate_after))
        # -e: nginx logs there before it reads its configuration (it would try /var/log/nginx)
        self.proc = subprocess.Popen([NGINX, "-c", str(path), "-p", str(self.workdir), "-e",
                                      str(self.workdir / "error.log")], stdin=subprocess.DEVNULL,
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            ports.wait_listening(self.proc, self.port, START_TIMEOUT, "nginx",
                                 hint=f"its log: {self.workdir / 'error.log'}")
        except StepError:
            self.stop()
            raise

    def stop(self) -> None:
        """Fast shutdown (SIGTERM): transfers under way are broken off."""
        if self.proc is not None:
            ports.end(self.proc, STOP_TIMEOUT)
        self.proc = None

    def served(self) -> list[Served]:
        """Every request answered so far (nginx logs one when it is through with it)."""
        log_file = self.workdir / "access.log"
        lines = log_file.read_text().splitlines() if log_file.is_file() else []
        return [Served(int(m[1]), int(m[2]), m[3], m[4].split("?", 1)[0]) for line in lines
                if (m := LOG_LINE.fullmatch(line))]

    def bytes_sent(self, name: str | None = None) -> int:
        return sum(s.sent for s in self.served() if name is None or s.name == name)

    def __enter__(self) -> Nginx:
        self.start()
        return self

    def __exit__(self, typ: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.stop()

