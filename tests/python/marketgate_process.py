"""The real `marketgate serve` binary on free loopback ports, for the Python suites.

`Serve(config_text)` writes the config to a temp dir, starts `$MARKETGATE_BIN serve --config`
(default `target/debug/marketgate`), keeps every line it prints (stdout and stderr) in
`.lines`, and waits until the control listener answers and the admin listener's `/healthz`
says 200. The child gets no
`MARKETGATE_*` variable: each would be a config override (MARKETGATE_BIN an unknown key).
"""

import http.client
import json
import os
import shutil
import socket
import subprocess
import tempfile
import threading
import time


def marketgate_binary():
    return os.environ.get("MARKETGATE_BIN", "target/debug/marketgate")


def free_ports(n):
    """n loopback ports free right now (bound, read, released together)."""
    socks = [socket.socket() for _ in range(n)]
    try:
        for s in socks:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


class Serve:
    """`marketgate serve` with `config` (TOML text; `{data_dir}`, `{gateway}`, `{control}` and
    `{admin}` are filled in with a temp dir and free loopback addresses). `command="control"`
    runs the control plane alone on the same config (only the control listener is awaited)."""

    def __init__(self, config, command="serve", ready_timeout=60):
        self.workdir = tempfile.mkdtemp(prefix="marketgate-py-")
        self.gateway_port, self.control_port, self.admin_port = free_ports(3)
        self.config_text = config.format(
            data_dir=os.path.join(self.workdir, "data"),
            gateway=f"127.0.0.1:{self.gateway_port}",
            control=f"127.0.0.1:{self.control_port}",
            admin=f"127.0.0.1:{self.admin_port}",
        )
        path = os.path.join(self.workdir, "serve.toml")
        with open(path, "w") as f:
            f.write(self.config_text)
        env = {k: v for k, v in os.environ.items() if not k.startswith("MARKETGATE_")}
        env.pop("RUST_LOG", None)  # the config's [log] level decides
        self.process = subprocess.Popen(
            [marketgate_binary(), command, "--config", path],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            env=env,
        )
        self.lines = []
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()
        deadline = time.monotonic() + ready_timeout
        while True:
            if self.process.poll() is not None:
                self._reader.join(timeout=5)
                raise RuntimeError("marketgate serve exited early:\n" + "".join(self.lines))
            try:
                request(self.control_port, "GET", "/openapi.json")
                if command != "serve" or request(self.admin_port, "GET", "/healthz")[0] == 200:
                    break
            except OSError:
                pass
            if time.monotonic() > deadline:
                self.stop()
                raise RuntimeError("marketgate serve did not become healthy:\n" + "".join(self.lines))
            time.sleep(0.1)

    def _read(self):
        for line in self.process.stdout:
            self.lines.append(line)

    @property
    def control_url(self):
        return f"http://127.0.0.1:{self.control_port}"

    def stop(self):
        """SIGTERM, wait for the drain, collect the last lines; returns the exit status."""
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self._reader.join(timeout=10)
        shutil.rmtree(self.workdir, ignore_errors=True)
        return self.process.returncode

    def log_records(self):
        """The JSON log lines, parsed (other lines skipped)."""
        out = []
        for line in self.lines:
            try:
                out.append(json.loads(line))
            except ValueError:
                pass
        return out


def request(port, method, path, body=None, headers=None, timeout=10):
    """One HTTP/1.1 request to 127.0.0.1:port: (status, headers dict, body bytes)."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        data = body if isinstance(body, (bytes, type(None))) else json.dumps(body).encode()
        all_headers = dict(headers or {})
        if data is not None and "Content-Type" not in all_headers:
            all_headers["Content-Type"] = "application/json"
        conn.request(method, path, body=data, headers=all_headers)
        response = conn.getresponse()
        return response.status, dict(response.getheaders()), response.read()
    finally:
        conn.close()
