import io
import os
import shutil
import socket
import subprocess
import time
from pathlib import Path

import pytest

# Every test run builds its own embedded model, through the same code as the server.
os.environ.setdefault("ATELIER_CACHE_DIR", str(Path(__file__).parent.parent / ".pytest_cache" / "atelier-models"))


@pytest.fixture(scope="session")
def cache_dir() -> Path:
    return Path(os.environ["ATELIER_CACHE_DIR"])


@pytest.fixture(scope="session")
def compile_cache(cache_dir) -> Path:
    """Where compiled engines keep their compiled code, as a server keeps it: an engine
    reuses the kernels earlier ones compiled."""
    from deployments.engines import compile_cache_dir

    return compile_cache_dir(cache_dir)


@pytest.fixture(scope="session")
def tiny_sdxl_path(cache_dir) -> Path:
    from deployments.tiny import TINY_SDXL, ensure_embedded

    return ensure_embedded(TINY_SDXL, cache_dir)


def read_watermark(image, length: int):
    """The bits the invisible-watermark library's decoder (what detectors of SDXL's and
    FLUX.1's marks run) reads from an image or its encoded bytes, in 8-bit BGR as OpenCV
    loads files."""
    import numpy as np
    from imwatermark import WatermarkDecoder
    from PIL import Image

    if isinstance(image, bytes):
        image = Image.open(io.BytesIO(image))
    bgr = np.ascontiguousarray(np.asarray(image.convert("RGB"))[:, :, ::-1])
    return np.array(WatermarkDecoder("bits", length).decode(bgr, "dwtDct"), dtype=int)


def xmp_label(data: bytes) -> tuple[str, str] | None:
    """(IPTC digital source type, xmp:CreatorTool) from an encoded image's XMP, if any."""
    import xml.etree.ElementTree as ET

    from PIL import Image

    info = Image.open(io.BytesIO(data)).info
    xmp = info.get("XML:com.adobe.xmp") or info.get("xmp")  # PNG's iTXt; JPEG's, WebP's
    if xmp is None:
        return None
    (desc,) = ET.fromstring(xmp).iter("{http://www.w3.org/1999/02/22-rdf-syntax-ns#}Description")
    return (desc.get("{http://iptc.org/std/Iptc4xmpExt/2008-02-29/}DigitalSourceType"),
            desc.get("{http://ns.adobe.com/xap/1.0/}CreatorTool"))


def asked_until(ask, done, seconds=30):
    """`ask()` again every 2 s until `done(answer)` or `seconds` have passed (a metric just
    set reaches Ray's metrics port within its 10 s report interval, and Prometheus a
    scrape later; a failed scrape leaves nothing for a moment): the last answer."""
    deadline = time.monotonic() + seconds
    while not done(answer := ask()) and time.monotonic() < deadline:
        time.sleep(2)
    return answer


def counts_by_model(exposition: str, metric: str, label: str = "model") -> dict[str, float]:
    """A counter's value per `model` label (or another `label`), summed over its other
    labels, from Ray's Prometheus text on a node's metrics port."""
    counts: dict[str, float] = {}
    for line in exposition.splitlines():
        if line.startswith(metric + "{"):
            value = line.split(f'{label}="', 1)[1].split('"', 1)[0]
            counts[value] = counts.get(value, 0) + float(line.rsplit(" ", 1)[1])
    return counts


class FileServer:
    """A real HTTP server on 127.0.0.1 for what the app fetches: `files` by path (the query
    ignored), a 302 to each `redirects` location (`{port}` filled in), 404 otherwise.
    `requests` lists each GET's full path and Authorization header, in arrival order."""

    def __init__(self, files: dict[str, bytes], redirects: dict[str, str] | None = None):
        import threading
        from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

        self.requests: list[tuple[str, str | None]] = []
        served = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self):
                served.requests.append((self.path, self.headers.get("Authorization")))
                location = (redirects or {}).get(self.path)
                body = files.get(self.path.split("?")[0])
                self.send_response(302 if location else 404 if body is None else 200)
                if location:
                    self.send_header("Location", location.format(port=served.port))
                self.send_header("Content-Length", str(len(body or b"")))
                self.end_headers()
                self.wfile.write(body or b"")

            def log_message(self, *args):
                pass

        self._httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.port = self._httpd.server_port
        self.url = f"http://127.0.0.1:{self.port}"
        threading.Thread(target=self._httpd.serve_forever, daemon=True).start()

    @property
    def paths(self) -> list[str]:
        return [path for path, _ in self.requests]

    def auth(self, path: str) -> str | None:
        """The Authorization header of the last GET of `path`."""
        return next(a for p, a in reversed(self.requests) if p == path)

    def close(self) -> None:
        self._httpd.shutdown()


def trickling(body: bytes, sent: list[float], every_s: float = 0.1):
    """An asyncio stream handler that answers any request with 200 and a Content-Length
    of `body`, then sends its first 40 bytes one at a time, `every_s` apart, recording
    when each went in `sent`: each read comes in time, the whole never does."""
    import asyncio

    async def handle(reader, writer):
        await reader.readuntil(b"\r\n\r\n")
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % len(body))
        for byte in body[:40]:
            writer.write(bytes([byte]))
            sent.append(time.monotonic())
            await writer.drain()
            await asyncio.sleep(every_s)
        writer.close()

    return handle


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_redis(port: int, folder: Path, appendonly: bool = False) -> subprocess.Popen:
    """A redis-server on `port`, keeping its files in `folder` (with `appendonly`, every
    write, so that a restart finds them), once it accepts connections."""
    server = shutil.which("redis-server")
    assert server, "redis-server is missing: `make test` installs Debian's redis-server"
    proc = subprocess.Popen([server, "--port", str(port), "--save", "", "--appendonly",
                             "yes" if appendonly else "no", "--appendfsync", "always",
                             "--dir", str(folder)], stdout=subprocess.DEVNULL)
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            break
        except OSError:
            time.sleep(0.1)
    return proc


@pytest.fixture(scope="session")
def redis_url(tmp_path_factory):
    port = free_port()
    proc = start_redis(port, tmp_path_factory.mktemp("redis"))
    yield f"redis://127.0.0.1:{port}/0"
    proc.terminate()
    proc.wait(10)


@pytest.fixture(scope="session")
def tiny_flux_path(cache_dir) -> Path:
    from deployments.tiny import TINY_FLUX, ensure_embedded

    return ensure_embedded(TINY_FLUX, cache_dir)


# The tiny engines in float32 on the CPU, one pair per test module that asks for them.
@pytest.fixture(scope="module")
def sdxl(tiny_sdxl_path):
    from deployments.engines.sdxl import SDXLEngine

    return SDXLEngine(tiny_sdxl_path, "float32", "cpu")


@pytest.fixture(scope="module")
def flux(tiny_flux_path):
    from deployments.engines.flux import FluxEngine

    return FluxEngine(tiny_flux_path, "float32", "cpu")
