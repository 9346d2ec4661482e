"""Re-run the second hostile probe's table (shared/probes/bad-inputs-2026-12-04.md) against this checkout.

Every row of the table is rebuilt here: the same crafted files, the same commands, in a scratch folder,
and each outcome is judged by the same rules as the probe, in this order:
  hang         the command did not end within its time limit;
  code run     a marker file that only code from a data file would write appeared;
  read outside a secret placed outside the run folder reached an output, a page or a response;
  data lost    a file that must not change (the 'victims') changed or vanished;
  traceback    a Python traceback reached the terminal;
  wrong exit   the exit status says the opposite of what happened;
  unclear      the one line is missing, or a weak spot the table marked S is still there.
What is left is 'held'. The script prints a table of every case and the counts by kind and severity,
and exits 1 when anything failed.

    python scripts/probe_table.py                # everything (about 15 minutes on 2 cores)
    python scripts/probe_table.py --only 7 --only 9.2   # sections or cases by prefix
    python scripts/probe_table.py --keep probe/  # keep the scratch folder to look inside

Some cases need a privilege or a program this machine may lack (a read-only mount needs root, the
browser cases need Chromium and playwright, torchrun cases need two processes); they are reported as
'not run' with the reason, never counted as held.
"""

from __future__ import annotations

import argparse
import hashlib
import http.client
import json
import os
import re
import resource
import shutil
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import time
import zipfile
import zlib
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SECRET = "TOP SECRET outside the run folder"
PASSWD_MARK = "root:x:0:0"
SEVERITIES = ("hang", "code run", "read outside", "data lost", "traceback", "wrong exit", "unclear")


@dataclass
class Outcome:
    """What one command did."""

    rc: int | None
    out: str
    timed_out: bool = False
    extra: str = ""  # text the case collected elsewhere (HTTP bodies, written pages)


@dataclass
class Result:
    case: str
    rows: int
    verdict: str  # held / failed / weak / not run
    severity: str = ""
    detail: str = ""


@dataclass
class Case:
    """One row of the table (or a range of rows that share a command shape)."""

    id: str
    what: str
    argv: list[str] | Callable[[], Outcome] | None = None
    rows: int = 1
    expect: str = "error"  # error: non-zero with one 'error:' line; ok: exit 0; any: exit status not judged
    timeout: float = 120
    setup: Callable[[], None] | None = None
    victims: tuple[str, ...] = ()
    check: Callable[[Outcome], tuple[str, str] | None] | None = None  # -> (severity, why) or None
    limits: dict[int, int] = field(default_factory=dict)  # resource limits for the child
    interrupt: tuple[int, float] | None = None  # (signal, seconds after start)
    cwd: str = ""
    env: dict[str, str] = field(default_factory=dict)
    needs: Callable[[], str] | None = None  # -> '' when it can run, else why not


W = Path()  # the scratch folder, set in main()


def tokenscope(*args: str) -> list[str]:
    return [sys.executable, "-m", "tokenscope", *map(str, args)]


def child_env(extra: dict[str, str | None] | None = None) -> dict[str, str]:
    env = {**os.environ, "TOKENSCOPE_OFFLINE": "1", "TOKENSCOPE_HOME": str(W / "tshome"),
           "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""), "COLUMNS": "200"}
    for key, value in (extra or {}).items():
        if value is None:
            env.pop(key, None)
        else:
            env[key] = str(W / value) if key == "TOKENSCOPE_HOME" and not os.path.isabs(value) else value
    return env


def execute(argv: list[str], timeout: float, limits: dict[int, int] | None = None,
            interrupt: tuple[int, float] | None = None, cwd: Path | None = None,
            env: dict[str, str] | None = None) -> Outcome:
    def preexec() -> None:
        for which, value in (limits or {}).items():
            resource.setrlimit(which, (value, value))

    proc = subprocess.Popen(argv, cwd=cwd or W, env=child_env(env), stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, errors="replace", preexec_fn=preexec,  # noqa: PLW1509
                            start_new_session=True)
    try:
        if interrupt:
            try:
                out, _ = proc.communicate(timeout=interrupt[1])
                return Outcome(proc.returncode, out)
            except subprocess.TimeoutExpired:
                proc.send_signal(interrupt[0])
        out, _ = proc.communicate(timeout=timeout)
        return Outcome(proc.returncode, out)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, _ = proc.communicate()
        return Outcome(None, out, timed_out=True)


def digest(path: Path) -> str:
    if path.is_symlink():
        return "link:" + os.readlink(path)
    if path.is_dir():
        return hashlib.sha256("".join(f"{p.relative_to(path)}:{digest(p)}" for p in sorted(path.rglob("*"))
                                      if p.is_file()).encode()).hexdigest()
    return hashlib.sha256(path.read_bytes()).hexdigest() if path.exists() else "absent"


def markers() -> set[str]:
    return {p.name for p in W.glob("PWNED*")}


def judge(case: Case, outcome: Outcome, before: dict[str, str], seen_markers: set[str]) -> tuple[str, str]:
    text = outcome.out + outcome.extra
    if outcome.timed_out:
        return "hang", f"no end within {case.timeout:.0f} s"
    new = markers() - seen_markers
    if new:
        return "code run", f"marker {min(new)} written"
    if SECRET in text or PASSWD_MARK in text:
        return "read outside", "a file outside the folder reached the output"
    for victim, value in before.items():
        if digest(W / victim) != value:
            return "data lost", f"{victim} changed"
    if "Traceback (most recent call last)" in text:
        last = [ln for ln in outcome.out.splitlines() if ln.strip()][-1:] or [""]
        return "traceback", last[0][:160]
    if case.expect == "error" and outcome.rc == 0:
        return "wrong exit", "exit 0 for a refused input"
    if case.expect == "ok" and outcome.rc != 0:
        return "wrong exit", f"exit {outcome.rc}: {first_error(outcome.out)}"
    if case.expect == "error" and outcome.rc not in (130, 143) and not first_error(outcome.out):
        return "unclear", "no 'error:' line"
    if case.check:
        found = case.check(outcome)
        if found:
            return found
    return "", ""


def first_error(text: str) -> str:
    """The command's one line of refusal (`data check` reports each problem of a tree as `problem:`)."""
    for line in text.splitlines():
        if line.startswith(("error:", "problem:")):
            return line[:200]
    return ""


def run_case(case: Case) -> Result:
    if case.needs:
        why = case.needs()
        if why:
            return Result(case.id, case.rows, "not run", detail=why)
    if case.setup:
        case.setup()
    before = {v: digest(W / v) for v in case.victims}
    seen = markers()
    if callable(case.argv):
        outcome = case.argv()
    else:
        outcome = execute(case.argv, case.timeout, case.limits, case.interrupt, W / case.cwd if case.cwd else None,
                          case.env)
    severity, why = judge(case, outcome, before, seen)
    if severity:
        return Result(case.id, case.rows, "failed", severity, why)
    shown = first_error(outcome.out) or (outcome.out.strip().splitlines() or [""])[-1]
    return Result(case.id, case.rows, "held", detail=f"exit {outcome.rc}: {shown[:150]}")


# ---- shared fixtures ---------------------------------------------------------------------------------

def build_fixtures() -> None:
    shutil.copytree(ROOT / "sample_images", W / "si")
    (W / "outside").mkdir()
    (W / "outside" / "secret.txt").write_text(SECRET + "\n")
    steps = [tokenscope("run", "si/street_5000001.png", "si/street_5000002.png", "--labels", "si/labels",
                        "--size", "256", "--out", "base"),
             tokenscope("compare", "si/street_5000001.png", "--methods", "step,tome", "--size", "128",
                        "--repeats", "1", "--warmup", "0", "--out", "cmpbase"),
             tokenscope("sweep", "--merge-thresholds", "0.5", "--exit-thresholds", "0.95", "--seeds",
                        "100000:100003", "--scene-size", "128", "--out", "swc")]
    for argv in steps:
        outcome = execute(argv, 600)
        if outcome.rc != 0:
            sys.exit(f"fixture failed: {' '.join(argv[3:])}\n{outcome.out[-2000:]}")


def only_child(folder: str) -> Path:
    found = [p for p in (W / folder).iterdir() if p.is_dir() and not p.name.startswith(".")]
    assert len(found) == 1, found
    return found[0]


def copy_run(dest: str, status: str | None = "running", source: str = "base") -> Path:
    target = W / dest
    if target.exists():
        return target
    shutil.copytree(only_child(source), target, symlinks=True)
    if status:
        edit_json(target / "run.json", lambda d: d.__setitem__("status", status))
    return target


def edit_json(path: Path, change: Callable[[dict], object]) -> None:
    doc = json.loads(path.read_text())
    change(doc)
    path.write_text(json.dumps(doc))


def evil(marker: str) -> str:
    return f"from pathlib import Path\nPath({str(W / marker)!r}).write_text('code from a data file ran')\n"


def image_folder(run: Path) -> Path:
    return next(p for p in sorted(run.iterdir()) if (p / "trace.json").is_file())


def has(*needles: str) -> Callable[[Outcome], tuple[str, str] | None]:
    """A check that the output says something specific (the probe's 'unclear' rows)."""

    def check(outcome: Outcome) -> tuple[str, str] | None:
        text = outcome.out + outcome.extra
        missing = [n for n in needles if n not in text]
        return ("unclear", f"the output does not say {missing[0]!r}") if missing else None
    return check


def all_of(*checks: Callable[[Outcome], tuple[str, str] | None]) -> Callable[[Outcome], tuple[str, str] | None]:
    def check(outcome: Outcome) -> tuple[str, str] | None:
        for one in checks:
            found = one(outcome)
            if found:
                return found
        return None
    return check


def lacks(*needles: str, severity: str = "unclear") -> Callable[[Outcome], tuple[str, str] | None]:
    def check(outcome: Outcome) -> tuple[str, str] | None:
        text = outcome.out + outcome.extra
        found = [n for n in needles if n in text]
        return (severity, f"the output holds {found[0]!r}") if found else None
    return check


def is_root() -> str:
    return "" if os.geteuid() == 0 else "needs root (a tmpfs mount)"


def have_browser() -> str:
    try:
        import playwright.sync_api  # noqa: F401
    except ImportError:
        return "needs playwright"
    return "" if shutil.which("chromium") or shutil.which("chromium-browser") else "needs Chromium"


# ---- 1 view --serve ------------------------------------------------------------------------------------

class Server:
    """One `view --serve` of a run folder holding links out of it, shared by the server's rows."""

    proc: subprocess.Popen | None = None
    port = 0
    url = ""

    @classmethod
    def start(cls) -> None:
        if cls.proc:
            return
        srv = copy_run("sec/srv", status=None)
        os.symlink("/etc", srv / "etc_link")
        os.symlink(W / "outside" / "secret.txt", image_folder(srv) / "notes.txt")
        os.symlink("../..", srv / "up")
        cls.proc = subprocess.Popen(tokenscope("view", "sec/srv", "--serve"), cwd=W, env=child_env(),
                                    stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        deadline = time.time() + 120
        while time.time() < deadline:
            line = cls.proc.stdout.readline()
            found = re.search(r"http://([0-9.]+):(\d+)/", line)
            if found:
                cls.url, cls.port = line, int(found.group(2))
                return
            if not line and cls.proc.poll() is not None:
                break
        raise RuntimeError("view --serve printed no address")

    @classmethod
    def get(cls, path: str, host: str | None = None) -> Outcome:
        cls.start()
        conn = http.client.HTTPConnection("127.0.0.1", cls.port, timeout=10)
        try:
            conn.putrequest("GET", path, skip_host=host is not None)
            if host is not None:
                conn.putheader("Host", host)
            conn.endheaders()
            response = conn.getresponse()
            body = response.read().decode("latin-1")
            return Outcome(0 if response.status < 400 else 1, f"HTTP {response.status}", extra=body)
        except (OSError, http.client.HTTPException) as exc:
            return Outcome(1, f"connection: {exc}")
        finally:
            conn.close()

    @classmethod
    def raw(cls, data: bytes, idle: int = 0) -> Outcome:
        cls.start()
        idle_socks = [socket.create_connection(("127.0.0.1", cls.port)) for _ in range(idle)]
        try:
            began = time.time()
            with socket.create_connection(("127.0.0.1", cls.port), timeout=10) as s:
                s.sendall(data)
                reply = b""
                while chunk := s.recv(65536):
                    reply += chunk
            return Outcome(0, reply[:200].decode("latin-1"), extra=f"{time.time() - began:.1f}s")
        except OSError as exc:
            return Outcome(1, f"connection: {exc}")
        finally:
            for s in idle_socks:
                s.close()

    @classmethod
    def stop(cls) -> Outcome:
        cls.start()
        cls.proc.send_signal(signal.SIGINT)
        try:
            out, _ = cls.proc.communicate(timeout=20)
            return Outcome(cls.proc.returncode, out)
        except subprocess.TimeoutExpired:
            cls.proc.kill()
            return Outcome(None, "", timed_out=True)


def refused(outcome: Outcome) -> tuple[str, str] | None:
    return None if outcome.out.startswith("HTTP 4") or outcome.out.startswith("connection") else \
        ("read outside", f"served: {outcome.out}")


def served_fast(outcome: Outcome) -> tuple[str, str] | None:
    ok = outcome.out.startswith("HTTP/1.0 200") or outcome.out.startswith("HTTP/1.1 200")
    return None if ok and float(outcome.extra.rstrip("s")) < 5 else ("hang", f"{outcome.out[:40]} {outcome.extra}")


def bind_is_loopback() -> Outcome:
    Server.start()
    host = re.search(r"http://([0-9.]+):", Server.url).group(1)
    return Outcome(0 if host == "127.0.0.1" else 1, f"bound to {host}")


def victim_folder(name: str) -> Callable[[], None]:
    def setup() -> None:
        victim = W / "sec" / name
        victim.mkdir(parents=True, exist_ok=True)
        (victim / "keep.txt").write_text("precious user data")
    return setup


def symlinked_export() -> Outcome:
    run = copy_run("sec/symed", status=None)
    victim = W / "sec" / "victim2"
    for name in ("explorer_data", "explorer-served.html"):
        os.symlink(victim, run / name)
    outcome = execute(tokenscope("view", "sec/symed", "--serve"), 60, interrupt=(signal.SIGINT, 12))
    litter = [p.name for p in run.iterdir() if p.name.startswith(".explorer_data")]
    return Outcome(outcome.rc, outcome.out + (f"\nleft behind: {litter}" if litter else ""))


def two_exports() -> Outcome:
    run = copy_run("sec/twice", status=None)
    texts = []
    for _ in range(3):
        procs = [subprocess.Popen(tokenscope("view", str(run), "--serve"), cwd=W, env=child_env(),
                                  stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for _ in range(2)]
        time.sleep(10)
        for p in procs:
            p.send_signal(signal.SIGINT)
        texts += [p.communicate(timeout=30)[0] for p in procs]
    index = run / "explorer_data" / "index.json"
    litter = [p.name for p in run.iterdir() if p.name.startswith(".explorer_data")]
    complete = index.is_file() and len(list((run / "explorer_data" / "images").glob("*.json"))) >= 2
    return Outcome(0 if complete and not litter and all("serving" in t for t in texts) else 1,
                   "\n".join(texts) + f"\nexport complete: {complete}; litter: {litter}")


def nul_then_log() -> Outcome:
    first = Server.get("/explorer-served.html%00.json")
    return Outcome(0 if first.out.startswith("HTTP 4") else 1, first.out)


SERVER = [
    Case("1.1", "default bind", bind_is_loopback, expect="ok"),
    Case("1.2", "../ traversal", lambda: Server.get("/../../../etc/passwd"), expect="any", check=refused),
    Case("1.3", "%2e%2e", lambda: Server.get("/%2e%2e/%2e%2e/%2e%2e/etc/passwd"), expect="any", check=refused),
    Case("1.4", "absolute", lambda: Server.get("//etc/passwd"), expect="any", check=refused),
    Case("1.5", "%2f", lambda: Server.get("/%2fetc%2fpasswd"), expect="any", check=refused),
    Case("1.6", "..%2f", lambda: Server.get("/..%2f..%2f..%2fetc%2fpasswd"), expect="any", check=refused),
    Case("1.7", "backslash", lambda: Server.get("/..%5c..%5cetc%5cpasswd"), expect="any", check=refused),
    Case("1.8", "symlinked folder in the run", lambda: Server.get("/etc_link/passwd"), expect="any", check=refused),
    Case("1.9", "symlinked file in an image folder", lambda: Server.get("/street_5000001/notes.txt"), expect="any",
         check=refused),
    Case("1.10", "up -> ../.. (listing, then a file)",
         lambda: Outcome(1, (a := Server.get("/up/")).out + " " + (b := Server.get("/up/outside/secret.txt")).out,
                         extra=a.extra + b.extra), expect="any",
         check=lambda o: None if o.out.count("HTTP 4") == 2 else ("read outside", o.out)),
    Case("1.11", "NUL byte in the URL", nul_then_log, expect="ok"),
    Case("1.12", "200 KB header", lambda: Server.raw(b"GET / HTTP/1.0\r\nX: " + b"a" * 200_000 + b"\r\n\r\n"),
         expect="any", check=lambda o: None if re.match(r"HTTP/1\.[01] 4\d\d", o.out) or "connection" in o.out
         else ("unclear", o.out[:40])),
    Case("1.13", "100 KB request line", lambda: Server.raw(b"GET /" + b"a" * 100_000 + b" HTTP/1.0\r\n\r\n"),
         expect="any", check=lambda o: None if re.match(r"HTTP/1\.[01] 4\d\d", o.out) or "connection" in o.out
         else ("unclear", o.out[:40])),
    Case("1.14", "400 idle connections, then a request",
         lambda: Server.raw(b"GET /explorer-served.html HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n", idle=400),
         expect="any", check=served_fast),
    Case("1.15", "foreign Host header", lambda: Server.get("/explorer-served.html", host="attacker.example"),
         expect="any", check=lambda o: None if o.out.startswith("HTTP 4") else ("unclear", "a foreign Host is served")),
    Case("1.16", "Ctrl-C while serving", lambda: Server.stop(), expect="any"),
    Case("1.17", "explorer_data and the page symlinked to a victim folder", symlinked_export, expect="any",
         setup=victim_folder("victim2"), victims=("sec/victim2",), check=lacks("left behind")),
    Case("1.18", "3 rounds of 2 concurrent exports of one run", two_exports, expect="ok"),
]


# ---- 2 code from run folders, operating points, traces -------------------------------------------------

def rf_evil(name: str, marker: str) -> Callable[[], None]:
    def setup() -> None:
        run = copy_run(name)
        (run / "evil.py").write_text(evil(marker))
        edit_json(run / "run.json", lambda d: d["request"]["model"].__setitem__("method", str(run / "evil.py")))
    return setup


def op_file(method: str, marker: str) -> Callable[[], None]:
    def setup() -> None:
        folder = W / "sec" / "op"
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "evil.py").write_text(evil(marker))
        (folder / f"op_{marker}.json").write_text(json.dumps(
            {"format": "tokenscope-operating-point", "version": 1, "method": method}))
    return setup


def pickled_trace(name: str) -> Callable[[], None]:
    def setup() -> None:
        import numpy as np

        if (W / name).exists():
            return
        run = copy_run(name, status="complete")
        with zipfile.ZipFile(image_folder(run) / "trace.npz", "a") as zf, zf.open("evil.npy", "w") as out:
            np.lib.format.write_array(out, np.array([PickleBomb()], dtype=object), allow_pickle=True)
    return setup


class PickleBomb:
    def __reduce__(self) -> tuple:
        return (os.system, (f"touch {W / 'PWNED_pickle'}",))


CODE = [
    Case("2.1", "run.json names a method file; run --resume", tokenscope("run", "--resume", "sec/rf_evil"),
         setup=rf_evil("sec/rf_evil", "PWNED_resume")),
    Case("2.2", "op file names a method file", tokenscope(
        "run", "si/street_5000001.png", "--size", "128", "--operating-point", "sec/op/op_PWNED_op.json",
        "--out", "sec/op/out"), setup=op_file(str(Path("sec/op/evil.py")), "PWNED_op")),
    Case("2.3", "op file names a module", tokenscope(
        "run", "si/street_5000001.png", "--size", "128", "--operating-point", "sec/op/op_this.json",
        "--out", "sec/op/out2"), setup=op_file("this.x", "this"),
         check=lacks("The Zen of Python", severity="code run")),
    *[Case(f"2.{4 + i}", f"run.json naming a method file: {cmd}", tokenscope(cmd, "sec/rf_evil2"),
           setup=rf_evil("sec/rf_evil2", "PWNED_render"), expect="any")
      for i, cmd in enumerate(("heatmap", "report", "view", "table"))],
    Case("2.8", "trace.npz member = pickled object array: view", tokenscope("view", "sec/npz_pickle"),
         setup=pickled_trace("sec/npz_pickle")),
    Case("2.9", "same: heatmap", tokenscope("heatmap", "sec/npz_pickle"), setup=pickled_trace("sec/npz_pickle")),
    Case("2.10", "same: report names it damaged", tokenscope("report", "sec/npz_pickle"),
         setup=pickled_trace("sec/npz_pickle"), check=has("damaged")),
]


# ---- 3 crafted checkpoints and safetensors headers -----------------------------------------------------

def crafted_checkpoint(name: str, change: Callable[[dict], object] | None = None,
                       weights: Callable[[bytes], bytes] | None = None) -> Callable[[], None]:
    """ck/NAME.json = the demo checkpoint's description with one field changed, beside its weights
    (ck/NAME.safetensors: a copy, or a crafted one)."""

    def setup() -> None:
        folder = W / "ck"
        folder.mkdir(exist_ok=True)
        doc = json.loads((ROOT / "tokenscope" / "weights" / "demo.json").read_text())
        data = (ROOT / "tokenscope" / "weights" / "demo.safetensors").read_bytes()
        if change:
            change(doc)
        (folder / f"{name}.safetensors").write_bytes(weights(data) if weights else data)
        (folder / f"{name}.json").write_text(json.dumps(doc))
    return setup


def st_header(data: bytes) -> tuple[dict, bytes]:
    n = struct.unpack("<Q", data[:8])[0]
    return json.loads(data[8:8 + n]), data[8 + n:]


def st_with(header: dict | list | str, body: bytes, pad: int = 0) -> bytes:
    text = (header if isinstance(header, str) else json.dumps(header)).encode() + b" " * pad
    return struct.pack("<Q", len(text)) + text + body


def st_change(edit: Callable[[dict], object]) -> Callable[[bytes], bytes]:
    def crafted(data: bytes) -> bytes:
        header, body = st_header(data)
        edit(header)
        return st_with(header, body)
    return crafted


def first_tensor(header: dict) -> dict:
    return header[next(k for k in header if k != "__metadata__")]


def same_bytes(header: dict) -> None:
    keys = [k for k in header if k != "__metadata__"]
    header[keys[1]]["data_offsets"] = header[keys[0]]["data_offsets"]


def set_config(key: str, value: object) -> Callable[[dict], object]:
    return lambda doc: doc["config"].__setitem__(key, value)


SAFETENSORS = [
    ("header length 2^63-1", lambda d: struct.pack("<Q", 2**63 - 1) + d[8:]),
    ("length past EOF", lambda d: struct.pack("<Q", len(d) + 10) + d[8:]),
    ("offsets +1e12", st_change(lambda h: first_tensor(h).__setitem__("data_offsets", [10**12, 10**12 + 4]))),
    ("two tensors on the same bytes", st_change(same_bytes)),
    ("shape [2^31, 2^31]", st_change(lambda h: first_tensor(h).__setitem__("shape", [2**31, 2**31]))),
    ("header a JSON list", lambda d: st_with([1, 2], st_header(d)[1])),
    ("dtype X99", st_change(lambda h: first_tensor(h).__setitem__("dtype", "X99"))),
    ("90 MB padded header (valid)", lambda d: st_with(st_header(d)[0], st_header(d)[1], pad=90_000_000)),
    ("nested __metadata__", st_change(lambda h: h.__setitem__("__metadata__", {"a": {"b": "c"}}))),
]


def checkpoint_case(cid: str, name: str, what: str, expect: str = "error", **craft: object) -> Case:
    return Case(cid, what, tokenscope("run", "si/street_5000001.png", "--size", "128", "--no-animation",
                                      "--weights", f"ck/{name}.json", "--out", "ck/out"),
                setup=crafted_checkpoint(name, **craft), expect=expect, timeout=180)


CHECKPOINTS = [
    *[checkpoint_case(f"3.{i + 1}", f"st{i + 1}", what, weights=fn, expect="ok" if "valid" in what else "error")
      for i, (what, fn) in enumerate(SAFETENSORS)],
    checkpoint_case("3.10", "ver_str", '"version": "abc"', change=lambda d: d.__setitem__("version", "abc")),
    checkpoint_case("3.11", "ver_list", '"version": [1]', change=lambda d: d.__setitem__("version", [1])),
    checkpoint_case("3.12", "trained_list", '"trained": [1]', change=lambda d: d.__setitem__("trained", [1])),
    checkpoint_case("3.13", "meta_list", '"metadata": [1]', change=lambda d: d.__setitem__("metadata", [1])),
    checkpoint_case("3.14", "colour_bad", "class_colours 1e400",
                    change=set_config("class_colours", [[float("inf"), 0, 0]] * 8)),
    checkpoint_case("3.15", "mt_str", 'merge_thresholds: "abcd"',
                    change=set_config("merge_thresholds", "abcd")),
    checkpoint_case("3.16", "colour_red", 'class_colours "red"', change=set_config("class_colours", "red")),
    checkpoint_case("3.17", "exit_99", "exit_after [4, 99]", change=set_config("exit_after", [4, 99])),
    checkpoint_case("3.18", "config_list", "config a list", change=lambda d: d.__setitem__("config", [1])),
    checkpoint_case("3.19", "names_5", "class_names: 5", change=set_config("class_names", 5)),
    checkpoint_case("3.20", "exit_nan", "exit_threshold: NaN",
                    change=set_config("exit_threshold", float("nan"))),
    Case("3.21", "embed_dim 16384, depth 512 under a memory limit", tokenscope(
        "run", "si/street_5000001.png", "--size", "128", "--no-animation", "--weights", "ck/huge.json", "--out",
        "ck/out"), setup=crafted_checkpoint("huge", change=set_config("timm_kwargs", {"embed_dim": 16384, "depth": 512})),
         limits={resource.RLIMIT_AS: 6_000_000_000}, timeout=180),
    checkpoint_case("3.22", "ckpath", "timm_kwargs checkpoint_path=/etc/passwd",
                    change=set_config("timm_kwargs", {"checkpoint_path": "/etc/passwd"})),
]


# ---- 4 foreign checkpoints' side files -----------------------------------------------------------------

def foreign(name: str, kind: str, side: str) -> Callable[[], None]:
    """imp/NAME: a tiny mmseg or Segmenter release (written as the releases are) with its side file replaced."""

    def setup() -> None:
        sys.path.insert(0, str(ROOT / "tests"))
        from segmenter_reference import (
            segmenter_state,
            write_mmseg_release,
            write_segmenter_release,
        )

        folder = W / "imp" / name
        if kind == "mmseg":
            ckpt = write_mmseg_release(folder, segmenter_state("mask"))
            next(folder.glob("*.py")).write_text(side)
        else:
            ckpt = write_segmenter_release(folder, segmenter_state("mask"), "mask_transformer")
            (folder / "variant.yml").write_text(side)
        (folder / "which").write_text(ckpt.name)
    return setup


def import_case(cid: str, name: str, kind: str, side: str, what: str, expect: str = "error") -> Case:
    def command() -> Outcome:
        foreign(name, kind, side)()
        ckpt = W / "imp" / name / (W / "imp" / name / "which").read_text()
        return execute(tokenscope("import", "segmenter", str(ckpt), "--out", f"imp/out_{name}"), 60)
    return Case(cid, what, command, timeout=60, expect=expect)


LAUGHS = "a0 = dict(x=1, y=2)\n" + "".join(f"a{i} = dict(p=a{i - 1}, q=a{i - 1})\n" for i in range(1, 60)) + \
    "model = dict(backbone=dict(num_heads=2), decode_head=a59)\n"
YAML_LAUGHS = "a: &a [x, x, x, x, x, x, x, x, x]\n" + "".join(
    f"{c}: &{c} [*{p}, *{p}, *{p}, *{p}, *{p}, *{p}, *{p}, *{p}, *{p}]\n" for p, c in zip("abcdefgh", "bcdefghi")) + \
    "net_kwargs: *i\n"
FOREIGN = [
    import_case("4.1", "laughs", "mmseg", LAUGHS, "mmseg config built from names (2^60 walk)", expect="any"),
    import_case("4.2", "bb_list", "mmseg", "model = dict(backbone=[1, 2])\n", "backbone a list"),
    import_case("4.3", "norm_str", "mmseg", "img_norm_cfg = dict(mean=[1, 2, 'x'], std=[1, 2, 3])\n", "mean holds a str"),
    import_case("4.4", "crop_str", "mmseg", "model = dict(test_cfg=dict(mode='slide', crop_size=['a'], stride=[1]))\n",
                "crop_size ['a']"),
    import_case("4.5", "deep_minus", "mmseg", "x = " + "-" * 50_000 + "1\n", "50,000 unary minus", expect="any"),
    import_case("4.6", "heads_str", "mmseg", "model = dict(backbone=dict(num_heads='abc'))\n", "num_heads 'abc'"),
    import_case("4.7", "nk_list", "segmenter", "net_kwargs: [1, 2]\n", "variant.yml net_kwargs a list"),
    import_case("4.8", "heads_abc", "segmenter", "net_kwargs:\n  n_heads: abc\n", "n_heads: abc"),
    import_case("4.9", "heads_inf", "segmenter", "net_kwargs:\n  n_heads: .inf\n", "n_heads: .inf"),
    import_case("4.10", "window_abc", "segmenter", "inference_kwargs:\n  window_size: [abc]\n", "window_size [abc]"),
    import_case("4.11", "yaml_laughs", "segmenter", YAML_LAUGHS, "YAML billion laughs"),
]


# ---- 5 archives, downloads, bombs ----------------------------------------------------------------------

class Downloads:
    """A local server on 127.0.0.1 serving the crafted downloads (stopped at the end of the section)."""

    server = None
    port = 0

    @classmethod
    def start(cls) -> None:
        if cls.server:
            return
        import http.server
        import threading

        folder = W / "srv"
        folder.mkdir(exist_ok=True)
        with zipfile.ZipFile(folder / "evil.zip", "w") as zf:
            zf.writestr("../../../../ZIPSLIP.txt", "escaped")
        with zipfile.ZipFile(folder / "bomb.zip", "w", zipfile.ZIP_DEFLATED) as zf:
            zf.writestr("zeros.bin", b"\0" * 200_000_000)

        class Handler(http.server.BaseHTTPRequestHandler):
            def log_message(self, *args: object) -> None:
                pass

            def do_GET(self) -> None:
                if self.path == "/redirect":
                    self.send_response(302)
                    self.send_header("Location", "file:///etc/passwd")
                    self.end_headers()
                elif self.path == "/endless":
                    self.send_response(200)
                    self.end_headers()
                    try:
                        while True:
                            self.wfile.write(b"\0" * 65536)
                    except OSError:
                        return
                else:
                    body = (folder / self.path.lstrip("/")).read_bytes()
                    self.send_response(200)
                    self.send_header("Content-Length", str(len(body)))
                    self.end_headers()
                    self.wfile.write(body)

        cls.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        cls.port = cls.server.server_address[1]
        threading.Thread(target=cls.server.serve_forever, daemon=True).start()

    @classmethod
    def fetch(cls, path: str, home: str = "tsh_fetch", url: str | None = None) -> Outcome:
        cls.start()
        return execute(tokenscope("data", "fetch", "ade20k", "--url", url or f"http://127.0.0.1:{cls.port}{path}"),
                       120, env={"TOKENSCOPE_OFFLINE": "0", "TOKENSCOPE_HOME": str(W / home)})


def small_disk(name: str) -> Path:
    folder = W / name
    folder.mkdir(exist_ok=True)
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=3m", "tmpfs", str(folder)], check=True)
    MOUNTS.append(folder)
    return folder


MOUNTS: list[Path] = []


def endless_into_small_disk() -> Outcome:
    home = small_disk("full2")
    outcome = Downloads.fetch("/endless", home=str(home.relative_to(W)))
    left = sum(p.stat().st_size for p in home.rglob("*") if p.is_file())
    return Outcome(outcome.rc, outcome.out + f"\nleft on the disk: {left} bytes")


def npz_bomb(name: str) -> Callable[[], None]:
    def setup() -> None:
        if (W / name).exists():
            return
        run = copy_run(name, status="complete")
        path = image_folder(run) / "trace.npz"
        with zipfile.ZipFile(path, "a", zipfile.ZIP_DEFLATED) as zf, zf.open("bomb.npy", "w", force_zip64=True) as out:
            header = {"descr": "|u1", "fortran_order": False, "shape": (6_000_000_000,)}
            import numpy as np

            np.lib.format.write_array_header_1_0(out, header)
            chunk = b"\0" * 64_000_000
            for _ in range(6_000_000_000 // len(chunk)):
                out.write(chunk)
    return setup


def png_header_only(path: Path, width: int, height: int) -> None:
    """A valid PNG of width x height grey pixels, all zero, compressed to almost nothing."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    row = b"\0" * (width + 1)
    comp = zlib.compressobj(9)
    data = b"".join(comp.compress(row) for _ in range(height)) + comp.flush()
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0))
                     + chunk(b"IDAT", data) + chunk(b"IEND", b""))


def bomb_png() -> None:
    (W / "odd").mkdir(exist_ok=True)
    if not (W / "odd" / "bomb30k_gray.png").exists():
        png_header_only(W / "odd" / "bomb30k_gray.png", 30000, 30000)


def bomb_dataset() -> None:
    bomb_png()
    for sub in ("images", "masks"):
        (W / "dcb" / sub).mkdir(parents=True, exist_ok=True)
        shutil.copy(W / "odd" / "bomb30k_gray.png", W / "dcb" / sub / "a.png")


ARCHIVES = [
    Case("5.1", "zip with a ../ member", lambda: Downloads.fetch("/evil.zip"),
         check=lambda o: ("data lost", "ZIPSLIP written") if list(W.parent.rglob("ZIPSLIP.txt")) else None),
    Case("5.2", "200 MB zip bomb", lambda: Downloads.fetch("/bomb.zip")),
    Case("5.3", "302 to file:///etc/passwd", lambda: Downloads.fetch("/redirect")),
    Case("5.4", "file:// archive", lambda: Downloads.fetch("", url=f"file://{W}/srv/evil.zip")),
    Case("5.5", "endless response into a 3 MB TOKENSCOPE_HOME", endless_into_small_disk, needs=is_root,
         check=all_of(lacks("run again to resume"), lambda o: None if re.search(r"left on the disk: (\d+)", o.out)
                      and int(re.search(r"left on the disk: (\d+)", o.out).group(1)) < 1_000_000
                      else ("unclear", "the disk is left full"))),
    Case("5.6", "trace.npz with a 6 GB zero member: view", tokenscope("view", "sec/npz_bomb"),
         setup=npz_bomb("sec/npz_bomb"), limits={resource.RLIMIT_AS: 5_000_000_000}, timeout=300),
    Case("5.7", "same: heatmap", tokenscope("heatmap", "sec/npz_bomb"), limits={resource.RLIMIT_AS: 5_000_000_000},
         setup=npz_bomb("sec/npz_bomb"), timeout=300),
    Case("5.8", "same: report", tokenscope("report", "sec/npz_bomb"), setup=npz_bomb("sec/npz_bomb"), expect="any",
         timeout=300),
    Case("5.9", "PNG 30000x30000", tokenscope("run", "odd/bomb30k_gray.png", "--size", "128", "--no-animation",
                                              "--out", "odd/out"), setup=bomb_png,
         limits={resource.RLIMIT_AS: 8_000_000_000}),
    Case("5.10", "same PNG as image and mask of a folder data set", tokenscope("data", "check", "folder", "--root",
                                                                               "dcb"),
         setup=bomb_dataset, limits={resource.RLIMIT_AS: 8_000_000_000}),
]


# ---- 6 HTML / LaTeX injection, exfiltration ------------------------------------------------------------

XSS = '<img src=x onerror="document.documentElement.dataset.pwned=1">'


def browse(page: Path) -> Outcome:
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=shutil.which("chromium") or shutil.which("chromium-browser"))
        tab = browser.new_page()
        dialogs: list[str] = []
        tab.on("dialog", lambda d: (dialogs.append(d.message), d.dismiss()))
        tab.goto(page.as_uri())
        tab.wait_for_timeout(1500)
        for selector in ("tr", "canvas"):
            for element in tab.query_selector_all(selector)[:6]:
                try:
                    element.click(timeout=500)
                    element.hover(timeout=500)
                except Exception:  # noqa: BLE001, S110 - elements may be hidden; the point is the script, not the click
                    pass
        tab.wait_for_timeout(500)
        pwned = tab.evaluate("document.documentElement.dataset.pwned || ''")
        browser.close()
    return Outcome(1 if pwned or dialogs else 0, f"pwned={pwned!r} dialogs={dialogs}")


def xss_run() -> Path:
    folder = W / "xss" / "img"
    if not folder.exists():
        folder.mkdir(parents=True)
        shutil.copy(W / "si" / "street_5000001.png", folder / f"{XSS}.png")
        crafted_checkpoint("html_classes", change=set_config(
            "class_names", [XSS, "</script><script>document.documentElement.dataset.pwned=2</script>", "[/]",
                            "\\input{/etc/passwd}", "#$%&~^{}", "c5", "c6", "c7"]))()
        for out, extra in (("xss/o1", []), ("xss/o2", ["--weights", "ck/html_classes.json"])):
            execute(tokenscope("run", str(folder), "--size", "128", "--no-animation", *extra, "--out", out), 120)
    return W / "xss"


def xss_page(out: str, command: str) -> Callable[[], Outcome]:
    def go() -> Outcome:
        run = only_child(str(xss_run().relative_to(W) / out.split("/")[-1]))
        made = execute(tokenscope(command, str(run)), 120)
        page = run / ("explorer.html" if command == "view" else "report.html")
        return made if made.rc != 0 else browse(page)
    return go


def latex_of(out: str) -> Callable[[], Outcome]:
    def go() -> Outcome:
        run = only_child(str(xss_run().relative_to(W) / out.split("/")[-1]))
        return execute(tokenscope("table", str(run), "--kind", "classes", "--format", "latex"), 60)
    return go


def report_links() -> Outcome:
    run = copy_run("sec/repsym", status=None)
    (run / "figures" / "tokens_per_block.png").unlink(missing_ok=True)
    os.symlink("/etc/passwd", run / "figures" / "tokens_per_block.png")
    gif = image_folder(run) / "tokens.gif"
    gif.unlink(missing_ok=True)
    os.symlink(W / "outside" / "secret.txt", gif)
    made = execute(tokenscope("report", "sec/repsym"), 120)
    import base64

    html = (run / "report.html").read_text() if (run / "report.html").exists() else ""
    decoded = " ".join(base64.b64decode(b, validate=False).decode("latin-1")
                       for b in re.findall(r"base64,([A-Za-z0-9+/=]+)", html))
    return Outcome(made.rc, made.out, extra=decoded)


INJECTION = [
    Case("6.1", "image file named <img onerror>: explorer", xss_page("xss/o1", "view"), expect="ok",
         needs=have_browser, timeout=300),
    Case("6.2", "same: report", xss_page("xss/o1", "report"), expect="ok", needs=have_browser, timeout=300),
    Case("6.3", "class names with markup: explorer", xss_page("xss/o2", "view"), expect="ok", needs=have_browser,
         timeout=300),
    Case("6.4", "same: report", xss_page("xss/o2", "report"), expect="ok", needs=have_browser, timeout=300),
    Case("6.5", "class name \\input{/etc/passwd} in table --format latex", latex_of("xss/o2"), expect="ok",
         check=lacks("\\input{", severity="read outside")),
    Case("6.6", "#$%&~^{} in table --format latex", latex_of("xss/o2"), expect="ok", check=lacks(" #$%&~^{} ")),
    Case("6.7", "report embeds symlinked files", report_links, expect="any"),
]


# ---- 7 symlinked and odd output paths ------------------------------------------------------------------

def linked_tables() -> None:
    run = copy_run("sec/symtab")
    victim = W / "sec" / "victim"
    victim.mkdir(parents=True, exist_ok=True)
    (victim / "images.csv").write_text("precious user data\n")
    if (run / "tables").is_symlink():
        return
    shutil.rmtree(run / "tables")
    os.symlink(victim, run / "tables")


def odd_links() -> None:
    folder = W / "symo"
    if not folder.exists():
        folder.mkdir()
        os.symlink(folder / "nowhere", folder / "dangling")
        os.symlink("loop", folder / "loop")


def markup_run(name: str) -> Callable[[], None]:
    def setup() -> None:
        if not (W / name).exists():
            execute(tokenscope("run", "si/street_5000001.png", "--size", "128", "--no-animation", "--out", name), 120)
    return setup


def unreadable_in(folder: str) -> Callable[[], None]:
    def setup() -> None:
        (W / folder).mkdir(parents=True, exist_ok=True)
        (W / folder / "broken.png").write_bytes(b"not a png at all")
    return setup


def empty_mask_dataset() -> None:
    import cv2
    import numpy as np

    for sub in ("images", "masks"):
        (W / "dc[/x]" / sub).mkdir(parents=True, exist_ok=True)
    shutil.copy(W / "si" / "street_5000001.png", W / "dc[/x]" / "images" / "a.png")
    (W / "dc[/x]" / "masks" / "a.png").write_bytes(b"")
    cv2.imwrite(str(W / "dc[/x]" / "images" / "b.png"), np.zeros((64, 64, 3), np.uint8))


def class_map_file() -> None:
    (W / "cm" / "ok[").mkdir(parents=True, exist_ok=True)
    (W / "cm" / "ok[/].json").write_text(json.dumps({str(i): i for i in range(8)}))


def read_only_cwd() -> Path:
    folder = W / "rotmp"
    if not MOUNTS or folder not in MOUNTS:
        folder.mkdir(exist_ok=True)
        subprocess.run(["mount", "-t", "tmpfs", "-o", "size=20m", "tmpfs", str(folder)], check=True)
        MOUNTS.append(folder)
        (folder / "sub").mkdir()
        shutil.copy(W / "si" / "street_5000001.png", folder / "sub")
        shutil.copytree(only_child("base"), folder / "sub" / "r")
        subprocess.run(["mount", "-o", "remount,ro", str(folder)], check=True)
    return folder / "sub"


def in_read_only(*args: str) -> Callable[[], Outcome]:
    def go() -> Outcome:
        return execute(tokenscope(*args), 180, cwd=read_only_cwd())
    return go


def sized(*args: str) -> list[str]:
    return [*args, "--size", "128", "--no-animation"]


PATHS = [
    Case("7.1", "tables/ a symlink to another folder; run --resume", tokenscope("run", "--resume", "sec/symtab"),
         setup=linked_tables, victims=("sec/victim",), expect="any"),
    Case("7.2", "--out a dangling symlink", tokenscope("run", *sized("si/street_5000001.png"), "--out", "symo/dangling"),
         setup=odd_links),
    Case("7.3", "--out a symlink loop", tokenscope("run", *sized("si/street_5000001.png"), "--out", "symo/loop"),
         setup=odd_links),
    Case("7.4", "compare --out a dangling symlink", tokenscope(
        "compare", "si/street_5000001.png", "--size", "128", "--out", "symo/dangling"), setup=odd_links),
    Case("7.5", "train --out under a dangling symlink", tokenscope(
        "train", "--out", "symo/dangling/m", "--crops", "64x2", "--size", "128", "--steps", "1", "--no-eval"),
         setup=odd_links),
    Case("7.6", "tune --out under a dangling symlink (said before the search)", tokenscope(
        "tune", "--max-gflops", "4.5", "--calib-seeds", "200000:200002", "--held-seeds", "300000:300002", "--out",
        "symo/dangling/op.json"), setup=odd_links, timeout=30),
    Case("7.7", "--out holding [/]", tokenscope("run", *sized("si/street_5000001.png"), "--out", "o[/]"), expect="ok"),
    Case("7.8", "heatmap of that run", lambda: execute(tokenscope("heatmap", str(only_child("o[/]")), "--kind", "merge"),
                                                       120), setup=markup_run("o[/]"), expect="ok"),
    Case("7.9", "view of that run", lambda: execute(tokenscope("view", str(only_child("o[/]"))), 120),
         setup=markup_run("o[/]"), expect="ok"),
    Case("7.10", "report of that run", lambda: execute(tokenscope("report", str(only_child("o[/]"))), 120),
         setup=markup_run("o[/]"), expect="ok"),
    Case("7.11", "an unreadable image inside folder d[/x]", tokenscope("run", *sized("d[/x]"), "--out", "ro_none"),
         setup=unreadable_in("d[/x]"), check=has("broken.png")),
    Case("7.12", "--out 'o2[@a=(]'", tokenscope("run", *sized("si/street_5000001.png"), "--out", "o2[@a=(]"),
         expect="ok"),
    Case("7.13", "--class-map 'cm/ok[/].json'", tokenscope(
        "run", *sized("si/street_5000001.png"), "--labels", "si/labels", "--class-map", "cm/ok[/].json", "--out",
        "cm/out"), setup=class_map_file, expect="any"),
    Case("7.14", "data check --root 'dc[/x]' with an empty mask", tokenscope("data", "check", "folder", "--root",
                                                                             "dc[/x]"),
         setup=empty_mask_dataset),
    Case("7.15", "read-only cwd: run", in_read_only("run", *sized("street_5000001.png")), needs=is_root),
    Case("7.16", "read-only cwd: heatmap", in_read_only("heatmap", "r"), needs=is_root),
    Case("7.17", "read-only cwd: view", in_read_only("view", "r"), needs=is_root),
    Case("7.18", "read-only cwd: train", in_read_only("train", "--crops", "64x2", "--size", "128", "--steps", "1",
                                                      "--no-eval"), needs=is_root),
    Case("7.19", "read-only cwd: compare", in_read_only("compare", "street_5000001.png", "--size", "128"),
         needs=is_root),
]


# ---- 8 signals, kill -9, concurrency, torchrun, resource limits ----------------------------------------

def interrupted(argv: list[str], after: float, sig: int = signal.SIGINT, timeout: float = 120) -> Callable[[], Outcome]:
    return lambda: execute(argv, timeout, interrupt=(sig, after))


def resume_interrupted() -> Outcome:
    return execute(tokenscope("run", "--resume", str(only_child("sig/ds"))), 300)


def no_empty_compare(outcome: Outcome) -> tuple[str, str] | None:
    left = [p.name for p in (W / "sig" / "cmp").glob("compare-*") if not (p / "run.json").exists()]
    return ("unclear", f"an empty {left[0]} is left") if left else lacks("run.json")(outcome)


def early_interrupts() -> Outcome:
    texts = [execute(tokenscope("run", *sized("si/street_5000001.png"), "--out", "sig/early"), 60,
                     interrupt=(signal.SIGINT, t)) for t in (0.15, 0.3, 0.6)]
    silent = [t for t, o in zip((0.15, 0.3, 0.6), texts) if not o.out.strip() and o.rc != 0]
    return Outcome(130 if silent else 0, "\n".join(o.out for o in texts) + (f"\nsilent at {silent}" if silent else ""))


def killed_compare_then_read() -> Outcome:
    argv = tokenscope("compare", "si/street_5000001.png", "si/street_5000002.png", "si/street_5000003.png",
                      "--methods", "step,tome,algm", "--size", "256", "--out", "k9/cmp")
    killed = execute(argv, 120, interrupt=(signal.SIGKILL, 12))
    left = [p for p in (W / "k9" / "cmp").glob("compare-*")]
    if killed.rc != -signal.SIGKILL or not left or (left[0] / "run.json").exists():
        return Outcome(0, "the compare had finished its folder before the kill, or left nothing: nothing half-written")
    view = execute(tokenscope("view", str(left[0])), 60)
    table = execute(tokenscope("table", str(left[0])), 60)
    both = view.rc not in (0, None) and table.rc not in (0, None) and first_error(view.out) and first_error(table.out)
    return Outcome(0 if both else 1, view.out + table.out + ("" if both else "\nread a half-written folder"))


def killed_exports() -> Outcome:
    run = copy_run("k9/exp", status=None)
    for t in (0.55, 0.65, 0.75, 1.5, 3.0):
        execute(tokenscope("view", str(run), "--serve"), 30, interrupt=(signal.SIGKILL, t))
    final = execute(tokenscope("view", str(run), "--serve"), 60, interrupt=(signal.SIGINT, 15))
    litter = [p.name for p in run.iterdir() if p.name.startswith(".explorer_data")]
    return Outcome(final.rc, final.out + (f"\nleft behind: {litter}" if litter else ""))


def killed_trains() -> Outcome:
    out = W / "k9" / "tr"
    out.mkdir(parents=True, exist_ok=True)
    base = tokenscope("train", "--out", "k9/tr/m", "--crops", "64x2", "--size", "128", "--steps", "40",
                      "--save-every", "1", "--warmup", "0", "--no-eval")
    state = out / "m.train.pt"
    for t in (10, 14, 18):  # resumed once a first step was saved; killed each time
        execute(base + (["--resume"] if state.exists() else []), 60, interrupt=(signal.SIGKILL, t))
    final = execute(base + (["--resume"] if state.exists() else []), 300)
    temps = [p.name for p in out.rglob("*") if p.name.endswith(".tmp") or ".partial" in p.name]
    return Outcome(final.rc, final.out + (f"\ntemporary files left: {temps}" if temps else ""))


def killed_heatmap() -> Outcome:
    run = copy_run("k9/hm", status=None, source="many30")
    execute(tokenscope("heatmap", str(run), "--kind", "all"), 60, interrupt=(signal.SIGKILL, 6.5))
    shown = [p.name for p in run.glob("heatmaps-*")]
    return Outcome(0, f"visible heatmaps folders after the kill: {shown}")


def thirty_image_run() -> None:
    if not (W / "many30").exists():
        execute(tokenscope("run", "--dataset", "synthetic", "--seeds", "0:30", "--scene-size", "128", "--no-animation",
                           "--out", "many30"), 600)


def killed_tune() -> Outcome:
    killed = execute(tokenscope("tune", "--max-gflops", "4.5", "--calib-seeds", "200000:200010", "--held-seeds",
                                "300000:300010", "--out", "k9/op.json"), 120, interrupt=(signal.SIGKILL, 12))
    if killed.rc != -signal.SIGKILL:
        return Outcome(0, "tune finished before the kill")
    written = [p.name for p in (W / "k9").glob("op.json*")] + [p.name for p in (W / "k9").glob(".op.json.*tmp*")]
    return Outcome(0 if not written else 1, f"written: {written}")


def together(argvs: list[list[str]], timeout: float = 400) -> list[Outcome]:
    procs = [subprocess.Popen(a, cwd=W, env=child_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for a in argvs]
    outs = []
    for p in procs:
        try:
            text = p.communicate(timeout=timeout)[0]
            outs.append(Outcome(p.returncode, text))
        except subprocess.TimeoutExpired:
            p.kill()
            outs.append(Outcome(None, p.communicate()[0], timed_out=True))
    return outs


def one_of_two(outs: list[Outcome]) -> Outcome:
    """Two writers of one --out: exactly one writes (its own exit status: tune's 4/5 still wrote a
    verdict) and the other is refused with one error line."""
    if any(o.timed_out for o in outs):
        return Outcome(None, "", timed_out=True)
    refused = [o for o in outs if o.rc not in (0, None) and first_error(o.out)
               and ("another tokenscope process" in o.out or "exists" in o.out)]
    won = [o for o in outs if o not in refused and not first_error(o.out)]
    text = "\n".join(o.out for o in outs)
    ok = len(won) == 1 and len(refused) == 1
    return Outcome(0 if ok else 1, text + f"\nwrote: {len(won)} of 2, refused: {len(refused)}")


def two_trains() -> Outcome:
    (W / "tr").mkdir(exist_ok=True)
    argv = ["train", "--out", "tr/same", "--crops", "64x2", "--size", "128", "--steps", "6", "--warmup", "0",
            "--save-every", "1", "--no-eval"]
    return one_of_two(together([tokenscope(*argv, "--seed", "1"), tokenscope(*argv, "--seed", "2")]))


def two_tunes() -> Outcome:
    (W / "tune").mkdir(exist_ok=True)
    common = ["--calib-seeds", "200000:200002", "--held-seeds", "300000:300002", "--out", "tune/same.json"]
    return one_of_two(together([tokenscope("tune", "--max-gflops", "4.5", *common),
                                tokenscope("tune", "--max-gflops", "2.9", *common)]))


def two_sweeps() -> Outcome:
    argv = tokenscope("sweep", "--merge-thresholds", "0.5", "--exit-thresholds", "0.95", "--seeds", "100000:100003",
                      "--scene-size", "128", "--out", "swc2")
    outs = together([argv, argv])
    done = [p for p in (W / "swc2").glob("sweep-*")
            if json.loads((p / "run.json").read_text()).get("status") == "complete"]
    return Outcome(0 if len(done) == 2 and all(o.rc == 0 for o in outs) else 1,
                   "\n".join(o.out for o in outs) + f"\ncomplete sweeps: {len(done)}")


def strip_torchrun_report(text: str) -> str:
    """torchrun's own report of a failed worker (its agent's traceback ending in ChildFailedError) is not a
    traceback of tokenscope's: it is cut out, leaving what the ranks themselves printed."""
    while "ChildFailedError" in text:
        start = text.find("Traceback (most recent call last)")
        end = text.find("ChildFailedError", max(start, 0))
        if start < 0 or end < 0 or "torch/distributed" not in text[start:end]:
            break
        stop = text.find("\n", end)
        text = text[:start] + "[torchrun's own report of the failed worker]" + (text[stop:] if stop >= 0 else "")
    return text


def parent_of(pid: int) -> int:
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return -1
    found = re.search(r"^PPid:\s+(\d+)", status, flags=re.M)
    return int(found.group(1)) if found else -1


def torchrun_rank(rank: int, sig: int, after: float, extra_env: dict[str, str], seeds: str, size: str) -> Outcome:
    torchrun = shutil.which("torchrun") or str(Path(sys.executable).parent / "torchrun")
    argv = [torchrun, "--nproc_per_node", "2", "-m", "tokenscope", "run", "--dataset", "synthetic", "--seeds", seeds,
            "--scene-size", size, "--no-animation", "--out", f"dist/o{rank}{sig}"]
    proc = subprocess.Popen(argv, cwd=W, env=child_env(extra_env), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, start_new_session=True)
    time.sleep(after)
    target = None
    for pid in os.listdir("/proc"):
        try:
            environ = Path(f"/proc/{pid}/environ").read_bytes()
            cmd = Path(f"/proc/{pid}/cmdline").read_bytes()
        except (OSError, ValueError):
            continue
        if pid.isdigit() and b"tokenscope" in cmd and f"\0RANK={rank}\0".encode() in b"\0" + environ and \
                b"torchrun" not in cmd and parent_of(int(pid)) == proc.pid:  # torchrun's own worker
            target = int(pid)
    if target:
        os.kill(target, sig)
    try:
        out, _ = proc.communicate(timeout=120)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        return Outcome(None, proc.communicate()[0], timed_out=True)
    finally:
        if target and sig == signal.SIGSTOP:
            try:
                os.kill(target, signal.SIGKILL)
            except ProcessLookupError:
                pass
    out = strip_torchrun_report(out)
    return Outcome(proc.returncode, out if target else "error: the rank to stop was not found\n" + out)


def under_limits(limit: int, *args: str) -> Callable[[], Outcome]:
    return lambda: execute(tokenscope(*args), 300, limits={resource.RLIMIT_NOFILE: limit})


def big_image() -> None:
    import cv2
    import numpy as np

    (W / "odd").mkdir(exist_ok=True)
    if not (W / "odd" / "big4096.png").exists():
        rng = np.random.default_rng(0)
        cv2.imwrite(str(W / "odd" / "big4096.png"), rng.integers(0, 255, (4096, 4096, 3), dtype=np.uint8))


def fd_limits() -> Outcome:
    outs = [execute(tokenscope("run", "si/street_5000001.png", "si/street_5000002.png", "--size", "128", "--out",
                               f"ulim{n}"), 180, limits={resource.RLIMIT_NOFILE: n}) for n in (12, 20, 40)]
    bad = [o for o in outs if "Traceback" in o.out or (o.rc != 0 and not first_error(o.out))]
    return Outcome(0 if not bad else 1, "\n".join(o.out for o in outs))


def has_torchrun() -> str:
    return "" if shutil.which("torchrun") or (Path(sys.executable).parent / "torchrun").exists() else "needs torchrun"


SIGNALS = [
    Case("8.1", "Ctrl-C in a data-set run names the folder and --resume", interrupted(tokenscope(
        "run", "--dataset", "synthetic", "--seeds", "0:200", "--scene-size", "128", "--no-animation", "--out", "sig/ds"),
        14), expect="any", check=lambda o: None if o.rc == 0 else has("--resume", "sig/ds")(o)),
    Case("8.2", "--resume it", resume_interrupted, expect="ok", timeout=300),
    Case("8.3", "Ctrl-C in train", interrupted(tokenscope(
        "train", "--out", "sig/tr", "--crops", "64x2", "--size", "128", "--steps", "400", "--warmup", "0",
        "--save-every", "50", "--no-eval"), 16), expect="any", check=lacks("run.json")),
    Case("8.4", "Ctrl-C in compare --methods", interrupted(tokenscope(
        "compare", "si/street_5000001.png", "si/street_5000002.png", "si/street_5000003.png", "--methods",
        "step,tome,algm,cts", "--size", "256", "--out", "sig/cmp"), 13), expect="any", check=no_empty_compare),
    Case("8.5", "Ctrl-C in tune", interrupted(tokenscope(
        "tune", "--max-gflops", "4.5", "--calib-seeds", "200000:200002", "--held-seeds", "300000:300002", "--out",
        "sig/op.json"), 20), expect="any", check=lacks("run.json")),
    Case("8.6", "Ctrl-C 0.05 s after start", interrupted(tokenscope("run", *sized("si/street_5000001.png"), "--out",
                                                                    "sig/early"), 0.05), expect="any"),
    Case("8.7", "Ctrl-C at 0.15 / 0.3 / 0.6 s says so", early_interrupts, expect="any",
         check=lacks("silent at", severity="unclear")),
    Case("8.8", "kill -9 compare mid-run, then view and table on the leftover", killed_compare_then_read, expect="ok"),
    Case("8.9", "kill -9 view --serve exports; a later export leaves no litter", killed_exports, expect="any",
         check=lacks("left behind"), timeout=200),
    Case("8.10", "kill -9 train x3 with --save-every 1, resuming each time", killed_trains, expect="ok",
         check=lacks("temporary files left"), timeout=500),
    Case("8.11", "kill -9 heatmap: no partial folder that looks finished", killed_heatmap, setup=thirty_image_run,
         expect="any", check=lambda o: None if "[]" in o.out else ("unclear", o.out), timeout=200),
    Case("8.12", "kill -9 tune at 20 s", killed_tune, expect="ok"),
    Case("8.13", "two trains into one --out", two_trains, expect="ok", timeout=500),
    Case("8.14", "two tunes into one --out", two_tunes, expect="ok", timeout=500),
    Case("8.15", "two sweeps into one --out", two_sweeps, expect="ok", timeout=500),
    Case("8.16", "torchrun, kill -9 rank 1: the other rank says why it stops", lambda: torchrun_rank(
        1, signal.SIGKILL, 25, {}, "0:400", "256"), needs=has_torchrun, timeout=200, expect="any",
         check=all_of(has("stopped by torchrun"), lambda o: None if o.rc else ("wrong exit", "exit 0"))),
    Case("8.17", "torchrun, rank 1 stopped, TOKENSCOPE_DIST_TIMEOUT=15",
         lambda: torchrun_rank(1, signal.SIGSTOP, 25, {"TOKENSCOPE_DIST_TIMEOUT": "15"}, "0:300", "128"),
         needs=has_torchrun, timeout=200),
    Case("8.18", "SIGTERM in a data-set run", interrupted(tokenscope(
        "run", "--dataset", "synthetic", "--seeds", "0:30", "--scene-size", "128", "--no-animation", "--out",
        "sig/term"), 13, signal.SIGTERM), expect="any",
         check=lambda o: ("unclear", "a .partial folder is left") if list((W / "sig" / "term").rglob(".partial*"))
         else None),
    Case("8.19", "SIGTERM train x4 with --save-every 1", lambda: Outcome(0, "\n".join(
        execute(tokenscope("train", "--out", f"sig/trt{t}", "--crops", "64x2", "--size", "128", "--steps", "200",
                           "--save-every", "1", "--no-eval"), 60, interrupt=(signal.SIGTERM, t)).out
        for t in (13, 14, 15, 16))), expect="any",
         check=lambda o: ("unclear", "temporary files left") if [p for p in (W / "sig").rglob("*.tmp")] else None),
    Case("8.20", "memory limit, a 4096x4096 image", tokenscope("run", "odd/big4096.png", "--no-animation", "--out",
                                                               "oom"),
         setup=big_image, limits={resource.RLIMIT_AS: 5_000_000_000}, expect="any", timeout=300),
    Case("8.21", "memory limit, bench vitl at 1024", tokenscope("bench", "--model", "vitl", "--random-init", "--size",
                                                                "1024", "--batch", "4"),
         limits={resource.RLIMIT_AS: 5_000_000_000}, timeout=300),
    Case("8.22", "ulimit -n 12 / 20 / 40", fd_limits, expect="any", timeout=600),
    Case("8.23", "file-size limit (EFBIG)", tokenscope("run", *sized("si/street_5000001.png"), "--out", "ulimf2"),
         limits={resource.RLIMIT_FSIZE: 20 * 1024}),
]


# ---- 9 odd images, file names, FIFOs, labels -----------------------------------------------------------

def odd(name: str) -> Path:
    (W / "odd").mkdir(exist_ok=True)
    return W / "odd" / name


def make_odd_images() -> None:
    if odd("cmyk.jpg").exists():
        return
    import numpy as np
    from PIL import Image

    street = Image.open(W / "si" / "street_5000001.png").convert("RGB")
    exif = street.resize((320, 192)).getexif()
    exif[0x0112] = 6
    street.resize((320, 192)).save(odd("exif6.jpg"), exif=exif)
    np_lab = np.zeros((320, 192), np.uint8)
    Image.fromarray(np_lab).save(odd("exif6_lab.png"))
    street.convert("CMYK").save(odd("cmyk.jpg"))
    pal = street.convert("P")
    pal.info["transparency"] = 0
    pal.save(odd("palette_trns.png"), transparency=0)
    for w, h in ((1, 300), (300, 1), (1, 4000)):
        Image.new("RGB", (w, h), (90, 120, 30)).save(odd(f"thin_{w}x{h}.png"))
    frames = [street.resize((128, 96)).rotate(a) for a in (0, 90, 180)]
    frames[0].save(odd("anim.gif"), save_all=True, append_images=frames[1:])
    frames[0].save(odd("pages.tif"), save_all=True, append_images=frames[1:])
    frames[0].save(odd("anim.webp"), save_all=True, append_images=frames[1:])
    odd("fake.heic").write_bytes(b"\0\0\0\x18ftypheic\0\0\0\0mif1heic" + b"\0" * 100)


def many_empty() -> None:
    folder = W / "many"
    if not folder.exists():
        folder.mkdir()
        for i in range(10_000):
            (folder / f"e{i:05d}.png").write_bytes(b"")


def many_run() -> Path:
    many_empty()
    if not (W / "many_out").exists():
        execute(tokenscope("run", "many", "--size", "128", "--no-animation", "--out", "many_out"), 600)
    return only_child("many_out")


def long_names() -> None:
    folder = W / "ln"
    if not folder.exists():
        folder.mkdir()
        shutil.copy(W / "si" / "street_5000001.png", folder / ("a" * 248 + ".png"))
        (folder / "two").mkdir()
        shutil.copy(W / "si" / "street_5000001.png", folder / "two" / ("b" * 242 + ".png"))


def long_name_served() -> Outcome:
    long_names()
    made = execute(tokenscope("run", "ln/two", "--size", "128", "--no-animation", "--out", "ln/out2"), 120)
    if made.rc != 0:
        return made
    return execute(tokenscope("view", str(only_child("ln/out2")), "--serve"), 60, interrupt=(signal.SIGINT, 15))


def named(folder: str, *names: str, empty: bool = False) -> Callable[[], None]:
    def setup() -> None:
        target = W / folder
        target.mkdir(exist_ok=True)
        for name in names:
            path = os.fsencode(target) + b"/" + (name if isinstance(name, bytes) else name.encode())
            if empty:
                Path(os.fsdecode(path)).write_bytes(b"")
            else:
                shutil.copy(W / "si" / "street_5000001.png", os.fsdecode(path))
    return setup


def collide(folder: str, *names: str) -> Callable[[], Outcome]:
    def go() -> Outcome:
        named(folder, *names)()
        out = folder + "_out"
        made = execute(tokenscope("run", folder, "--size", "128", "--no-animation", "--out", out), 300)
        if made.rc != 0:
            return made
        run = only_child(out)
        done = json.loads((run / "run.json").read_text())
        ok = [im for im in done.get("images", []) if im.get("folder")]
        return Outcome(0 if len(ok) == len(names) else 1, made.out + f"\nimages traced: {len(ok)} of {len(names)}")
    return go


def explorer_named_image() -> Outcome:
    named("coll3", "explorer_data.png", "b.png")()
    made = execute(tokenscope("run", "coll3", "--size", "128", "--no-animation", "--out", "coll_out3"), 300)
    run = only_child("coll_out3")
    traces_before = sorted(str(p.relative_to(run)) for p in run.rglob("trace.json"))
    served = execute(tokenscope("view", str(run), "--serve"), 60, interrupt=(signal.SIGINT, 15))
    traces_after = sorted(str(p.relative_to(run)) for p in run.rglob("trace.json"))
    lost = sorted(set(traces_before) - set(traces_after))
    return Outcome(0 if not lost and made.rc == 0 else 1, made.out + served.out + (f"\nlost: {lost}" if lost else ""))


def fifo(path: str) -> Callable[[], None]:
    def setup() -> None:
        target = W / path
        target.parent.mkdir(parents=True, exist_ok=True)
        if not target.exists():
            os.mkfifo(target)
    return setup


def fifo_dataset() -> None:
    for sub in ("images", "masks"):
        (W / "dsf" / sub).mkdir(parents=True, exist_ok=True)
    shutil.copy(W / "si" / "street_5000001.png", W / "dsf" / "images" / "a.png")
    shutil.copy(W / "si" / "labels" / "street_5000001.png", W / "dsf" / "masks" / "a.png")
    fifo("dsf/images/b.png")()
    fifo("dsf/masks/b.png")()


def many_masks_missing() -> None:
    many_empty()
    images = W / "many_ds" / "images"
    if not images.exists():
        images.mkdir(parents=True)
        for p in (W / "many").iterdir():
            os.link(p, images / p.name)


def label_sized(name: str, height: int, width: int) -> Callable[[], None]:
    def setup() -> None:
        import cv2
        import numpy as np

        (W / "labs" / name).mkdir(parents=True, exist_ok=True)
        cv2.imwrite(str(W / "labs" / name / "street_5000001.png"), np.zeros((height, width), np.uint8))
    return setup


def odd_case(cid: str, what: str, file: str, expect: str = "ok", check=None) -> Case:
    return Case(cid, what, tokenscope("run", *sized(f"odd/{file}"), "--out", "odd/out"), setup=make_odd_images,
                expect=expect, check=check)


IMAGES = [
    Case("9.1", "EXIF orientation 6: traced as shown, labels made on the shown image fit", tokenscope(
        "run", *sized("odd/exif6.jpg"), "--labels", "odd/exif6_lab.png", "--out", "odd/out"), setup=make_odd_images,
         expect="ok"),
    odd_case("9.2", "CMYK JPEG", "cmyk.jpg"),
    odd_case("9.3", "palette PNG with tRNS", "palette_trns.png"),
    odd_case("9.4", "1x300", "thin_1x300.png"),
    odd_case("9.5", "300x1", "thin_300x1.png"),
    odd_case("9.6", "1x4000", "thin_1x4000.png"),
    odd_case("9.7", "animated GIF: says it takes the first frame", "anim.gif", check=has("frame")),
    odd_case("9.8", "3-page TIFF: says it takes the first page", "pages.tif", check=has("page")),
    odd_case("9.9", "animated WebP", "anim.webp"),
    odd_case("9.10", "fake HEIC", "fake.heic", expect="error"),
    Case("9.11", "folder of 10,000 empty .png", lambda: execute(tokenscope(
        "run", "many", "--size", "128", "--no-animation", "--out", "many_out0"), 600), setup=many_empty, timeout=600),
    *[Case(f"9.{12 + i}", f"{cmd} on that run", lambda cmd=cmd, extra=extra: execute(
        tokenscope(cmd, str(many_run()), *extra), 300), expect="any", timeout=900)
      for i, (cmd, extra) in enumerate((("view", []), ("report", []), ("heatmap", []), ("table", ["--kind", "classes"])))],
    Case("9.16", "252-character file name", tokenscope("run", *sized("ln"), "--out", "ln/out"), setup=long_names,
         expect="any", check=lambda o: None if (W / "ln" / "out").exists() and json.loads(
             (only_child("ln/out") / "run.json").read_text()).get("status") == "complete" else ("unclear", o.out[-200:])),
    Case("9.17", "246-character name: the run works, then view --serve", long_name_served, expect="any"),
    Case("9.18", "a file name with a non-UTF-8 byte", tokenscope("run", *sized("uni"), "--out", "uni_out"),
         setup=named("uni", b"bad\xffname.png"), expect="ok"),
    Case("9.19", "newline in a file name (empty file): one line", tokenscope("run", *sized("uni2"), "--out", "uni2_out"),
         setup=named("uni2", "new\nline.png", empty=True),
         check=lambda o: None if any(ln.startswith("error:") and "line.png" in ln for ln in o.out.splitlines())
         else ("unclear", "the error is split over lines")),
    Case("9.20", "ANSI escapes in a file name", tokenscope("run", *sized("uni3"), "--out", "uni3_out"),
         setup=named("uni3", "\x1b[2J\x1b[31mansi.png", empty=True), check=lacks("\x1b[2J")),
    Case("9.21", "images named tables.png, figures.png, explorer_data.png, summary.json.png",
         collide("coll", "tables.png", "figures.png", "explorer_data.png", "summary.json.png"), expect="ok"),
    Case("9.22", "same call: summary.json.png is one image among others",
         collide("coll2", "summary.json.png", "a.png"), expect="ok"),
    Case("9.23", "image named run.json.png: the others are still processed",
         collide("coll4", "run.json.png", "z.png"), expect="ok"),
    Case("9.24", "image named explorer_data.png, then view --serve", explorer_named_image, expect="ok"),
    Case("9.25", "labels with 511 rows", tokenscope("run", "si/street_5000001.png", "--labels", "labs/r511",
                                                    "--size", "128", "--no-animation", "--out", "labs/out"),
         setup=label_sized("r511", 511, 512)),
    Case("9.26", "labels 1024x1024: run", tokenscope("run", "si/street_5000001.png", "--labels", "labs/big",
                                                     "--size", "128", "--no-animation", "--out", "labs/out"),
         setup=label_sized("big", 1024, 1024)),
    Case("9.27", "labels 1024x1024: compare", tokenscope("compare", "si/street_5000001.png", "--labels", "labs/big",
                                                         "--size", "128", "--out", "labs/cout"),
         setup=label_sized("big", 1024, 1024)),
    Case("9.28", "FIFO given as an image", tokenscope("run", *sized("dsf/images/b.png"), "--out", "fifo_o"),
         setup=fifo_dataset, timeout=30),
    Case("9.29", "FIFO image and mask in a folder data set", tokenscope("data", "check", "folder", "--root", "dsf"),
         setup=fifo_dataset, timeout=30),
    Case("9.30", "FIFO as operating point", tokenscope("run", *sized("si/street_5000001.png"), "--operating-point",
                                                       "fifo_op.json", "--out", "fifo_o2"),
         setup=fifo("fifo_op.json"), timeout=30),
    Case("9.31", "10,000 empty images, no masks: data check", lambda: execute(tokenscope(
        "data", "check", "folder", "--root", "many_ds"), 300), setup=many_masks_missing, timeout=300),
]


# ---- 10 class maps, method specs, plug-ins, train ------------------------------------------------------

PLUGIN = (ROOT / "examples" / "plugins" / "norm_prune" / "norm_prune.py").read_text()


def plugin(name: str, prefix: str = "", replace: tuple[str, str] = ("", "")) -> Callable[[], None]:
    def setup() -> None:
        (W / "plug").mkdir(exist_ok=True)
        text = PLUGIN.replace(*replace) if replace[0] else PLUGIN
        (W / "plug" / name).write_text(prefix + text)
    return setup


def class_map(name: str, text: str) -> Callable[[], None]:
    def setup() -> None:
        (W / "cm").mkdir(exist_ok=True)
        (W / "cm" / name).write_text(text)
    return setup


def with_map(cid: str, what: str, name: str, text: str) -> Case:
    return Case(cid, what, tokenscope("run", *sized("si/street_5000001.png"), "--labels", "si/labels",
                                      "--class-map", f"cm/{name}", "--out", "cm/out"), setup=class_map(name, text))


def method(cid: str, what: str, spec: str, expect: str = "error", setup=None, check=None) -> Case:
    return Case(cid, what, tokenscope("run", *sized("si/street_5000001.png"), "--method", spec, "--out", "plug_out"),
                expect=expect, setup=setup, check=check)


def short_line(outcome: Outcome) -> tuple[str, str] | None:
    line = first_error(outcome.out)
    full = next((ln for ln in outcome.out.splitlines() if ln.startswith("error:")), "")
    return ("unclear", f"the error line is {len(full)} characters long") if line and len(full) > 800 else None


def diverging_train() -> Outcome:
    outcome = execute(tokenscope("train", "--out", "rc/tr/lr1", "--lr", "1", "--crops", "64x2", "--steps", "6",
                                 "--warmup", "0", "--save-every", "1", "--size", "128", "--no-eval"), 300)
    return outcome


PLUGINS = [
    with_map("10.1", "class map {'0': NaN}", "nan.json", '{"0": NaN}'),
    with_map("10.2", "class map {'0': 1e400}", "inf.json", '{"0": 1e400}'),
    with_map("10.3", "class map key '²' (JSON)", "sup.json", '{"\u00b2": 0}'),
    with_map("10.4", "class map key '²' (CSV)", "sup.csv", "0,0\n\u00b2,1\n"),
    method("10.5", "10,000 distinct settings", "tome:" + ":".join(f"k{i}=1" for i in range(10_000)), check=short_line),
    method("10.6", "10,000 times r=", "tome:" + ":".join("r=1" for _ in range(10_000)), check=short_line),
    *[method(f"10.{7 + i}", spec if len(spec) < 60 else "500 x tome", spec) for i, spec in enumerate((
        "step+tome+algm+evit", "dtop+tome+tome", "tome+tome", "step+evit+tome", "vit+vit", "dcts+algm+tome+evit+tome+algm",
        "+".join(["tome"] * 500)))],
    method("10.14", "tömé", "tömé"),
    method("10.15", "tome:r=", "tome:r="),
    method("10.16", "tome::r=4", "tome::r=4"),
    method("10.17", "+tome", "+tome"),
    method("10.18", "tome+", "tome+"),
    method("10.19", "step+tome:r=0.05:exit=0.9 (settings to their parts)", "step+tome:r=4:exit=0.9", expect="ok"),
    method("10.20", "method file doing sys.exit(0) on import", "plug/exit0.py",
           setup=plugin("exit0.py", "import sys\nsys.exit(0)\n")),
    method("10.21", "method file raising SystemExit('plugin says bye')", "plug/bye.py",
           setup=plugin("bye.py", "raise SystemExit('plugin says bye')\n")),
    method("10.22", "method file raising KeyboardInterrupt", "plug/kbd.py", expect="any",
           setup=plugin("kbd.py", "raise KeyboardInterrupt\n"), check=lacks("run.json")),
    method("10.23", "method file whose METHOD is named tome", "plug/tome_fake.py",
           setup=plugin("tome_fake.py", replace=('name="norm_prune"', 'name="tome"'))),
    method("10.24", "a setting's parser raising SystemExit(0)", "plug/badsetting.py:frac=0.3",
           setup=plugin("badsetting.py", replace=("def fraction(value: float) -> str | None:\n",
                                                  "def fraction(value: float) -> str | None:\n    raise SystemExit(0)\n"))),
    *[Case(f"10.{25 + i}", f"heatmap --kind groups --blocks {blocks}", lambda blocks=blocks: execute(tokenscope(
        "heatmap", str(only_child("base")), "--kind", "groups", "--blocks", blocks), 120),
        expect="any" if blocks == "1,,2" else "error") for i, blocks in enumerate(("0", "999", "a", "1,,2", "-1", "1e400"))],
    Case("10.31", "train --lr 1: a diverging run is not saved as a success", diverging_train),
]


# ---- 11 crafted run-folder content ---------------------------------------------------------------------

def crafted_run(name: str, change: Callable[[Path], object], status: str = "running", source: str = "base") -> Callable[[], None]:
    def setup() -> None:
        if not (W / "rfm" / name).exists():
            change(copy_run(f"rfm/{name}", status=status, source=source))
    return setup


def request(key: str, value: object) -> Callable[[Path], object]:
    def change(run: Path) -> None:
        def edit(doc: dict) -> None:
            target = doc["request"]
            *path, last = key.split(".")
            for part in path:
                target = target[part]
            target[last] = value
        edit_json(run / "run.json", edit)
    return change


def image_summary_without_tokens(run: Path) -> None:
    edit_json(image_folder(run) / "summary.json", lambda d: d.pop("tokens", None))


def trace_meta(key: str, value: object) -> Callable[[Path], object]:
    def change(run: Path) -> None:
        def edit(doc: dict) -> None:
            (doc["meta"] if isinstance(doc.get("meta"), dict) else doc)[key] = value
        edit_json(image_folder(run) / "trace.json", edit)
    return change


def methods_field(value: object) -> Callable[[Path], object]:
    return lambda run: edit_json(run / "run.json", lambda d: d.__setitem__("methods", value))


def text_in_methods_csv(run: Path) -> None:
    path = run / "methods.csv"
    lines = path.read_text().splitlines()
    head = lines[0].split(",")
    rows = [",".join("abc" if i > 1 else v for i, v in enumerate(line.split(","))) for line in lines[1:]]
    path.write_text("\n".join([",".join(head), *rows]) + "\n")


def rfm(name: str) -> str:
    return f"rfm/{name}"


def resume(cid: str, what: str, name: str, change: Callable[[Path], object], expect: str = "error") -> Case:
    return Case(cid, what, tokenscope("run", "--resume", rfm(name)), setup=crafted_run(name, change), expect=expect)


RUN_FOLDERS = [
    resume("11.1", 'request.size = "abc"', "size_str", request("size", "abc")),
    resume("11.2", "request.figure_dpi = -5", "dpi_neg", request("figure_dpi", -5)),
    resume("11.3", "request.inputs = 5", "inputs_int", request("inputs", 5)),
    resume("11.4", "request.every = 0", "every_0", request("every", 0), expect="any"),
    resume("11.5", 'request.model.exit_threshold = "high"', "exit_str", request("model.exit_threshold", "high")),
    Case("11.6", "image summary.json without tokens: report", tokenscope("report", rfm("img_summary_nokey")),
         setup=crafted_run("img_summary_nokey", image_summary_without_tokens, status="complete"), expect="any"),
    Case("11.7", "run summary.json is a list: report", tokenscope("report", rfm("run_summary_list")),
         setup=crafted_run("run_summary_list", lambda r: (r / "summary.json").write_text("[1, 2]"), status="complete"),
         expect="any"),
    Case("11.8", "run summary.json invalid JSON: report", tokenscope("report", rfm("run_summary_badjson")),
         setup=crafted_run("run_summary_badjson", lambda r: (r / "summary.json").write_text("{nope"),
                           status="complete"), expect="any"),
    *[Case(f"11.{9 + i}", f'compare manifest "methods": {value!r}: view', tokenscope("view", rfm(name)),
           setup=crafted_run(name, methods_field(value), status="complete", source="cmpbase"), expect="error")
      for i, (name, value) in enumerate((("meth_int", [1]), ("meth_trav", ["../../../../etc"]),
                                         ("meth_dict", [{"a": 1}])))],
    *[Case(f"11.{12 + i}", f"table on {name}", tokenscope("table", rfm(name)),
           setup=crafted_run(name, methods_field(value), status="complete", source="cmpbase"), expect="any")
      for i, (name, value) in enumerate((("meth_int", [1]), ("meth_trav", ["../../../../etc"]),
                                         ("meth_dict", [{"a": 1}])))],
    Case("11.15", "methods.csv with text in numeric columns: view", tokenscope("view", rfm("csv_text")),
         setup=crafted_run("csv_text", text_in_methods_csv, status="complete", source="cmpbase"), expect="any"),
    Case("11.16", "same: table", tokenscope("table", rfm("csv_text")),
         setup=crafted_run("csv_text", text_in_methods_csv, status="complete", source="cmpbase")),
    Case("11.17", "trace meta grid [100000, 100000]: heatmap", tokenscope("heatmap", rfm("tr_grid_huge")),
         setup=crafted_run("tr_grid_huge", trace_meta("grid", [100000, 100000]), status="complete"),
         limits={resource.RLIMIT_AS: 8_000_000_000}, expect="any", check=lambda o: None if o.rc else
         ("wrong exit", "a damaged trace rendered with exit 0")),
    Case("11.18", "padded_hw [1600000, 1600000]: heatmap", tokenscope("heatmap", rfm("tr_padded_huge")),
         setup=crafted_run("tr_padded_huge", trace_meta("padded_hw", [1600000, 1600000]), status="complete"),
         limits={resource.RLIMIT_AS: 8_000_000_000}, expect="any", check=lambda o: None if o.rc else
         ("wrong exit", "a damaged trace rendered with exit 0")),
    Case("11.19", "num_classes 1e9: view", tokenscope("view", rfm("tr_classes_huge")),
         setup=crafted_run("tr_classes_huge", trace_meta("num_classes", 10**9), status="complete"),
         limits={resource.RLIMIT_AS: 8_000_000_000}, expect="any", check=lambda o: None if o.rc else
         ("wrong exit", "a damaged trace shown with exit 0")),
    Case("11.20", "same: heatmap", tokenscope("heatmap", rfm("tr_classes_huge")),
         setup=crafted_run("tr_classes_huge", trace_meta("num_classes", 10**9), status="complete"),
         limits={resource.RLIMIT_AS: 8_000_000_000}, expect="any", check=lambda o: None if o.rc else
         ("wrong exit", "a damaged trace rendered with exit 0")),
    Case("11.21", 'depth "x": heatmap', tokenscope("heatmap", rfm("tr_depth_str")),
         setup=crafted_run("tr_depth_str", trace_meta("depth", "x"), status="complete"), expect="any",
         check=lambda o: None if o.rc else ("wrong exit", "a damaged trace rendered with exit 0")),
    Case("11.22", "view on 11.17 names the damaged trace", tokenscope("view", rfm("tr_grid_huge")),
         setup=crafted_run("tr_grid_huge", trace_meta("grid", [100000, 100000]), status="complete"),
         check=has("cannot be read")),
    Case("11.23", "view on 11.21 names the damaged trace", tokenscope("view", rfm("tr_depth_str")),
         setup=crafted_run("tr_depth_str", trace_meta("depth", "x"), status="complete"),
         check=has("cannot be read")),
    Case("11.24", '"meta": [1]: view', tokenscope("view", rfm("tr_meta_list")),
         setup=crafted_run("tr_meta_list", lambda r: edit_json(image_folder(r) / "trace.json",
                                                               lambda d: d.__setitem__("meta", [1])), status="complete"),
         expect="any", check=lambda o: None if o.rc else ("wrong exit", "exit 0")),
    Case("11.25", '"meta": [1]: heatmap', tokenscope("heatmap", rfm("tr_meta_list")),
         setup=crafted_run("tr_meta_list", lambda r: edit_json(image_folder(r) / "trace.json",
                                                               lambda d: d.__setitem__("meta", [1])), status="complete")),
    Case("11.26", "table on a threshold sweep tokenscope wrote", lambda: execute(tokenscope("table",
                                                                                            str(only_child("swc"))), 60),
         expect="ok"),
    Case("11.27", "view on that sweep says the explorer does not read sweeps", lambda: execute(tokenscope(
        "view", str(only_child("swc"))), 60), check=has("sweep")),
]


# ---- 12 environment variables --------------------------------------------------------------------------

def env_case(cid: str, what: str, env: dict[str, str | None], argv: list[str] | None = None, expect: str = "ok",
             check=None, needs=None) -> Case:
    return Case(cid, what, argv or tokenscope("run", *sized("si/street_5000001.png"), "--out", "envt/o"), env=env,
                expect=expect, check=check, needs=needs)


def home_file() -> None:
    (W / "envt").mkdir(exist_ok=True)
    (W / "envt" / "homefile").write_text("a file, not a folder")


def read_only_home() -> str:
    why = is_root()
    if why:
        return why
    read_only_cwd()
    return ""


ENVIRONMENT = [
    env_case("12.1", "RANK=abc", {"RANK": "abc"}),
    env_case("12.2", "RANK=1", {"RANK": "1"}),
    env_case("12.3", "WORLD_SIZE=2 RANK=0 (data set)", {"WORLD_SIZE": "2", "RANK": "0"},
             tokenscope("run", "--dataset", "synthetic", "--seeds", "0:2", "--scene-size", "128", "--out", "envt/d"),
             expect="error"),
    env_case("12.4", "CUDA_VISIBLE_DEVICES= with --device cuda", {"CUDA_VISIBLE_DEVICES": ""},
             tokenscope("run", *sized("si/street_5000001.png"), "--device", "cuda", "--out", "envt/o"), expect="error"),
    env_case("12.5", "CUDA_VISIBLE_DEVICES=abc", {"CUDA_VISIBLE_DEVICES": "abc"}),
    env_case("12.6", "HOME unset", {"HOME": None}),
    env_case("12.7", "PYTHONIOENCODING=ascii", {"PYTHONIOENCODING": "ascii"}),
    env_case("12.8", "TMPDIR=/nonexistent/tmp", {"TMPDIR": "/nonexistent/tmp"}),
    Case("12.9", "TOKENSCOPE_HOME a file: data list", tokenscope("data", "list"), setup=home_file, expect="ok",
         env={"TOKENSCOPE_HOME": "envt/homefile"}),
    Case("12.10", "TOKENSCOPE_HOME a file: data fetch ade20k (offline) names TOKENSCOPE_HOME",
         tokenscope("data", "fetch", "ade20k"), setup=home_file, env={"TOKENSCOPE_HOME": "envt/homefile"},
         check=has("TOKENSCOPE_HOME")),
    Case("12.11", "TOKENSCOPE_HOME read-only: data fetch names TOKENSCOPE_HOME, not --out",
         tokenscope("data", "fetch", "ade20k", "--url", "http://127.0.0.1:1/x.zip"),
         env={"TOKENSCOPE_HOME": "rotmp/th", "TOKENSCOPE_OFFLINE": "0"}, needs=read_only_home,
         check=all_of(has("TOKENSCOPE_HOME"), lacks("--out"))),
    Case("12.12", "TOKENSCOPE_HOME read-only: models --fetch (offline)",
         tokenscope("models", "--fetch", "segmenter-vit-t-mask-ade20k"), env={"TOKENSCOPE_HOME": "rotmp/th"},
         needs=read_only_home),
]


# ---- 13 Python API misuse ------------------------------------------------------------------------------

API_CALLS = r'''
import json, sys, traceback
import numpy as np
import tokenscope as ts
m = ts.load_model("demo")
img = "si/street_5000001.png"
tr = ts.trace(m, img, size=64)
calls = {
  "compare(str) is one image": lambda: (lambda r: None if len(r.images) == 1 else "iterated the characters")(
      ts.compare(img, size=64, repeats=1, warmup=0, out="api_out")),
  "load_model exit_threshold='high'": lambda: ts.load_model("demo", exit_threshold="high"),
  "load_model budget='x'": lambda: ts.load_model("demo", budget="x"),
  "load_model method=7": lambda: ts.load_model("demo", method=7),
  "load_model device=0": lambda: ts.load_model("demo", device=0),
  "trace size='abc'": lambda: ts.trace(m, img, size="abc"),
  "trace_many batch_size='2'": lambda: ts.trace_many(m, [img], batch_size="2"),
  "run size='x'": lambda: ts.run([img], size="x"),
  "bench size='x'": lambda: ts.bench(size="x"),
  "load_trace(123)": lambda: ts.load_trace(123),
  "tr.save(123)": lambda: tr.save(123),
  "heatmap(123)": lambda: ts.heatmap(123),
  "view(42)": lambda: ts.view(42),
  "import_segmenter(5, 'x')": lambda: ts.import_segmenter(5, "x"),
  "check_data root=5": lambda: ts.check_data("folder", root=5),
  "read_operating_point(5)": lambda: ts.read_operating_point(5),
  "table(5)": lambda: ts.table(5),
  "train(5)": lambda: ts.train(5),
  "m.save(5)": lambda: m.save(5),
  "tabulate('x')": lambda: ts.tabulate("x"),
  "tabulate([1, 2])": lambda: ts.tabulate([1, 2]),
  "plot.merge(None)": lambda: ts.plot.merge(None),
  "plot.histogram('x')": lambda: ts.plot.histogram("x"),
  "plot.groups(tr, 'a')": lambda: ts.plot.groups(tr, "a"),
  "run(123)": lambda: ts.run(123),
  "compare methods=5": lambda: ts.compare([img], methods=5),
  "compare methods=['tome', 7]": lambda: ts.compare([img], methods=["tome", 7]),
  "evaluate seeds=5": lambda: ts.evaluate(m, seeds=5),
  "list_methods(1)": lambda: ts.list_methods(1),
  # the probe's other calls (held in its run): misuse with values of the right type
  "load_model('nope')": lambda: ts.load_model("nope"),
  "load_model weights missing": lambda: ts.load_model("demo", weights="missing.json"),
  "load_model method='nope'": lambda: ts.load_model("demo", method="nope"),
  "load_model method='tome:r=-1'": lambda: ts.load_model("demo", method="tome:r=-1"),
  "load_model device='tpu'": lambda: ts.load_model("demo", device="tpu"),
  "load_model exit_threshold=2": lambda: ts.load_model("demo", exit_threshold=2.0),
  "load_model merge_threshold='x'": lambda: ts.load_model("demo", merge_threshold="x"),
  "trace missing image": lambda: ts.trace(m, "missing.png"),
  "trace a text file": lambda: ts.trace(m, "api_text.txt"),
  "trace an array of the wrong shape": lambda: ts.trace(m, np.zeros((4, 4, 4, 4), np.uint8)),
  "trace an array holding NaN": lambda: ts.trace(m, np.full((64, 64, 3), np.nan)),
  "trace size=0": lambda: ts.trace(m, img, size=0),
  "trace size=10**6": lambda: ts.trace(m, img, size=10**6),
  "trace labels of another size": lambda: ts.trace(m, img, labels=np.zeros((3, 3), np.uint8)),
  "trace_many [] (returns)": lambda: None if ts.trace_many(m, []) == [] else "not an empty list",
  "trace_many batch_size=0": lambda: ts.trace_many(m, [img], batch_size=0),
  "predict window=-1": lambda: ts.predict(m, img, window=-1),
  "load_trace missing": lambda: ts.load_trace("missing_folder"),
  "heatmap missing": lambda: ts.heatmap("missing_folder"),
  "view missing": lambda: ts.view("missing_folder"),
  "report missing": lambda: ts.report("missing_folder"),
  "table missing": lambda: ts.table("missing_folder"),
  "read_operating_point missing": lambda: ts.read_operating_point("missing.json"),
  "compare []": lambda: ts.compare([]),
  "compare names a missing image in its result (returns)": lambda: None if ts.compare(
      ["missing.png"], out="api_out").images[0].error else "no error for the missing image",
  "run []": lambda: ts.run([], out="api_out"),
  "evaluate seeds='a:b'": lambda: ts.evaluate(m, seeds="a:b"),
  "bench batch=0": lambda: ts.bench(batch=0),
  "check_data('nope')": lambda: ts.check_data("nope"),
  "fetch_data('nope')": lambda: ts.fetch_data("nope"),
  "import_segmenter missing": lambda: ts.import_segmenter("missing.pth", "x"),
  "load_model merge_threshold=[0.5] (returns)": lambda: ts.load_model("demo", merge_threshold=[0.5]) and None,
  "tabulate([]) (returns)": lambda: ts.tabulate([]) and None,
  "plot.token_flow(tr) (returns)": lambda: ts.plot.token_flow(tr) and None,
  "tr.cover_at(-1)": lambda: tr.cover_at(-1),
  "tr.cover_at(1000)": lambda: tr.cover_at(1000),
}
returns_ok = {k for k in calls if k.endswith("(returns)") or k == "compare(str) is one image"}
results = {}
open("api_text.txt", "w").write("not an image")
for name, call in calls.items():
    try:
        value = call()
        if name in returns_ok:
            results[name] = ["held", ""] if value is None else ["failed", "unclear: " + str(value)]
        elif name.endswith("(returns)"):
            results[name] = ["held", ""] if value is None else ["failed", "unclear: " + str(value)]
        else:
            results[name] = ["failed", "unclear: returned without an error"]
    except ts.TokenscopeError as exc:
        one = "\n" not in str(exc).strip()
        results[name] = ["held" if one else "failed", "" if one else "unclear: the message is not one line"]
    except BaseException as exc:  # noqa: BLE001 - everything else is what the probe counts
        results[name] = ["failed", f"traceback: {type(exc).__name__}: {str(exc)[:120]}"]
print("API-RESULTS " + json.dumps(results))
'''


def api_results() -> list[Result]:
    outcome = execute([sys.executable, "-c", API_CALLS], 900)
    found = re.search(r"API-RESULTS (.*)", outcome.out)
    if not found:
        return [Result("13", 65, "failed", "traceback", outcome.out.strip().splitlines()[-1][:200])]
    results = []
    for i, (name, (verdict, why)) in enumerate(json.loads(found.group(1)).items(), start=1):
        severity, _, detail = why.partition(": ")
        results.append(Result(f"13.{i}", 1, verdict, severity if verdict == "failed" else "", f"{name} {detail}".strip()))
    return results


# ---- running it ----------------------------------------------------------------------------------------

SECTIONS: dict[str, tuple[str, list[Case]]] = {
    "1": ("view --serve server", SERVER), "2": ("code from run folders, op files, traces", CODE),
    "3": ("crafted checkpoints, safetensors headers", CHECKPOINTS), "4": ("foreign side files", FOREIGN),
    "5": ("archives, downloads, bombs", ARCHIVES), "6": ("HTML/LaTeX injection, exfiltration", INJECTION),
    "7": ("symlinked and odd output paths", PATHS), "8": ("signals, kill -9, concurrency, limits", SIGNALS),
    "9": ("odd images, file names, FIFOs, labels", IMAGES), "10": ("class maps, methods, plug-ins, train", PLUGINS),
    "11": ("crafted run-folder content", RUN_FOLDERS), "12": ("environment variables", ENVIRONMENT),
}


def selected(case_id: str, only: list[str]) -> bool:
    return not only or any(case_id == o or case_id.startswith(o.rstrip(".") + ".") for o in only)


def run_all(only: list[str], log: Callable[[Result], None]) -> list[Result]:
    results: list[Result] = []
    for number, (_, cases) in SECTIONS.items():
        for case in cases:
            if not selected(case.id, only):
                continue
            try:
                result = run_case(case)
            except Exception as exc:  # noqa: BLE001 - a broken case is reported, the others still run
                result = Result(case.id, case.rows, "not run", detail=f"the case itself failed: {exc!r}"[:200])
            results.append(result)
            log(result)
        if number == "1" and Server.proc and Server.proc.poll() is None:
            Server.proc.kill()
        if number == "5" and Downloads.server:
            Downloads.server.shutdown()
    if selected("13.1", only) or "13" in only:
        for result in api_results():
            results.append(result)
            log(result)
    return results


def summarise(results: list[Result]) -> str:
    lines = ["| section | cases | held | failed | not run |", "|---|---|---|---|---|"]
    names = {**{k: v[0] for k, v in SECTIONS.items()}, "13": "Python API misuse"}
    for number, name in names.items():
        mine = [r for r in results if r.case.split(".")[0] == number]
        if mine:
            count = {v: sum(r.rows for r in mine if r.verdict == v) for v in ("held", "failed", "not run")}
            lines.append(f"| {number} {name} | {sum(r.rows for r in mine)} | {count['held']} | {count['failed']} | "
                         f"{count['not run']} |")
    total = {v: sum(r.rows for r in results if r.verdict == v) for v in ("held", "failed", "not run")}
    lines.append(f"| **all** | **{sum(r.rows for r in results)}** | **{total['held']}** | **{total['failed']}** | "
                 f"**{total['not run']}** |")
    by_severity = ", ".join(f"{s} {sum(r.rows for r in results if r.severity == s)}" for s in SEVERITIES)
    lines += ["", f"failed by severity: {by_severity}"]
    failed = [r for r in results if r.verdict != "held"]
    if failed:
        lines += ["", "| case | verdict | severity | detail |", "|---|---|---|---|"]
        lines += [f"| {r.case} | {r.verdict} | {r.severity} | {r.detail.replace('|', '/')} |" for r in failed]
    return "\n".join(lines)


def main() -> int:
    global W
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--only", action="append", default=[], help="a section (7) or case (9.21); repeatable")
    parser.add_argument("--keep", type=Path, help="use (and keep) this scratch folder instead of a temporary one")
    parser.add_argument("--out", type=Path, help="also write the summary (markdown) here")
    args = parser.parse_args()
    W = (args.keep or Path(tempfile.mkdtemp(prefix="probe-"))).resolve()
    W.mkdir(parents=True, exist_ok=True)
    began = time.time()
    try:
        if not (W / "base").exists():
            build_fixtures()
        results = run_all(args.only, lambda r: print(f"{r.case:>6} {r.verdict:8} {r.severity:12} {r.detail[:110]}",
                                                     flush=True))
    finally:
        for mount in reversed(MOUNTS):
            subprocess.run(["umount", "-l", str(mount)], check=False)
        if not args.keep:
            shutil.rmtree(W, ignore_errors=True)
    text = summarise(results) + f"\n\n({time.time() - began:.0f} s, {os.cpu_count()} cores)\n"
    print("\n" + text)
    if args.out:
        args.out.write_text(text)
    return 1 if any(r.verdict == "failed" for r in results) else 0


if __name__ == "__main__":
    sys.exit(main())
