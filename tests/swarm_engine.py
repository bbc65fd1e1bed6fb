"""A throwaway Docker engine of the test's own, made a one-node swarm, for deploying deploy/swarm/stack.yml.

The engine every other test uses is never put in swarm mode: this is a second `dockerd` with its own
socket, data root, exec root (so its own containerd), pid file, config file and cgroup parent, no default
bridge and no iptables rules (the host's rules are the first engine's). What swarm needs from it:

- an advertise address: 127.0.0.1, with the manager port and the overlay's VXLAN port chosen free on
  loopback (a second swarm on the machine would clash on the defaults);
- `docker_gwbridge` (where a swarm task's published port lands) made first under a Linux bridge name of
  its own (the default name is one per host), and deleted at the end;
- no IPVS: this kernel has none (CONFIG_IP_VS is not set), so service virtual IPs and the ingress routing
  mesh cannot work; the stack uses DNS round-robin and host-mode ports, which need neither.

Images reach it as they would reach a real node with no registry: `docker save | docker -H ... load`.
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import secrets
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path

import docker

STOP_TIMEOUT_S = 60.0
START_TIMEOUT_S = 60.0


def free_tcp_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def free_udp_port() -> int:
    """A free UDP port in the range swarm accepts for its data path (1024-49151)."""
    for _ in range(100):
        port = random.randint(40000, 49151)
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
            try:
                sock.bind(("0.0.0.0", port))
            except OSError:
                continue
            return port
    raise RuntimeError("no free UDP port for the swarm's VXLAN data path")


class SwarmEngine:
    """`start()`, then `docker(...)`/`client` talk to it; `stop()` leaves the swarm and removes everything."""

    def __init__(self) -> None:
        self.name = f"wpsw-{secrets.token_hex(3)}"
        # Short paths: unix socket paths (containerd's under the exec root) are limited to 108 bytes.
        self.run_dir = Path("/run") / self.name
        self.data_root = Path("/var/lib") / self.name
        self.sock = self.run_dir / "docker.sock"
        self.host = f"unix://{self.sock}"
        self.gw_bridge = f"wpgw{self.name[5:]}"
        self.log_path = self.run_dir / "dockerd.log"
        self.process: subprocess.Popen | None = None
        self.client: docker.DockerClient | None = None

    def start(self) -> None:
        self.run_dir.mkdir(parents=True)
        self.data_root.mkdir(parents=True)
        config = self.run_dir / "daemon.json"
        config.write_text("{}")
        log = open(self.log_path, "w")  # noqa: SIM115 - kept for the engine's life
        self.process = subprocess.Popen(
            ["dockerd", "--config-file", str(config), "-H", self.host, "--data-root", str(self.data_root),
             "--exec-root", str(self.run_dir / "exec"), "--pidfile", str(self.run_dir / "docker.pid"),
             "--bridge", "none", "--iptables=false", "--ip-forward=false", "--ip-masq=false",
             "--cgroup-parent", self.name, "--default-address-pool", "base=10.213.0.0/16,size=24"],
            stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        log.close()
        deadline = time.monotonic() + START_TIMEOUT_S
        while not self._answers():
            if self.process.poll() is not None:
                raise RuntimeError(f"the second dockerd exited:\n{self.log_tail()}")
            if time.monotonic() > deadline:
                raise RuntimeError(f"the second dockerd did not answer:\n{self.log_tail()}")
            time.sleep(0.3)
        self.client = docker.DockerClient(base_url=self.host, timeout=120)
        # docker_gwbridge under a bridge name of our own, before the swarm would make one named after it.
        self.docker("network", "create", "--driver", "bridge",
                    "--opt", f"com.docker.network.bridge.name={self.gw_bridge}",
                    "--opt", "com.docker.network.bridge.enable_icc=false", "docker_gwbridge")
        self.docker("swarm", "init", "--advertise-addr", "127.0.0.1",
                    "--listen-addr", f"127.0.0.1:{free_tcp_port()}",
                    "--data-path-addr", "127.0.0.1", "--data-path-port", str(free_udp_port()),
                    "--default-addr-pool", "10.214.0.0/16")

    def _answers(self) -> bool:
        try:
            self.docker("version", "--format", "{{.Server.Version}}", timeout_s=10)
        except (RuntimeError, subprocess.TimeoutExpired):
            return False
        return True

    def docker(self, *args: str, env: dict[str, str] | None = None, input_bytes: bytes | None = None,
               timeout_s: float = 120) -> str:
        """The docker CLI against this engine only (-H and DOCKER_HOST both name it)."""
        full_env = {k: v for k, v in os.environ.items() if not k.startswith("DOCKER_")}
        full_env.update(env or {}, DOCKER_HOST=self.host)
        proc = subprocess.run(["docker", "-H", self.host, *args], env=full_env, input=input_bytes,
                              capture_output=True, timeout=timeout_s)
        if proc.returncode != 0:
            raise RuntimeError(f"docker {' '.join(args)} failed: {proc.stderr.decode(errors='replace')}")
        return proc.stdout.decode(errors="replace")

    def load_images(self, *images: str) -> None:
        """`docker save IMAGES | docker -H <this engine> load`: how images reach a node without a registry."""
        save = subprocess.Popen(["docker", "save", *images], stdout=subprocess.PIPE)
        assert save.stdout is not None
        try:
            load = subprocess.run(["docker", "-H", self.host, "load", "--quiet"], stdin=save.stdout,
                                  capture_output=True, timeout=300)
        finally:
            save.stdout.close()
            save.wait()
        if save.returncode != 0 or load.returncode != 0:
            raise RuntimeError(f"docker save | load failed: {load.stderr.decode(errors='replace')}")

    def node_id(self) -> str:
        return json.loads(self.docker("info", "--format", "{{json .Swarm.NodeID}}"))

    def log_tail(self, lines: int = 30) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no log)"

    def stop(self) -> None:
        """Leave the swarm, stop the engine (its containers stop with it), delete its bridge and its files."""
        if self.client is not None:
            for step in (("swarm", "leave", "--force"), ("network", "rm", "docker_gwbridge")):
                try:
                    self.docker(*step, timeout_s=60)
                except (RuntimeError, subprocess.TimeoutExpired):
                    pass
            self.client.close()
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(STOP_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        subprocess.run(["ip", "link", "delete", self.gw_bridge], capture_output=True, check=False)
        # Mounts the engine left behind (it unmounts on a clean stop) would keep files busy.
        for root in (self.run_dir, self.data_root):
            mounts = [line.split()[1] for line in Path("/proc/mounts").read_text().splitlines()
                      if line.split()[1].startswith(str(root))]
            for point in sorted(mounts, reverse=True):
                subprocess.run(["umount", "-l", point], capture_output=True, check=False)
            shutil.rmtree(root, ignore_errors=True)
        # Its cgroup parent, one folder per controller (cgroup v1) or one (v2); empty once its containers are gone.
        cgroups = Path("/sys/fs/cgroup")
        for parent in [*cgroups.glob(f"*/{self.name}"), cgroups / self.name]:
            if not parent.is_dir():
                continue
            for folder in sorted((p for p in parent.rglob("*") if p.is_dir()), key=lambda p: -len(p.parts)):
                with contextlib.suppress(OSError):
                    folder.rmdir()
            with contextlib.suppress(OSError):
                parent.rmdir()
