"""The chaos soak's driver (run by scripts/soak.sh, which starts the services).

Starts three workers (two with --nodes 1), sends a steady stream of tasks with Celery, injects
faults on a schedule drawn from the seed, drains, and judges the run from
the outside only: the Celery events (every event carries its sender's
hostname and pid, so each worker life is told apart), the warehouse's files,
Docker's events (an offliner container created twice for one task is a
scrape redone) and /proc. Prints the table and `N passed, M failed`; exits 1 if a check
failed.
"""

import argparse
import base64
import collections
import hashlib
import json
import os
import random
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.parse
import urllib.request

from celery import Celery

DOCKER_NODES = ["soak-d1", "soak-d2"]
SIM_NODE = "soak-s1"
FAULTS = [
    "close_connections",
    "sshd_restart",
    "kill_worker",
    "docker_kill",
    "fill_disk",
    "slow_dispatcher",
    "sigterm_restart",
    "kill9_restart",
    "stall",
    "broker_alarm",
]
TASK_LABEL = "org.openzim.zimfarm.task"
ROLE_LABEL = "org.openzim.zimfarm.role"
FINAL = ("task-succeeded", "task-failed", "task-revoked")
DRAIN_SECONDS = 240
WARM_UP_TASKS = 10
MIB = 1024 * 1024
# The longest stall (SIGSTOP) of a worker, and the RESTART_GRACE the workers
# get: longer than the longest stall plus a restart, so that a node that is
# only frozen or restarting never has its tasks run elsewhere.
STALL_MAX_SECONDS = 60
RESTART_GRACE = 120
# A RabbitMQ memory alarm: the watermark set for it (every publishing
# connection blocked), how long, and RabbitMQ's default, restored after it
# and at the soak's start and end.
ALARM_WATERMARK = "0.000001"
ALARM_SECONDS = 15
NORMAL_WATERMARK = "0.4"
# How much longer than --seconds tasks are sent and faults injected, at
# most, until every fault kind asked for has been injected once.
EXTEND_MAX_SECONDS = 120


def log(text):
    print(f"    [{time.strftime('%H:%M:%S')}] {text}", flush=True)


# ------------------------------------------------------------ the services


def set_watermark(value):
    """RabbitMQ's vm_memory_high_watermark (broker-wide)."""
    subprocess.run(
        ["rabbitmqctl", "set_vm_memory_high_watermark", value],
        capture_output=True,
        check=True,
        timeout=60,
    )


def api_call(api, method, path):
    url = urllib.parse.urlsplit(api)
    request = urllib.request.Request(
        f"{url.scheme}://{url.hostname}:{url.port}{url.path}{path}", method=method
    )
    token = f"{url.username}:{url.password}".encode()
    request.add_header("Authorization", "Basic " + base64.b64encode(token).decode())
    with urllib.request.urlopen(request, timeout=10) as response:
        body = response.read()
    return json.loads(body) if body else None


class SlowProxy:
    """A TCP proxy in front of the dispatcher stand-in; each new connection
    waits `delay` seconds before it is forwarded."""

    def __init__(self, upstream_port):
        self.upstream_port = upstream_port
        self.delay = 0.0
        self.listener = socket.socket()
        self.listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.listener.bind(("127.0.0.1", 0))
        self.listener.listen(64)
        self.port = self.listener.getsockname()[1]
        threading.Thread(target=self.accept, daemon=True).start()

    def accept(self):
        while True:
            client, _ = self.listener.accept()
            threading.Thread(target=self.serve, args=(client, self.delay), daemon=True).start()

    def serve(self, client, delay):
        time.sleep(delay)
        try:
            upstream = socket.create_connection(("127.0.0.1", self.upstream_port))
        except OSError:
            client.close()
            return
        for a, b in ((client, upstream), (upstream, client)):
            threading.Thread(target=self.pipe, args=(a, b), daemon=True).start()

    @staticmethod
    def pipe(src, dst):
        try:
            while True:
                data = src.recv(65536)
                if not data:
                    break
                dst.sendall(data)
        except OSError:
            pass
        finally:
            for s in (src, dst):
                try:
                    s.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass


class Warehouse:
    """The OpenSSH sshd the soak.sh started, stopped and started again."""

    def __init__(self, work, port):
        self.config = os.path.join(work, "sshd_config")
        self.port = port
        self.log = open(os.path.join(work, "sshd-restarted.log"), "ab")
        self.proc = None

    def pids(self):
        """The listener and every session process it forked."""
        listener = []
        children = collections.defaultdict(list)
        for pid in filter(str.isdigit, os.listdir("/proc")):
            try:
                with open(f"/proc/{pid}/cmdline", "rb") as f:
                    cmd = f.read()
                with open(f"/proc/{pid}/stat") as f:
                    ppid = int(f.read().rsplit(")", 1)[1].split()[1])
            except OSError:
                continue
            if self.config.encode() in cmd:
                listener.append(int(pid))
            children[ppid].append(int(pid))
        found, todo = [], list(listener)
        while todo:
            pid = todo.pop()
            found.append(pid)
            todo.extend(children.get(pid, []))
        return found

    def stop(self):
        for pid in self.pids():
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        if self.proc:
            self.proc.wait()

    def start(self):
        self.proc = subprocess.Popen(
            ["/usr/sbin/sshd", "-D", "-e", "-f", self.config], stderr=self.log
        )
        for _ in range(100):
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=1).close()
                return
            except OSError:
                time.sleep(0.05)


# ---------------------------------------------------------------- workers


def proc_figures(pid):
    """(RSS in KiB, open descriptors) of a live process, or None."""
    try:
        with open(f"/proc/{pid}/status") as f:
            rss = next(int(l.split()[1]) for l in f if l.startswith("VmRSS:"))
        fds = len(os.listdir(f"/proc/{pid}/fd"))
    except (OSError, StopIteration):
        return None
    return rss, fds


def socket_peers(pid):
    """Socket inode -> what it is connected to ("tcp 127.0.0.1:5672",
    "unix /var/run/docker.sock"), from the process's own /proc/<pid>/net."""
    peers = {}
    for table in ("tcp", "tcp6"):
        try:
            with open(f"/proc/{pid}/net/{table}") as f:
                next(f)
                for line in f:
                    cols = line.split()
                    remote, inode = cols[2], cols[9]
                    addr, port = remote.rsplit(":", 1)
                    if len(addr) == 8:
                        host = socket.inet_ntop(socket.AF_INET, bytes.fromhex(addr)[::-1])
                    else:
                        host = "ipv6"
                    peers[inode] = f"tcp {host}:{int(port, 16)}"
        except OSError:
            pass
    try:
        with open(f"/proc/{pid}/net/unix") as f:
            next(f)
            for line in f:
                cols = line.split()
                peers[cols[6]] = f"unix {cols[7] if len(cols) > 7 else '(unnamed)'}"
    except OSError:
        pass
    return peers


def open_descriptors(pid):
    """What the process's open descriptors are, counted by kind."""
    kinds = collections.Counter()
    peers = socket_peers(pid)
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            target = os.readlink(f"/proc/{pid}/fd/{fd}")
        except OSError:
            continue
        if target.startswith("socket:["):
            target = peers.get(target[8:-1], "socket")
        elif target.startswith("/"):
            target = "file " + target
        kinds[target] += 1
    return kinds


class Life:
    """One process of a worker, from start to exit."""

    def __init__(self, node, proc, log_path):
        self.node = node
        self.proc = proc
        self.log_path = log_path
        self.began = time.monotonic()
        self.start = None  # (rss, fds) once warm
        self.end = None
        self.start_fds = collections.Counter()  # kind -> count, with start
        self.end_fds = collections.Counter()
        self.ended_at = None
        self.how = "running"

    def ran(self):
        return (self.ended_at or time.monotonic()) - self.began

    def sample_start(self):
        if self.start is None:
            self.start = proc_figures(self.proc.pid)
            self.start_fds = self.descriptors()

    def sample_end(self):
        figures = proc_figures(self.proc.pid)
        if figures:
            self.end = figures
            self.end_fds = self.descriptors()

    def descriptors(self):
        try:
            return open_descriptors(self.proc.pid)
        except OSError:
            return collections.Counter()

    def descriptors_grown(self):
        """The descriptors open at the end and not at the start, by kind."""
        grown = self.end_fds - self.start_fds
        return ", ".join(f"+{n} {kind}" for kind, n in sorted(grown.items()))


class Worker:
    def __init__(self, node, env, binary, work):
        self.node = node
        self.env = env
        self.binary = binary
        self.work = work
        self.lives = []

    @property
    def life(self):
        return self.lives[-1] if self.lives else None

    def start(self, wait=True):
        path = os.path.join(self.work, f"{self.node}-{len(self.lives)}.log")
        out = open(path, "wb")
        proc = subprocess.Popen(
            [self.binary],
            env={"PATH": os.environ["PATH"], **self.env},
            stdout=out,
            stderr=subprocess.STDOUT,
        )
        self.lives.append(Life(self.node, proc, path))
        if wait:
            self.wait_consuming()

    def wait_consuming(self, timeout=60, times=1):
        """Until this life logged `times` broker sessions going live."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with open(self.life.log_path, "rb") as f:
                if f.read().count(b"connected to the broker; consuming") >= times:
                    return True
            if self.life.proc.poll() is not None:
                break
            time.sleep(0.1)
        raise SystemExit(f"soak: worker {self.node} did not start; see {self.life.log_path}")

    def alive(self):
        return self.life is not None and self.life.proc.poll() is None

    def kill9(self):
        self.life.sample_end()
        self.life.how = "killed -9"
        self.life.proc.kill()
        self.life.proc.wait()
        self.life.ended_at = time.monotonic()

    def stop(self):
        """Stops for good (SIGQUIT): whatever still runs is stopped and
        removed, not kept for a next start that never comes."""
        if not self.alive():
            return
        if self.life.end is None:
            self.life.sample_end()
        self.life.how = "stopped"
        self.life.proc.send_signal(signal.SIGQUIT)
        try:
            self.life.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.life.proc.kill()
            self.life.how = "stopped (killed after 30 s)"
        self.life.ended_at = time.monotonic()

    def leave(self):
        """SIGTERM, as `docker stop` sends it: the worker leaves its running
        scrapes for its next start. Seconds from the signal to the exit."""
        self.life.sample_end()
        self.life.how = "left (SIGTERM)"
        signalled = time.monotonic()
        self.life.proc.send_signal(signal.SIGTERM)
        try:
            self.life.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.life.proc.kill()
            self.life.proc.wait()
            self.life.how = "left (SIGTERM; killed after 30 s)"
        self.life.ended_at = time.monotonic()
        return self.life.ended_at - signalled


# ------------------------------------------------------------------ soak


class Soak:
    def __init__(self, opts):
        self.opts = opts
        self.rng = random.Random(opts.seed)
        self.app = Celery(broker=opts.broker)
        self.app.conf.broker_transport_options = {"confirm_publish": True}
        self.sent = {}  # id -> kind ("docker" or "sim"), flags
        self.faults = collections.Counter()
        self.fault_log = []
        disp = urllib.parse.urlsplit(opts.dispatcher)
        self.proxy = SlowProxy(disp.port)
        dispatcher = urllib.parse.urlunsplit(
            (disp.scheme, f"127.0.0.1:{self.proxy.port}", disp.path, "", "")
        )
        self.warehouse = Warehouse(opts.work, opts.sftp_port)
        self.disk_ok = os.path.ismount(opts.disk)
        common = {
            "USERNAME": opts.user,
            "PASSWORD": opts.password,
            "BROKER_URL": opts.broker,
            "DISPATCHER_URL": dispatcher,
            "SHUTDOWN_GRACE": "10",
            "RESTART_GRACE": str(RESTART_GRACE),
            "LOG_LEVEL": "info",
        }
        self.docker_nodes = DOCKER_NODES[: opts.nodes]
        # The worker never killed nor restarted, so that one life spans the
        # soak for the RSS and descriptor checks: soak-d1 on a farm, the
        # simulate worker on one node (whose Docker worker is the one the
        # restart faults are about).
        self.spared = DOCKER_NODES[0] if opts.nodes > 1 else SIM_NODE
        self.sigterm_exits = []  # seconds from SIGTERM to the exit
        self.workers = []
        for node in self.docker_nodes:
            zims = os.path.join(opts.disk, node)
            os.makedirs(zims, exist_ok=True)
            self.workers.append(
                Worker(
                    node,
                    {
                        **common,
                        "NODE_NAME": node,
                        "QUEUES": "small",
                        "CONCURRENCY": "2",
                        "TASK_RUNNER": "docker",
                        "PULL_POLICY": "never",
                        "REDIS_IMAGE": "zimfarm/redis:test",
                        "MIN_FREE_DISK_MB": "40",
                        "WORKING_DIR": zims,
                        "ZIM_DIR": zims,
                        "WAREHOUSE_HOST": "127.0.0.1",
                        "WAREHOUSE_PORT": str(opts.sftp_port),
                        "SSH_KEY": os.path.join(opts.work, "id_ed25519"),
                        "WAREHOUSE_KNOWN_HOSTS": os.path.join(opts.work, "known_hosts"),
                    },
                    opts.worker,
                    opts.work,
                )
            )
        sim_dir = os.path.join(opts.work, SIM_NODE)
        os.makedirs(sim_dir, exist_ok=True)
        self.workers.append(
            Worker(
                SIM_NODE,
                {
                    **common,
                    "NODE_NAME": SIM_NODE,
                    "QUEUES": "medium",
                    "CONCURRENCY": "4",
                    "TASK_RUNNER": "simulate",
                    "WORKING_DIR": sim_dir,
                    "ZIM_DIR": sim_dir,
                },
                opts.worker,
                opts.work,
            )
        )
        self.restarts = []  # the threads of restarts to come
        self.stop_faults = threading.Event()
        # A short run gets short stalls, so that every fault kind fits.
        self.stall_max = min(STALL_MAX_SECONDS, max(15, opts.seconds // 4))

    # -- tasks

    def send_one(self, n):
        task_id = f"soak{self.opts.seed}x{n:05d}"
        if self.rng.random() < 0.6:
            mib = self.rng.randint(4, 24)
            flags = {
                "mwUrl": "https://en.wikipedia.org",
                "adminEmail": "soak@example.org",
                "name": f"soak_{n}",
                "sleep": round(self.rng.uniform(1.0, 4.0), 1),
                "fill": mib,
            }
            kwargs = {
                "flags": flags,
                "image": {"name": "openzim/mwoffliner", "tag": "test"},
                "warehouse_path": f"/soak/{task_id}",
            }
            self.sent[task_id] = ("docker", mib, f"soak_{n}.zim")
            queue = "small"
        else:
            kwargs = {
                "flags": {"mwUrl": "https://en.wikipedia.org", "adminEmail": "soak@example.org"},
                "image": {"name": "openzim/mwoffliner", "tag": "test"},
                "warehouse_path": "/sim",
                "simulate": {"sleep": round(self.rng.uniform(0.5, 3.0), 1)},
            }
            self.sent[task_id] = ("sim", 0, None)
            queue = "medium"
        self.app.send_task(
            "offliner.mwoffliner",
            kwargs=kwargs,
            task_id=task_id,
            exchange="offliner",
            routing_key=queue,
        )
        return task_id

    # -- faults

    def worker_by(self, node):
        return next(w for w in self.workers if w.node == node)

    def restart_later(self, worker, delay):
        def later():
            time.sleep(delay)
            worker.start(wait=False)

        thread = threading.Thread(target=later, daemon=True)
        thread.start()
        self.restarts.append(thread)

    def close_connections(self, node=None):
        node = node or self.rng.choice([w.node for w in self.workers])
        name = f"zimfarm-worker {self.opts.user}@{node}"
        conns = api_call(self.opts.api, "GET", f"/vhosts/{self.opts.vhost}/connections") or []
        closed = 0
        for c in conns:
            if (c.get("client_properties") or {}).get("connection_name") == name:
                api_call(
                    self.opts.api, "DELETE", "/connections/" + urllib.parse.quote(c["name"], safe="")
                )
                closed += 1
        return f"closed {closed} broker connection(s) of {node}"

    def sshd_restart(self):
        # Mid-upload: as soon as a `.tmp` shows in the warehouse (5 s at most).
        deadline = time.monotonic() + 5
        seen = False
        while time.monotonic() < deadline and not seen:
            for root, _dirs, files in os.walk(os.path.join(self.opts.warehouse, "zim")):
                if any(f.endswith(".tmp") for f in files):
                    seen = True
                    break
            else:
                time.sleep(0.01)
        self.warehouse.stop()
        down = round(self.rng.uniform(1.0, 4.0), 1)
        time.sleep(down)
        self.warehouse.start()
        return f"sshd stopped {'mid-upload' if seen else '(no upload seen)'} for {down} s"

    def kill_worker(self):
        # One worker is spared: one life spans the soak, for the RSS and
        # descriptor checks.
        candidates = [w for w in self.workers if w.alive() and w.node != self.spared]
        if not candidates:
            return "no worker alive to kill"
        worker = self.rng.choice(candidates)
        worker.kill9()
        delay = round(self.rng.uniform(0.5, 3.0), 1)
        self.restart_later(worker, delay)
        return f"kill -9 {worker.node}, restarted {delay} s later"

    def docker_kill(self):
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline:
            out = subprocess.run(
                ["docker", "ps", "--format", "{{.Names}}", "--filter", "name=zimfarm_soak-"],
                capture_output=True,
                text=True,
            ).stdout.split()
            offliners = sorted(n for n in out if n.endswith("_offliner"))
            if offliners:
                victim = self.rng.choice(offliners)
                subprocess.run(["docker", "kill", victim], capture_output=True)
                return f"docker kill {victim}"
            time.sleep(0.2)
        return "no offliner running to kill"

    def fill_disk(self):
        if not self.disk_ok:
            return "skipped (no tmpfs)"
        st = os.statvfs(self.opts.disk)
        free = st.f_bavail * st.f_frsize
        blob = os.path.join(self.opts.disk, "soak-fill.bin")
        size = max(free - 2 * MIB, 0)
        with open(blob, "wb") as f:
            try:
                os.posix_fallocate(f.fileno(), 0, size)
            except OSError:
                pass
        held = round(self.rng.uniform(2.0, 5.0), 1)
        time.sleep(held)
        os.remove(blob)
        return f"disk filled ({size // MIB} MiB, 2 MiB left) for {held} s"

    def scraping_node(self):
        """A Docker worker (not the spared one) that runs an offliner, once
        one does (5 s at most), or None."""
        nodes = [w.node for w in self.workers
                 if w.alive() and w.node in self.docker_nodes and w.node != self.spared]
        deadline = time.monotonic() + 5
        while nodes and time.monotonic() < deadline:
            busy = [n for n in nodes if offliners_of(n)]
            if busy:
                return self.worker_by(self.rng.choice(sorted(busy)))
            time.sleep(0.2)
        return None

    def sigterm_restart(self):
        """`docker restart`: SIGTERM mid-scrape, started again once it left;
        its scrapes must be carried on, not redone."""
        worker = self.scraping_node()
        if worker is None:
            return "no scrape running on a worker that may be restarted"
        running = offliners_of(worker.node)
        took = worker.leave()
        self.sigterm_exits.append(took)
        worker.start(wait=False)
        return f"SIGTERM {worker.node} ({len(running)} scrape(s) running): exited in {took:.1f} s, started again"

    def kill9_restart(self):
        """A crash mid-scrape and a restart within 10 s (a supervisor's)."""
        worker = self.scraping_node()
        if worker is None:
            return "no scrape running on a worker that may be killed"
        running = offliners_of(worker.node)
        worker.kill9()
        delay = round(self.rng.uniform(1.0, 9.5), 1)
        self.restart_later(worker, delay)
        return f"kill -9 {worker.node} ({len(running)} scrape(s) running), restarted {delay} s later"

    def slow_dispatcher(self):
        delay = round(self.rng.uniform(2.0, 6.0), 1)
        self.proxy.delay = delay
        note = self.kill_worker()
        time.sleep(8)
        self.proxy.delay = 0.0
        return f"dispatcher delayed {delay} s per connection for 8 s; {note}"

    def stall(self):
        """A frozen node (swap storm, VM pause): a Docker worker SIGSTOPped
        for 15 s to 60 s (shorter in a short run), then SIGCONT. Its
        scrapes go on in their containers meanwhile; no node may run its
        tasks (RESTART_GRACE is longer than the longest stall)."""
        candidates = [w for w in self.workers if w.alive() and w.node in self.docker_nodes]
        if not candidates:
            return "no worker alive to stall"
        worker = self.rng.choice(candidates)
        held = round(self.rng.uniform(15.0, float(self.stall_max)), 1)
        running = offliners_of(worker.node)
        proc = worker.life.proc
        proc.send_signal(signal.SIGSTOP)
        try:
            time.sleep(held)
        finally:
            if proc.poll() is None:
                proc.send_signal(signal.SIGCONT)
        return f"SIGSTOP {worker.node} ({len(running)} scrape(s) running) for {held} s, then SIGCONT"

    def broker_alarm(self):
        """A RabbitMQ memory alarm: every publishing connection of the
        broker blocked (the workers' events and heartbeats, the soak's own
        task sends) for ALARM_SECONDS."""
        set_watermark(ALARM_WATERMARK)
        try:
            time.sleep(ALARM_SECONDS)
        finally:
            set_watermark(NORMAL_WATERMARK)
        return f"memory alarm (vm_memory_high_watermark {ALARM_WATERMARK}) for {ALARM_SECONDS} s"

    def every_kind_injected(self):
        return set(self.faults) >= set(self.opts.faults)

    def inject(self):
        deck = []
        # The gap between two faults: shorter in a short run, so that one
        # deck of the kinds asked for fits in it.
        hi = min(11.0, max(3.0, self.opts.seconds / max(len(self.opts.faults), 1) / 2))
        while not self.stop_faults.wait(self.rng.uniform(hi / 2, hi)):
            if not deck:
                # Only the kinds asked for: each deck injects every one of
                # them once, so a short run (the one-node CI run) gets them
                # all.
                deck = [f for f in FAULTS if f in self.opts.faults]
                self.rng.shuffle(deck)
            if not deck:
                continue
            fault = deck.pop()
            try:
                what = getattr(self, fault)()
            except Exception as exc:  # a fault that could not be injected
                what = f"could not inject: {exc!r}"
            if what.startswith("no scrape running"):
                # Nothing to restart mid-scrape now: the next draw tries
                # it again, rather than count a fault that did nothing.
                deck.append(fault)
                log(f"fault {fault} postponed: {what}")
                continue
            self.faults[fault] += 1
            self.fault_log.append((fault, what))
            log(f"fault {fault}: {what}")

    # -- the run

    def run(self):
        opts = self.opts
        events_path = os.path.join(opts.work, "events.jsonl")
        events_out = open(events_path, "wb")
        listener = subprocess.Popen(
            [
                sys.executable,
                os.path.join(os.path.dirname(__file__), "..", "tests", "py", "celery_client.py"),
                "events",
                "--broker",
                opts.broker,
                "--seconds",
                str(opts.seconds + DRAIN_SECONDS + 120),
            ],
            stdout=events_out,
        )
        for _ in range(200):
            with open(events_path, "rb") as f:
                if b'"ready"' in f.read():
                    break
            time.sleep(0.1)
        # Followed live: the engine replays only its last 256 events, too
        # few for `docker events --since` at the end of a soak.
        creates_path = os.path.join(opts.work, "docker-creates.jsonl")
        docker_events = subprocess.Popen(
            ["docker", "events", "--filter", "type=container", "--filter", "event=create",
             "--filter", f"label={ROLE_LABEL}=offliner", "--format", "{{json .}}"],
            stdout=open(creates_path, "wb"),
        )
        if "broker_alarm" in opts.faults:
            # One left by a soak that was killed would block every
            # publisher (scripts/test-env.sh resets it too).
            set_watermark(NORMAL_WATERMARK)
        for w in self.workers:
            w.start()
        # Warm-up, without faults: every worker has run tasks and uploads
        # once, then is idle when its start figures are taken.
        warm = [self.send_one(len(self.sent)) for _ in range(WARM_UP_TASKS)]
        self.wait_ended(events_path, warm, 120)
        # Then one broker connection cut per worker, before the start
        # figures: the first reconnect makes lapin's I/O thread drop its
        # old socket outside tokio, and async-compat starts its fallback
        # runtime for that once per process (one thread, 4 descriptors,
        # for good). Per-cut growth still shows at the end.
        for w in self.workers:
            self.close_connections(w.node)
        for w in self.workers:
            w.wait_consuming(times=2)
        time.sleep(3)
        for w in self.workers:
            w.life.sample_start()
        print(f"==> {len(self.workers)} workers up and warm; sending tasks and injecting faults for {opts.seconds} s")
        injector = threading.Thread(target=self.inject, daemon=True)
        injector.start()
        sampler = threading.Thread(target=self.sample_lives, daemon=True)
        sampler.start()
        began = time.monotonic()
        n = 0
        # Past --seconds while a fault kind asked for was not injected yet
        # (a short run), up to EXTEND_MAX_SECONDS more.
        while time.monotonic() - began < opts.seconds or (
            not self.every_kind_injected()
            and time.monotonic() - began < opts.seconds + EXTEND_MAX_SECONDS
        ):
            self.send_one(len(self.sent))
            n += 1
            time.sleep(self.rng.uniform(0.4, 1.2))
        if time.monotonic() - began > opts.seconds + 2:
            print(f"==> tasks and faults went on for {time.monotonic() - began:.0f} s, "
                  f"until every fault kind asked for was injected")
        self.stop_faults.set()
        injector.join()
        print(f"==> {n} tasks sent; draining (every worker up, at most {DRAIN_SECONDS} s)")
        for thread in self.restarts:
            thread.join()
        for w in self.workers:
            if not w.alive():
                w.start(wait=False)
        for w in self.workers:
            w.wait_consuming()
        deadline = time.monotonic() + DRAIN_SECONDS
        self.wait_ended(events_path, list(self.sent), DRAIN_SECONDS)
        # Redeliveries of tasks that ended (their ack lost with a killed
        # worker) are asked about and acked: the queues empty.
        while True:
            time.sleep(2)
            depth = {
                q: api_call(opts.api, "GET", f"/queues/{opts.vhost}/{q}")
                for q in ("small", "medium")
            }
            if all((d or {}).get("messages") == 0 for d in depth.values()):
                break
            if time.monotonic() > deadline:
                break
        for w in self.workers:
            w.life.sample_end()
        for w in self.workers:
            w.stop()
        listener.send_signal(signal.SIGTERM)
        listener.wait(timeout=30)
        self.warehouse.stop()
        docker_events.terminate()
        docker_events.wait(timeout=30)
        self.creates_path = creates_path
        return self.judge(events_path, depth, time.monotonic() - began)

    def wait_ended(self, events_path, ids, timeout):
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            ended = self.ended_ids(events_path)
            if all(i in ended for i in ids):
                return
            time.sleep(1)

    def sample_lives(self):
        """Each life's start figures once it is warm (15 s after its start,
        for lives begun after the warm-up), and every life's RSS and
        descriptors every 5 s into WORK/trace.csv."""
        with open(os.path.join(self.opts.work, "trace.csv"), "a") as trace:
            trace.write("seconds,life,rss_kib,fds\n")
            began = time.monotonic()
            while True:
                for w in self.workers:
                    life = w.life
                    if life and life.start is None and time.monotonic() - life.began > 15:
                        life.sample_start()
                    figures = life and life.proc.poll() is None and proc_figures(life.proc.pid)
                    if figures:
                        trace.write(f"{time.monotonic() - began:.0f},{w.node}#{len(w.lives) - 1},"
                                    f"{figures[0]},{figures[1]}\n")
                trace.flush()
                time.sleep(5)

    @staticmethod
    def read_events(path):
        out = []
        with open(path, "rb") as f:
            for line in f:
                try:
                    e = json.loads(line)
                except ValueError:
                    continue
                if "type" in e:
                    out.append(e)
        return out

    def ended_ids(self, path):
        return {e.get("uuid") for e in self.read_events(path) if e["type"] in FINAL}

    # -- the verdict

    def offliner_creates(self):
        """Task id -> how many offliner containers the engine created for it
        during the soak (Docker's events)."""
        with open(self.creates_path) as f:
            out = f.read()
        creates = collections.Counter()
        for line in out.splitlines():
            try:
                attributes = json.loads(line)["Actor"]["Attributes"]
            except (ValueError, KeyError):
                continue
            if attributes.get(ROLE_LABEL) == "offliner":
                creates[attributes.get(TASK_LABEL)] += 1
        return creates

    def creation_times(self, task_id):
        """When the engine created task `task_id`'s offliners (epoch s)."""
        times = []
        with open(self.creates_path) as f:
            for line in f:
                try:
                    event = json.loads(line)
                    attributes = event["Actor"]["Attributes"]
                except (ValueError, KeyError):
                    continue
                if attributes.get(ROLE_LABEL) == "offliner" and attributes.get(TASK_LABEL) == task_id:
                    times.append(event.get("timeNano", 0) / 1e9)
        return times

    def judge(self, events_path, depth, elapsed):
        events = self.read_events(events_path)
        by_task = collections.defaultdict(list)
        for e in events:
            if e.get("uuid") in self.sent:
                by_task[e["uuid"]].append(e)
        creates = self.offliner_creates()
        redone = sorted(t for t in self.sent if creates[t] > 1)
        seen = sum(1 for t, (kind, _, _) in self.sent.items() if kind == "docker" and creates[t])
        unseen = sorted(
            t for t in self.sent
            if not creates[t]
            and any(e["type"] == "task-container_started" for e in by_task.get(t, []))
        )
        demo = subprocess.run(
            ["docker", "run", "--rm", "--network", "none", "--entrypoint", "cat",
             "openzim/mwoffliner:test", "/opt/zims/demo.zim"],
            capture_output=True,
            check=True,
        ).stdout
        demo_md5 = hashlib.md5(demo).hexdigest()
        succeeded, lost, doubled, disagreed = 0, [], [], []
        failures = collections.Counter()
        zims_ok, zims_bad = 0, []
        for task_id, (kind, mib, zim_name) in self.sent.items():
            evs = by_task.get(task_id, [])
            finals = [e for e in evs if e["type"] in FINAL]
            if not finals:
                lost.append(task_id)
                continue
            # A run: a task-started, by one worker life (hostname, pid); it
            # finished if that life sent a final event for it afterwards.
            runs = [(e["hostname"], e.get("pid")) for e in evs if e["type"] == "task-started"]
            finished = {
                (e["hostname"], e.get("pid"))
                for e in finals
                if (e["hostname"], e.get("pid")) in runs
            }
            if len(runs) > len(set(runs)) or len(finished) > 1:
                doubled.append(task_id)
            types = {e["type"] for e in finals}
            if len(types) > 1:
                disagreed.append(task_id)
                continue
            if types == {"task-succeeded"}:
                succeeded += 1
                if kind == "docker":
                    where = os.path.join(self.opts.warehouse, "zim", "soak", task_id)
                    names = sorted(os.listdir(where)) if os.path.isdir(where) else []
                    zims = [x for x in names if x.endswith(".zim")]
                    if len(zims) > 1:
                        doubled.append(task_id)
                    ok = zims == [zim_name]
                    if ok:
                        with open(os.path.join(where, zims[0]), "rb") as f:
                            ok = hashlib.md5(f.read()).hexdigest() == demo_md5
                        fill = os.path.join(where, "fill.bin")
                        ok = ok and os.path.getsize(fill) == mib * MIB
                        if ok:
                            with open(fill, "rb") as f:
                                while chunk := f.read(MIB):
                                    if chunk.count(0) != len(chunk):
                                        ok = False
                                        break
                    if ok:
                        zims_ok += 1
                    else:
                        zims_bad.append(task_id)
            else:
                e = finals[-1]
                if e["type"] == "task-revoked":
                    failures["revoked"] += 1
                else:
                    failures[reason_of(e.get("exception", ""))] += 1

        print()
        print(f"soak: seed {self.opts.seed}, {self.opts.seconds} s of tasks and faults, "
              f"{elapsed:.0f} s in all; workers {', '.join(self.docker_nodes)} (docker, 2 slots each), "
              f"{SIM_NODE} (simulate, 4 slots); RESTART_GRACE {RESTART_GRACE} s, "
              f"stalls of at most {self.stall_max} s")
        print("faults injected: " + ", ".join(f"{k} {v}" for k, v in sorted(self.faults.items())))
        print()
        print("| tasks | count |")
        print("|---|---|")
        print(f"| sent | {len(self.sent)} ({sum(1 for k, _, _ in self.sent.values() if k == 'docker')} docker, "
              f"{sum(1 for k, _, _ in self.sent.values() if k == 'sim')} simulate) |")
        print(f"| succeeded | {succeeded} |")
        print(f"| failed | {sum(failures.values())} |")
        for reason, count in failures.most_common():
            print(f"| - {reason} | {count} |")
        print(f"| final events disagree | {len(disagreed)} |")
        print(f"| lost (no final event after the drain) | {len(lost)} |")
        print(f"| doubled | {len(doubled)} |")
        print(f"| scrapes redone (offliner created more than once) | {len(redone)} "
              f"(of {seen} docker tasks whose creation Docker reported) |")
        print(f"| ZIMs byte-identical (docker, succeeded) | {zims_ok} of {zims_ok + len(zims_bad)} |")
        left = {q: (d or {}).get("messages", "?") for q, d in depth.items()}
        print(f"| messages left in the queues | {left} |")
        print()
        if self.sigterm_exits:
            print(f"SIGTERM to exit: {len(self.sigterm_exits)} restart(s), "
                  f"{min(self.sigterm_exits):.1f} s to {max(self.sigterm_exits):.1f} s")
        for w in self.workers:
            for i, life in enumerate(w.lives[1:], start=1):
                for line in adopted_lines(life.log_path):
                    print(f"{w.node}#{i} adopted: {line}")
        # A scrape redone is traced: what each worker life said of it, and
        # when Docker created its offliners.
        for t in redone[:3]:
            print(f"trace of the redone scrape {t}:")
            for w in self.workers:
                for i, life in enumerate(w.lives):
                    for line in lines_naming(life.log_path, t):
                        print(f"  {w.node}#{i}: {line}")
            for when in self.creation_times(t):
                print(f"  docker: offliner created at {when}")
        print()
        print("| worker life | how it ended | ran s | RSS start → end MiB | growth | fds start → end |")
        print("|---|---|---|---|---|---|")
        rss_ok, fds_ok, judged_lives = True, True, 0
        fds_grown = []
        for w in self.workers:
            for i, life in enumerate(w.lives):
                ran = life.ran()
                s, e = life.start, life.end
                if s and e:
                    growth = (e[0] - s[0]) / s[0] * 100
                    judged = i == 0 and life.how == "stopped"
                    judged_lives += judged
                    if judged and growth > 10:
                        rss_ok = False
                    if judged and e[1] > s[1] + 2:
                        fds_ok = False
                        fds_grown.append(f"{w.node}#{i}: {life.descriptors_grown()}")
                    print(f"| {w.node}#{i} | {life.how} | {ran:.0f} | {s[0] / 1024:.1f} → {e[0] / 1024:.1f} | "
                          f"{growth:+.1f}%{'' if judged else ' (not judged)'} | {s[1]} → {e[1]} |")
                else:
                    print(f"| {w.node}#{i} | {life.how} | {ran:.0f} | too short to sample | | |")
        print()
        checks = [
            ("0 lost", not lost, lost[:5]),
            ("0 doubled", not doubled, doubled[:5]),
            ("every task's final events agree", not disagreed, disagreed[:5]),
            ("every uploaded ZIM byte-identical to the scraper's", not zims_bad, zims_bad[:5]),
            ("queues drained", all(v == 0 for v in left.values()), left),
            ("RSS growth at most 10% (lives from the warm-up to the end)",
             rss_ok and judged_lives > 0, f"{judged_lives} life judged"),
            ("open descriptors flat (at most +2)", fds_ok and judged_lives > 0,
             "; ".join(fds_grown) or f"{judged_lives} life judged"),
            # The figure counts: every task whose scraper started (its
            # task-container_started) has its creation in Docker's events.
            ("Docker's events show every scraper started",
             not unseen, unseen[:5]),
            # On the farm as on one node: a node that is killed, restarted,
            # frozen or cut off never has its scrape run again elsewhere
            # (RESTART_GRACE is longer than any of those).
            ("0 scrapes redone", not redone, redone[:5]),
            ("every fault kind asked for injected",
             self.every_kind_injected(),
             sorted(set(self.opts.faults) - set(self.faults))),
        ]
        passed = failed = 0
        for name, ok, detail in checks:
            passed += ok
            failed += not ok
            print(f"{'PASS' if ok else 'FAIL'} {name}{'' if ok else f': {detail}'}")
        print(f"{passed} passed, {failed} failed")
        return 0 if failed == 0 else 1


def offliners_of(node):
    """Names of the running offliner containers of a node."""
    out = subprocess.run(
        ["docker", "ps", "--filter", f"label=org.openzim.zimfarm.node={node}",
         "--filter", f"label={ROLE_LABEL}=offliner", "--format", "{{.Names}}"],
        capture_output=True, text=True,
    ).stdout
    return out.split()


def lines_naming(path, task_id, most=40):
    """The last lines of a worker life's log that name `task_id`."""
    try:
        with open(path, errors="replace") as f:
            return [l.strip() for l in f if task_id in l][-most:]
    except OSError:
        return []


def adopted_lines(path):
    """The start-up lines of a worker life about the tasks it adopted."""
    try:
        with open(path, errors="replace") as f:
            return [l.strip() for l in f if "adopt" in l.lower()][:10]
    except OSError:
        return []


def reason_of(exception):
    """`RuntimeError('the offliner was killed by SIGKILL ...')` → a short reason."""
    kind = exception.split("(", 1)[0] or "unknown"
    text = exception.lower()
    for needle, reason in (
        ("killed by sigkill", "offliner killed from outside"),
        ("filled up during the scrape", "disk filled up during the scrape"),
        ("below min_free_disk_mb", "refused at start: disk below MIN_FREE_DISK_MB"),
        ("upload", "upload failed"),
        ("warehouse", "upload failed"),
    ):
        if needle in text:
            return f"{kind}: {reason}"
    return f"{kind}: {exception[:100]}"


def main():
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--seconds", type=int, required=True)
    p.add_argument("--seed", type=int, required=True)
    p.add_argument("--worker", required=True)
    p.add_argument("--broker", required=True)
    p.add_argument("--api", required=True)
    p.add_argument("--vhost", required=True)
    p.add_argument("--work", required=True)
    p.add_argument("--disk", required=True)
    p.add_argument("--warehouse", required=True)
    p.add_argument("--sftp-port", type=int, required=True)
    p.add_argument("--dispatcher", required=True)
    p.add_argument("--user", required=True)
    p.add_argument("--password", required=True)
    p.add_argument("--nodes", type=int, choices=(1, 2), default=2,
                   help="Docker workers: 2 (a farm) or 1 (judged on 0 scrapes redone)")
    p.add_argument("--faults", default="all",
                   help=f"comma-separated, of {','.join(FAULTS)}; 'all' or 'none'")
    opts = p.parse_args()
    if opts.faults == "all":
        opts.faults = list(FAULTS)
    elif opts.faults == "none":
        opts.faults = []
    else:
        opts.faults = opts.faults.split(",")
        unknown = sorted(set(opts.faults) - set(FAULTS))
        if unknown:
            p.error(f"unknown fault(s) {unknown}; choose from {FAULTS}")
    opts.worker = os.path.abspath(opts.worker)
    soak = Soak(opts)
    try:
        return soak.run()
    finally:
        if "broker_alarm" in opts.faults:
            set_watermark(NORMAL_WATERMARK)
        for w in soak.workers:
            if w.alive():
                w.life.proc.kill()


if __name__ == "__main__":
    sys.exit(main())
