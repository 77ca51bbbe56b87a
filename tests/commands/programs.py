"""Running the benchmark programs from tests, as a user runs them (`python -m load.X`)."""

import json
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def run_program(module, *args, timeout=600):
    """Run `python -m module args` in the repository; return its stdout (fails the test on
    a non-zero exit, with the end of its stderr)."""
    done = subprocess.run([sys.executable, "-m", module, *args], cwd=ROOT, capture_output=True,
                          text=True, timeout=timeout, check=False)
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout


def watch_program(out: Path, module: str, *args: str, timeout: float = 600) -> tuple[str, list]:
    """Run a benchmark like `run_program`, reading its report file each time it changes."""
    proc = subprocess.Popen([sys.executable, "-m", module, *args, "--out", str(out)],
                            cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
    seen: list[dict] = []
    deadline = time.monotonic() + timeout
    while proc.poll() is None and time.monotonic() < deadline:
        if out.exists() and (not seen or json.loads(out.read_text()) != seen[-1]):
            seen.append(json.loads(out.read_text()))
        time.sleep(0.1)
    stdout, stderr = proc.communicate(timeout=max(1, deadline - time.monotonic()))
    assert proc.returncode == 0, stderr[-3000:]
    if json.loads(out.read_text()) != seen[-1]:
        seen.append(json.loads(out.read_text()))
    return stdout, seen
