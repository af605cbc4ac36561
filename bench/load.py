"""Load benchmark (not a test): several annotators' clients hammer one server with inference while it trains.

It starts a real server on loopback (``python -m monailabel.main start_server``, authentication on,
an annotator and an admin created in a fresh auth folder), optionally starts a training run as the
admin, and then runs ``--clients`` client threads for ``--seconds``. Each client sends
``POST /infer/cdpdnet?image=<id>`` for images of the studies folder in turn; a ``503`` is retried after
the server's ``Retry-After`` (up to ``--max-retries`` times); any other answer ends that request. It
samples the resident memory of the server and all its children (the training subprocess included)
every 0.5 s. It prints, and writes to ``--out``/load.json:

* requests completed per minute, held over the run;
* latency percentiles (p50/p90/p99/max) of completed requests, from the first try to the answer
  (waits after a 503 included), and of single attempts;
* outcomes: 200, 503 (refused, then retried), other statuses, given up, lost (no answer at all), and
  what the server logged it answered (its audit lines), to compare;
* peak resident memory of the server process tree, and the training status at the end.

Usage (the demo's studies and model; see docs/benchmarks.md)::

    HF_HUB_OFFLINE=1 python bench/load.py --studies data/demo/studies --clients 6 --seconds 180 --train
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _default_model() -> Path | None:
    cache = Path(os.environ.get("CDPDNET_CACHE", Path.home() / ".cache" / "cdpdnet")) / "models"
    models = sorted(cache.glob("demo-*.pt"), key=lambda p: p.stat().st_mtime)
    return models[-1] if models else None


def _pct(xs: list[float], q: float) -> float | None:
    if not xs:
        return None
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(round(q / 100 * (len(xs) - 1))))]


class TreeMemory(threading.Thread):
    """Peak resident memory of a process and all its descendants, sampled every ``period`` s."""

    def __init__(self, pid: int, period: float = 0.5):
        super().__init__(daemon=True)
        import psutil

        self.root = psutil.Process(pid)
        self.period = period
        self.peak = 0
        self.peak_children = 0
        self._stop = threading.Event()

    def run(self):
        import psutil

        while not self._stop.is_set():
            try:
                procs = [self.root, *self.root.children(recursive=True)]
                total = 0
                for p in procs:
                    try:
                        total += p.memory_info().rss
                    except psutil.Error:
                        pass
                self.peak = max(self.peak, total)
                self.peak_children = max(self.peak_children, len(procs) - 1)
            except psutil.Error:
                pass
            self._stop.wait(self.period)

    def stop(self):
        self._stop.set()


def start_server(studies: Path, model: Path, work: Path, preset: str, max_queued: int):
    from lib.server.users import UserStore

    model_dir = work / "model"
    model_dir.mkdir(parents=True)
    shutil.copy(model, model_dir / "pretrained_cdpdnet.pt")
    auth = work / "auth"
    users = UserStore(auth)
    users.initialise()
    passwords = {"admin": (auth / "initial-admin-password").read_text().strip(),
                 "annotator": users.set_user("annotator", "annotator")}
    port = _free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("MONAI_LABEL_")}
    env.update({"HF_HUB_OFFLINE": "1", "MLFLOW_ALLOW_FILE_STORE": "true", "MONAI_LABEL_AUTO_UPDATE_SCORING": "false"})
    cmd = [sys.executable, "-m", "monailabel.main", "start_server", "--app", str(REPO / "apps" / "cdpdnet"),
           "--studies", str(studies), "--conf", "models", "cdpdnet", "--conf", "preset", preset,
           "--conf", "model_dir", str(model_dir), "--conf", "auth_dir", str(auth),
           "--conf", "max_queued_infers", str(max_queued), "--host", "127.0.0.1", "--port", str(port)]
    log = open(work / "server.log", "wb")
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True,
                            cwd=str(work))
    return proc, f"http://127.0.0.1:{port}", passwords


def _audit_counts(log: Path) -> dict[str, int]:
    """What the server itself answered to POST /infer/cdpdnet (its audit lines), warm-up included."""
    counts: dict[str, int] = {}
    for line in log.read_text(errors="replace").splitlines():
        if "POST /infer/cdpdnet -> " in line and "audit:" in line:
            code = line.rsplit("-> ", 1)[1].strip()
            counts[code] = counts.get(code, 0) + 1
    return counts


def login(url: str, user: str, password: str) -> dict:
    import requests

    r = requests.post(f"{url}/auth/token", data={"username": user, "password": password}, timeout=30)
    r.raise_for_status()
    return {"Authorization": f"Bearer {r.json()['access_token']}"}


def client_loop(idx, url, headers, images, deadline, max_retries, records, lock):
    import requests

    n = idx
    while time.monotonic() < deadline:
        image = images[n % len(images)]
        n += 1
        t0 = time.monotonic()
        attempts, refused, status = [], 0, None
        while True:
            t = time.monotonic()
            try:
                # a new connection per request, as MONAI Label's client does: a kept-alive connection that the
                # server closes while the client waits out a Retry-After fails the next POST on the client side
                r = requests.post(f"{url}/infer/cdpdnet", params={"image": image, "output": "json"},
                                  data={"params": "{}"}, headers={**headers, "Connection": "close"}, timeout=600)
                status = r.status_code
            except requests.RequestException as e:
                status = f"no answer: {type(e).__name__}: {e}"
            attempts.append(time.monotonic() - t)
            if status == 503 and refused < max_retries:
                refused += 1
                time.sleep(float(r.headers.get("retry-after", "1")))
                continue
            break
        with lock:
            records.append({"client": idx, "image": image, "status": status, "refused": refused,
                            "latency_s": time.monotonic() - t0, "attempts_s": attempts, "end": time.monotonic()})


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--studies", type=Path, default=REPO / "data" / "demo" / "studies")
    ap.add_argument("--model", type=Path, default=None, help="checkpoint (default: the newest demo model in the cache)")
    ap.add_argument("--preset", default="lite")
    ap.add_argument("--images", nargs="*", default=None, help="image ids to infer on (default: all in --studies)")
    ap.add_argument("--clients", type=int, default=6)
    ap.add_argument("--seconds", type=float, default=180)
    ap.add_argument("--max-retries", type=int, default=100)
    ap.add_argument("--max-queued", type=int, default=4, help="--conf max_queued_infers of the server")
    ap.add_argument("--train", action="store_true", help="start a training run (as admin) before the load")
    ap.add_argument("--out", type=Path, default=REPO / "runs" / "bench-load")
    args = ap.parse_args(argv)

    import requests

    model = args.model or _default_model()
    if model is None or not model.is_file():
        ap.error("no model: pass --model or run scripts/make_demo_model.py first")
    images = args.images or sorted(p.name[:-7] for p in args.studies.glob("*.nii.gz"))
    work = Path(tempfile.mkdtemp(prefix="cdpdnet-load-"))
    studies = work / "studies"
    shutil.copytree(args.studies, studies)
    proc, url, passwords = start_server(studies, model, work, args.preset, args.max_queued)
    mem = TreeMemory(proc.pid)
    try:
        t = time.monotonic()
        while True:
            if proc.poll() is not None:
                raise SystemExit(f"server exited; see {work / 'server.log'}")
            try:
                if requests.get(f"{url}/auth/", timeout=5).ok:
                    break
            except requests.RequestException:
                pass
            if time.monotonic() - t > 300:
                raise SystemExit("server did not start in 300 s")
            time.sleep(1)
        mem.start()
        annot, admin = login(url, "annotator", passwords["annotator"]), login(url, "admin", passwords["admin"])
        # one warm-up inference (model load) outside the measurement
        requests.post(f"{url}/infer/cdpdnet", params={"image": images[0], "output": "json"}, data={"params": "{}"},
                      headers=annot, timeout=600).raise_for_status()
        if args.train:
            r = requests.post(f"{url}/train/cdpdnet", json={"max_epochs": 1000, "max_minutes": args.seconds / 60 + 5},
                              headers=admin, timeout=60)
            r.raise_for_status()
            time.sleep(5)
        records, lock = [], threading.Lock()
        start = time.monotonic()
        deadline = start + args.seconds
        threads = [threading.Thread(target=client_loop, args=(i, url, annot, images, deadline, args.max_retries,
                                                              records, lock)) for i in range(args.clients)]
        for th in threads:
            th.start()
        for th in threads:
            th.join()
        elapsed = time.monotonic() - start
        train = requests.get(f"{url}/train/", headers=admin, timeout=30).json() if args.train else {}
        info_ok = requests.get(f"{url}/info/", headers=annot, timeout=30).ok
    finally:
        mem.stop()
        try:
            os.killpg(proc.pid, signal.SIGTERM)
            proc.wait(timeout=60)
        except (ProcessLookupError, subprocess.TimeoutExpired):
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass

    ok = [r for r in records if r["status"] == 200]
    statuses: dict[str, int] = {}
    for r in records:
        statuses[str(r["status"])] = statuses.get(str(r["status"]), 0) + 1
    attempts = [a for r in records for a in r["attempts_s"]]
    summary = {
        "clients": args.clients, "seconds": round(elapsed, 1), "images": images, "training": bool(args.train),
        "max_queued_infers": args.max_queued, "requests": len(records), "completed": len(ok),
        "completed_per_minute": round(len(ok) / elapsed * 60, 1),
        "refusals_503": sum(r["refused"] for r in records),
        "requests_refused_at_least_once": sum(1 for r in records if r["refused"]),
        "final_statuses": statuses,
        "given_up": sum(1 for r in records if r["status"] == 503),
        "lost": sum(1 for r in records if isinstance(r["status"], str)),
        "server_logged_infer_answers": _audit_counts(work / "server.log"),
        "latency_s": {q: _pct([r["latency_s"] for r in ok], v) for q, v in (("p50", 50), ("p90", 90), ("p99", 99),
                                                                          ("max", 100))},
        "attempt_s": {q: _pct(attempts, v) for q, v in (("p50", 50), ("p90", 90), ("p99", 99), ("max", 100))},
        "peak_rss_server_tree_mib": round(mem.peak / 2 ** 20),
        "max_child_processes": mem.peak_children,
        "server_answers_info_after": info_ok,
        "train_status_after": {k: train.get(k) for k in ("status", "result")} if train else None,
        "model": str(model), "server_log": str(work / "server.log"),
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "load.json").write_text(json.dumps(summary, indent=2, default=str))
    print(json.dumps({k: v for k, v in summary.items() if k not in ("images",)}, indent=2, default=str))
    return 0 if summary["lost"] == 0 and info_ok else 1


if __name__ == "__main__":
    sys.exit(main())
