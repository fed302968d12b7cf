"""The ray executor connects to a running cluster by address (what `--executor ray --address` does): a Ray
head started by the test with `ray start --head --block` on 127.0.0.1, stopped by ending that process.

Ray 2.60 clusters started by `ray start` require its auth token (~/.ray/auth_token) and a client sends it
only in token mode, read when ray is imported: so the head and the client (a fresh Python process) run with
RAY_AUTH_MODE=token, as docs/SCALING.md tells users."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytest.importorskip("ray", reason="the ray executor needs `pip install oncofm[cluster]`")

CLIENT = """
import json, os, sys
from oncofm.distributed.executor import run_per_item
import ray
result = run_per_item(os.path.basename, ["/a/x.svs", "/b/y.svs", None], executor="ray", address=sys.argv[1],
                      workers=2, progress=False)
print(json.dumps({"values": result.values, "failures": result.failures().to_dict("records"),
                  "still_connected": ray.is_initialized()}))
"""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_ray_executor_by_address(tmp_path):
    env = {**os.environ, "RAY_AUTH_MODE": "token"}
    port = _free_port()
    ray_cli = Path(sys.executable).with_name("ray")
    head = subprocess.Popen([str(ray_cli), "start", "--head", "--block", "--node-ip-address=127.0.0.1",
                             f"--port={port}", "--num-cpus=2", "--include-dashboard=false",
                             "--disable-usage-stats"], stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT,
                            start_new_session=True, env=env)
    try:
        address = f"127.0.0.1:{port}"
        deadline = time.time() + 120
        while True:  # wait until the head answers
            probe = subprocess.run([str(ray_cli), "status", f"--address={address}"], capture_output=True, env=env)
            if probe.returncode == 0:
                break
            assert head.poll() is None and time.time() < deadline, f"the Ray head did not start: {probe.stderr[-500:]}"
            time.sleep(2)
        client = subprocess.run([sys.executable, "-c", CLIENT, address], capture_output=True, text=True, env=env,
                                timeout=300)
        assert client.returncode == 0, client.stderr[-2000:]
        out = json.loads(client.stdout.strip().splitlines()[-1])
        assert out["values"] == ["x.svs", "y.svs", None]
        assert [f["item"] for f in out["failures"]] == ["None"]  # basename(None) raised in a Ray worker
        assert out["failures"][0]["reason"].startswith("TypeError")
        assert out["still_connected"] is False  # the executor disconnected; the cluster itself keeps running
        assert head.poll() is None
    finally:
        os.killpg(head.pid, 15)  # ends the head and the Ray processes it started (its own session only)
        head.wait(timeout=60)
