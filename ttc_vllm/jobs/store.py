"""Where a job's results live, and how they survive: OUT/results.jsonl, its lock, and the
directory OUT itself.

Resumption: each finished item is appended to OUT/results.jsonl as one line, flushed and
fsync'd before the next item is recorded, so a killed run loses only the items in flight.
A rerun with the same OUT reads the file (dropping a torn last line), skips every item
already there and runs the rest; a record made under other settings (policy, PRM, search
options, problem text) for the same key is an error, never silently mixed. One run at a
time writes to OUT (a lock file).

Where OUT is (`results_dir`): an absolute --out as given; a relative one against
$TTC_VLLM_JOB_STORAGE when that is set, else against the working directory -- except inside
a Ray job (`ray job submit`), whose working directory is Ray's temporary copy of
--working-dir: there a relative --out without TTC_VLLM_JOB_STORAGE is refused.
"""
from __future__ import annotations

import fcntl
import json
import os
import re
from pathlib import Path
from typing import Any

from ttc_vllm.jobs.errors import JobError
from ttc_vllm.jobs.plan import Item, Key, Plan

RESULTS_FILE = "results.jsonl"
LOCK_FILE = ".lock"


def record_key(record: dict[str, Any]) -> Key:
    return (record["strategy"], int(record["n"]), record["tier"], int(record["index"]))


class ResultStore:
    """OUT/results.jsonl: one JSON line per finished item (see module doc).

    Opening repairs a torn last line (a run killed mid-write) by cutting the file back to
    its last newline; a malformed line elsewhere is an error. `done` maps item keys to
    their records; a key recorded twice keeps its first record.
    """

    def __init__(self, directory: Path):
        self.directory = Path(directory)
        self.path = self.directory / RESULTS_FILE
        self.done: dict[Key, dict[str, Any]] = {}
        self.repaired_bytes = 0
        self.directory.mkdir(parents=True, exist_ok=True)
        self._load()

    def _load(self) -> None:
        if not self.path.exists():
            return
        data = self.path.read_bytes()
        end = data.rfind(b"\n") + 1
        if end < len(data):  # torn last line: it was never acknowledged, drop it
            self.repaired_bytes = len(data) - end
            with open(self.path, "r+b") as f:
                f.truncate(end)
                f.flush()
                os.fsync(f.fileno())
            data = data[:end]
        for lineno, line in enumerate(data.decode("utf-8").splitlines(), 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
                key = record_key(record)
            except (json.JSONDecodeError, KeyError, TypeError, ValueError):
                raise JobError(f"{self.path}:{lineno}: not a result record; the file is "
                               "corrupt (move it away to start over)") from None
            self.done.setdefault(key, record)

    def append(self, record: dict[str, Any]) -> None:
        """Write one record durably (one write of the whole line, then fsync)."""
        line = (json.dumps(record, sort_keys=True) + "\n").encode("utf-8")
        created = not self.path.exists()
        fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            view = memoryview(line)
            while view:
                view = view[os.write(fd, view):]
            os.fsync(fd)
        finally:
            os.close(fd)
        if created:
            _fsync_dir(self.directory)
        self.done.setdefault(record_key(record), record)

    def check(self, plan: Plan) -> None:
        """Raise JobError if a done item of the plan was made under other settings."""
        for item in plan.items():
            record = self.done.get(item.key)
            if record is None:
                continue
            want, have = plan.setup(item), record.get("setup", {})
            if have != want:
                fields = _differing(want, have)
                raise JobError(
                    f"{self.path} already holds {item.key} made with a different "
                    f"{', '.join(fields)}; use another --out or the settings of that run")

    def pending(self, plan: Plan) -> list[Item]:
        return [item for item in plan.items() if item.key not in self.done]


def _differing(want: dict, have: dict, prefix: str = "") -> list[str]:
    out = []
    for k in sorted(set(want) | set(have)):
        a, b = want.get(k), have.get(k)
        if isinstance(a, dict) and isinstance(b, dict):
            out += _differing(a, b, f"{prefix}{k}.")
        elif a != b:
            out.append(f"{prefix}{k} ({b!r} there, {a!r} now)")
    return out


def _fsync_dir(directory: Path) -> None:
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


class OutputLock:
    """An exclusive lock on OUT so that two runs never append to the same results file."""

    def __init__(self, directory: Path):
        self.path = Path(directory) / LOCK_FILE
        self._fd: int | None = None

    def __enter__(self) -> "OutputLock":
        self._fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(self._fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            os.close(self._fd)
            self._fd = None
            raise JobError(f"another evaluation is writing to {self.path.parent}") from None
        return self

    def __exit__(self, *exc) -> None:
        if self._fd is not None:
            fcntl.flock(self._fd, fcntl.LOCK_UN)
            os.close(self._fd)
            self._fd = None


# -- where OUT is ---------------------------------------------------------------------------

STORAGE_ENV = "TTC_VLLM_JOB_STORAGE"
# What `ray job submit` gives the entrypoint (ray/dashboard/modules/job/job_supervisor.py):
# {"runtime_env": ..., "metadata": {"job_submission_id": ...}}.
RAY_JOB_CONFIG_ENV = "RAY_JOB_CONFIG_JSON_ENV_VAR"


def ray_job_id(environ: dict[str, str] | None = None) -> str | None:
    """The submission id when this process is a Ray job's entrypoint, else None."""
    environ = os.environ if environ is None else environ
    text = environ.get(RAY_JOB_CONFIG_ENV)
    if text is None:
        return None
    try:
        return str(json.loads(text)["metadata"]["job_submission_id"])
    except (ValueError, KeyError, TypeError):
        return "(unknown id)"


def results_dir(out: str | Path, environ: dict[str, str] | None = None,
                cwd: Path | None = None) -> Path:
    """The absolute directory the results of `--out out` go to (see module doc)."""
    environ = os.environ if environ is None else environ
    text = str(out)
    if re.match(r"[A-Za-z][A-Za-z0-9+.-]+:/", text):  # s3://b/x, gs://..., file:///...
        raise JobError(f"--out {text}: results are written as local files; give a filesystem path "
                       "(mount the bucket or volume on the node that runs the job)")
    out = Path(out).expanduser()
    if out.is_absolute():
        return out
    root = environ.get(STORAGE_ENV, "").strip()
    if root:
        if not Path(root).expanduser().is_absolute():
            raise JobError(f"{STORAGE_ENV}={root!r}: must be an absolute path (relative --out "
                           "paths are resolved against it)")
        return Path(root).expanduser() / out
    job = ray_job_id(environ)
    cwd = Path.cwd() if cwd is None else Path(cwd)
    if job is not None:
        where = ("Ray's temporary copy of --working-dir, which Ray deletes once unused"
                 if "runtime_resources" in cwd.parts else "a directory Ray chose")
        raise JobError(
            f"--out {text} is relative, and this runs as Ray job {job} whose working directory "
            f"({cwd}) is {where}. Give an absolute path on the node that runs the job (a "
            f"mounted volume, e.g. --out /mnt/results/{text}), or set {STORAGE_ENV} to a "
            "directory that relative --out paths are resolved against (ray job submit "
            f"--runtime-env-json '{{\"env_vars\": {{\"{STORAGE_ENV}\": \"/mnt/results\"}}}}')")
    return cwd / out
