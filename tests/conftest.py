import os
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
