"""Start a real `vllm serve` on loopback, for end-to-end tests and benchmarks."""

from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

# CPU settings that work on the 2-core test machines. A fixed KV size, not a share of the NUMA node: vLLM's CPU
# worker refuses to start when the share exceeds the memory free at that moment, which on a 16 GiB CI machine
# running other engines is often a few GiB. float32 avoids the slow bf16 emulation on AVX2. vLLM's default
# compilation stays on; callers that start many servers add EAGER (compiling SmolLM2 takes about a minute here).
CPU_SERVE_FLAGS = ["--dtype", "float32", "--kv-cache-memory-bytes", "1G", "--max-model-len", "4096"]
EAGER = ["--enforce-eager"]


def vllm_cli() -> list[str]:
    """vLLM's command line run by this interpreter as a module: it also works where vLLM was installed without
    its console scripts (the GPU machines' bundle is unpacked onto PYTHONPATH, with no `bin/vllm`)."""
    return [sys.executable, "-m", "vllm.entrypoints.cli.main"]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@contextlib.contextmanager
def vllm_server(model: Path, flags: list[str], log_path: Path, timeout_s: float = 600,
                env: dict[str, str] | None = None, base_flags: list[str] = CPU_SERVE_FLAGS) -> Iterator[str]:
    """Yield the base URL of a `vllm serve` process (with `env` added to its environment); stop it on exit."""
    with vllm_server_process(model, flags, log_path, timeout_s, env, base_flags) as (url, _):
        yield url


@contextlib.contextmanager
def vllm_server_process(model: Path, flags: list[str], log_path: Path, timeout_s: float = 600,
                        env: dict[str, str] | None = None, base_flags: list[str] = CPU_SERVE_FLAGS
                        ) -> Iterator[tuple[str, subprocess.Popen]]:
    """`vllm_server`, yielding the process too (its own process group), for tests that signal it or wait for it
    to exit; on exit it is stopped if it still runs."""
    port = free_port()
    command = [*vllm_cli(), "serve", str(model), "--host", "127.0.0.1", "--port", str(port), *base_flags, *flags]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", **(env or {})}
    with open(log_path, "w") as log:
        process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=env,
                                   start_new_session=True)
    try:
        url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + timeout_s
        while True:
            if process.poll() is not None:
                raise RuntimeError(f"vllm serve exited with {process.returncode}:\n{log_path.read_text()[-4000:]}")
            with contextlib.suppress(OSError):
                with urllib.request.urlopen(url + "/health", timeout=2) as response:
                    if response.status == 200:
                        break
            if time.monotonic() > deadline:
                raise TimeoutError(f"vllm serve not healthy after {timeout_s}s:\n{log_path.read_text()[-4000:]}")
            time.sleep(1)
        yield url, process
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, 15)
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, 9)
            process.wait()
