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
def tiny_sdxl_path(cache_dir) -> Path:
    from deployments.tiny import TINY_SDXL, ensure_embedded

    return ensure_embedded(TINY_SDXL, cache_dir)


def counts_by_model(exposition: str, metric: str) -> dict[str, float]:
    """A counter's value per `model` label, summed over its other labels, from Ray's
    Prometheus text on a node's metrics port."""
    counts: dict[str, float] = {}
    for line in exposition.splitlines():
        if line.startswith(metric + "{"):
            model = line.split('model="', 1)[1].split('"', 1)[0]
            counts[model] = counts.get(model, 0) + float(line.rsplit(" ", 1)[1])
    return counts


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def redis_url(tmp_path_factory):
    server = shutil.which("redis-server")
    assert server, "redis-server is missing: `make test` installs Debian's redis-server"
    port = free_port()
    proc = subprocess.Popen([server, "--port", str(port), "--save", "", "--appendonly", "no",
                             "--dir", str(tmp_path_factory.mktemp("redis"))],
                            stdout=subprocess.DEVNULL)
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            break
        except OSError:
            time.sleep(0.1)
    yield f"redis://127.0.0.1:{port}/0"
    proc.terminate()
    proc.wait(10)


@pytest.fixture(scope="session")
def tiny_flux_path(cache_dir) -> Path:
    from deployments.tiny import TINY_FLUX, ensure_embedded

    return ensure_embedded(TINY_FLUX, cache_dir)
