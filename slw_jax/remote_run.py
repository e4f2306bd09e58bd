"""Run directories on object storage (`--workdir=gs://BUCKET/PATH`, `s3://...`): a synced mirror.

orbax, TensorBoard and the logs write to local disk as for any run, in the URL's mirror
(`--mirror_dir`, default ~/.cache/slw_jax/runs/<url>); a background thread copies what changed
to the bucket every `checkpoint.upload_every_s` seconds, so the training loop never waits for
the bucket; the end of the run (its final save, a preemption's save) waits for the last copy.

In the bucket (S3 and GCS have no rename and no append; one PUT is atomic: a reader sees the
old object or the new one):
- each file of the run (metrics.jsonl, events.jsonl, summary.json, tb/, the rollback journal,
  eval/, orbax.log) is one object, replaced whole by one PUT when it changed;
- checkpoint k is one PUT per file under checkpoints/k/, then its commit record
  commits/k.json (each file's size and sha256), written last. A copy cut short (a kill
  mid-upload) has no record: it is never resumed, and the next run's start deletes it. A
  checkpoint orbax removed (checkpoint.keep) loses its record first, then its files (never
  the newest committed one before a newer one is committed);
- .slw_run.json: which mirror writes the run, written when a mirror takes it over (before
  anything else) and last in every sync that changed anything.

A run that starts again with the mirror .slw_run.json names (a SIGKILL, a preemption) first
copies what that mirror holds and the bucket lacks, so nothing on its disk is lost; with any
other (a new VM) the mirror is emptied and the bucket downloaded: every committed checkpoint,
each file checked against its sha256. A damaged one goes to unreadable_checkpoints/step_<k>
(in the bucket too, at the next sync) and the run resumes from the one before it. One process
writes a run: several processes (multi-host) need a shared file system (a mounted bucket).
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import re
import shutil
import tempfile
import threading
import time
import uuid

from slw_jax import buckets, errors, run_log

RECORD = ".slw_run.json"  # In the bucket: the mirror that synced last.
STATE = ".slw_mirror.json"  # In the mirror: its URL, id, sync count and the commits it knows.
PARTIAL = ".download-partial"  # A checkpoint being downloaded (renamed once verified).
CHECKPOINT_FILE = re.compile(r"^(?P<root>(?:.+/)?)checkpoints/(?P<step>\d+)/(?P<file>.+)$")
COMMIT = re.compile(r"^(?P<root>(?:.+/)?)commits/(?P<step>\d+)\.json$")
_NOT_COPIED = re.compile(r"(^|/)(\.slw_mirror\.json|\.slw_write_probe-\w+|\.lock)$|\.tmp$|"
                         r"(^|/)checkpoints/")  # Checkpoints are copied as wholes.
_READERS_SKIP = re.compile(r"(.+/)?(unreadable_checkpoints|tb|wandb)/")  # Not read by a reader.


def default_mirror_root() -> str:
  return os.path.join(os.path.expanduser("~"), ".cache", "slw_jax", "runs")


def _sha256(path: str) -> str:
  digest = hashlib.sha256()
  with open(path, "rb") as f:
    for block in iter(lambda: f.read(2**22), b""):
      digest.update(block)
  return digest.hexdigest()


def _files_under(directory: str) -> list[str]:
  """Every file under `directory`, relative to it, sorted."""
  found = []
  for parent, _, names in os.walk(directory):
    found += [os.path.relpath(os.path.join(parent, n), directory) for n in names]
  return sorted(found)


class SyncError(errors.StopTraining):
  """The bucket could not be written at the end of a run; the mirror holds everything."""


class RunDir:
  """A --workdir as a tool uses it: `local` is the directory it reads and writes. For a URL,
  `local` is the mirror and the methods below copy between it and the bucket; for a local
  directory they do nothing."""

  def __init__(self, workdir: str, mirror_root: str | None = None, writer: bool = True,
               log=print):
    self.url = workdir.rstrip("/") if errors.is_url(workdir) else None
    self.writer, self.log = writer, log
    self.local = workdir
    self._lock = threading.Lock()
    self._stop = threading.Event()
    self._thread, self._failure = None, None
    self._damaged = set()  # (root, step) of damaged checkpoints to move aside in the bucket.
    if self.url is None:
      return
    self.fs = buckets.filesystem(workdir, "--workdir")  # As given: "s3://" names no bucket.
    name = buckets.cache_name(self.url) + ("" if writer else ".read")
    self.local = os.path.join(os.path.expanduser(mirror_root or default_mirror_root()), name)
    self.state = {}

  # --- the bucket's side ---

  def _remote(self, rel: str) -> str:
    return f"{self.url}/{rel}"

  def _listing(self) -> set[str]:
    """The path (relative to the URL) of every object under it."""
    prefix = self.url.split("://", 1)[1].rstrip("/") + "/"
    return {path.split("://", 1)[-1].removeprefix(prefix) for path in self.fs.find(self.url)}

  def _read_json(self, rel: str):
    try:
      value = json.loads(self.fs.cat_file(self._remote(rel)))
    except (ValueError, UnicodeDecodeError):
      return None  # Damaged: treated as absent by the callers.
    return value if isinstance(value, dict) else None

  def _commits(self, listing: set[str]) -> dict[tuple[str, int], dict | None]:
    """{(root, step): the commit record (None when unreadable)} of every committed checkpoint."""
    found = {}
    for rel in listing:
      match = COMMIT.match(rel)
      if match:
        record = self._read_json(rel)
        files = (record or {}).get("files")
        ok = isinstance(files, dict) and all(
            isinstance(v, list) and len(v) == 2 and errors.is_int(v[0]) and isinstance(v[1], str)
            for v in files.values())
        found[(match["root"], int(match["step"]))] = record if ok else None
    return found

  # --- starting ---

  def open(self, checkpoints="all"):
    """Checks the bucket (one line when it cannot be reached or, for a writer, written) and
    fills the mirror: `checkpoints` "all", "newest", a step, or None (the logs only)."""
    if self.url is None:
      return self
    buckets.check_bucket(self.fs, self.url, "--workdir", writable=self.writer)
    try:
      self._open(checkpoints)
    except buckets.remote_errors() as error:
      if _is_local(error, self.local):
        raise errors.UsageError(f"--mirror_dir: {self.local}, the local mirror of "
                                f"--workdir={self.url!r}, cannot be written "
                                f"({error.strerror or errors.one_line(error)})") from None
      raise errors.UsageError(f"--workdir={self.url!r} cannot be read or written: "
                              f"{errors.one_line(error, 200)}") from None
    return self

  def _open(self, checkpoints):
    listing = self._listing()
    record = self._read_json(RECORD) if RECORD in listing else None
    if listing and not self.writer and record is None:
      raise errors.UsageError(f"--workdir={self.url!r} holds no run of slw_jax ({RECORD} "
                              "missing): pass the URL a run wrote")
    if not listing and not self.writer:
      raise errors.UsageError(f"--workdir={self.url!r} is empty: pass the URL a run wrote")
    if listing and record is None:
      raise errors.UsageError(f"--workdir={self.url!r} holds files but no run of slw_jax "
                              f"({RECORD} missing): use an empty prefix")
    try:
      os.makedirs(self.local, exist_ok=True)
    except OSError as error:
      raise errors.UsageError(f"--mirror_dir: {self.local} cannot be created for "
                              f"--workdir={self.url!r} ({error.strerror})") from None
    state = self._read_state()
    if self.writer and state and record and record.get("writer") == state["writer"]:
      self.state = state  # This mirror wrote last: it holds the newest of everything.
      self.log(f"copying what {self.local} holds and {self.url} lacks")
      self._sync()
      listing = self._listing()
    elif self.writer:
      shutil.rmtree(self.local)  # Another mirror wrote since: the bucket is newer.
      os.makedirs(self.local)
      self.state = {"url": self.url, "writer": uuid.uuid4().hex, "syncs": 0, "files": {},
                    "commits": {}}
      self._claim()  # Before anything else is written: see _claim.
    else:  # A reader's: the checkpoints it checked before are not fetched again.
      self.state = state or {"url": self.url, "files": {}, "commits": {}}
    self._download_files(listing)
    orphans = self._download_checkpoints(listing, checkpoints)
    if self.writer:  # Copies cut short: deleted before anything is written.
      for root, step in sorted(orphans):
        self._remove_remote_dir(f"{root}checkpoints/{step}")
    self._write_state()

  def _claim(self):
    """Names this mirror the run's writer in the bucket (its record), then on local disk: from
    then on a restart here trusts this mirror (nothing it holds is lost, even if no copy
    succeeded yet), and any other mirror of the URL is stale. A crash between the two leaves a
    mirror holding nothing new, which the next start here replaces."""
    record = {"writer": self.state["writer"], "syncs": self.state["syncs"], "time": time.time()}
    self.fs.pipe_file(self._remote(RECORD), json.dumps(record).encode())
    self._write_state()

  def _read_state(self) -> dict | None:
    try:
      with open(os.path.join(self.local, STATE)) as f:
        state = json.load(f)
    except (OSError, ValueError):
      return None
    keys = ("url", "files", "commits") + (("writer", "syncs") if self.writer else ())
    if not isinstance(state, dict) or any(k not in state for k in keys):
      return None
    return state if state["url"] == self.url else None

  def _write_state(self):
    run_log.write_json(os.path.join(self.local, STATE), self.state)

  def _download_files(self, listing: set[str]):
    """The run's files (not checkpoints) the mirror lacks (a reader: every one, they change)."""
    remote, local = [], []
    for rel in sorted(listing):
      if _NOT_COPIED.search(rel) or COMMIT.match(rel) or rel == RECORD or (
          not self.writer and _READERS_SKIP.match(rel)):
        continue
      path = os.path.join(self.local, rel)
      if self.writer and os.path.exists(path):
        continue
      os.makedirs(os.path.dirname(path), exist_ok=True)
      remote.append(self._remote(rel))
      local.append(path)
    if remote:
      self.fs.get(remote, local)
    for rel, path in zip((r.removeprefix(self.url + "/") for r in remote), local):
      self.state["files"][rel] = _stamp(path)

  def _download_checkpoints(self, listing: set[str], which):
    """Downloads the committed checkpoints `which` names ("all", "newest": the newest that is
    whole, a step, None); returns the (root, step) of the bucket's checkpoint files that have
    no commit record. A damaged one is set aside here and, by a writer, in the bucket at its
    next copy (`_damaged`)."""
    commits = self._commits(listing)
    orphans = {(m["root"], int(m["step"])) for m in map(CHECKPOINT_FILE.match, listing)
               if m} - set(commits)
    keys = sorted(commits, key=lambda k: k[1], reverse=True)
    if which is None:
      keys = []
    elif which not in ("all", "newest"):
      keys = [k for k in keys if k[1] == which]
    if not self.writer:  # Never read a checkpoint the bucket no longer commits.
      self._prune_checkpoints({f"{root}checkpoints/{step}" for root, step in commits})
    for root, step in keys:
      name = f"{root}checkpoints/{step}"
      problem = self._checkpoint_here(name, commits[(root, step)])
      if problem is None and which == "newest":
        break
      if problem is not None:
        self.state["commits"].pop(name, None)
        moved = self._set_aside(root, step, name)
        self.log(f"warning: checkpoint {step} in {self.url}/{root}checkpoints is damaged "
                 f"({problem}); moved to {moved}: the one before it is used")
        self._damaged.add((root, step))
    return orphans

  def _checkpoint_here(self, name: str, record: dict | None) -> str | None:
    """Makes the mirror hold committed checkpoint `name`; what is wrong with it, or None."""
    if record is not None and self.state["commits"].get(name) == record["files"] and \
        os.path.isdir(os.path.join(self.local, name)):
      return None  # Copied (and checked) before.
    problem = self._fetch_checkpoint(name, record)
    if problem is None:
      self.state["commits"][name] = record["files"]
    return problem

  def _prune_checkpoints(self, committed: set[str]):
    for name in self._local_checkpoints():
      if name not in committed:
        shutil.rmtree(os.path.join(self.local, name))
        self.state["commits"].pop(name, None)

  def _fetch_checkpoint(self, name: str, record: dict | None) -> str | None:
    """Downloads checkpoint `name` to its partial directory; what is wrong with it, or None."""
    partial = os.path.join(self.local, name + PARTIAL)
    shutil.rmtree(partial, ignore_errors=True)
    if record is None:
      return "its commit record is unreadable"
    files = record["files"]
    for rel in files:
      os.makedirs(os.path.dirname(os.path.join(partial, rel)), exist_ok=True)
    try:
      self.fs.get([self._remote(f"{name}/{rel}") for rel in files],
                  [os.path.join(partial, rel) for rel in files])
    except FileNotFoundError as error:
      return f"a file is missing: {errors.one_line(error, 100)}"
    for rel, (size, sha256) in files.items():
      path = os.path.join(partial, rel)
      if not os.path.isfile(path) or os.path.getsize(path) != size or _sha256(path) != sha256:
        return f"{rel} does not match its sha256 in commits/"
    target = os.path.join(self.local, name)
    shutil.rmtree(target, ignore_errors=True)
    os.replace(partial, target)
    return None

  def _set_aside(self, root: str, step: int, name: str) -> str:
    where = os.path.join(self.local, root, "unreadable_checkpoints", f"step_{step}")
    while os.path.exists(where):
      where += "_again"
    partial = os.path.join(self.local, name + PARTIAL)
    os.makedirs(partial, exist_ok=True)
    os.makedirs(os.path.dirname(where), exist_ok=True)
    os.replace(partial, where)
    shutil.rmtree(os.path.join(self.local, name), ignore_errors=True)
    return where

  # --- copying to the bucket ---

  def sync_in_background(self, every_s: float):
    """Copies what changed every `every_s` seconds until `close` (writers of a URL only)."""
    if self.url is None or not self.writer:
      return
    self._thread = threading.Thread(target=self._sync_loop, args=(every_s,),
                                    name="slw-bucket-sync", daemon=True)
    self._thread.start()

  def _sync_loop(self, every_s: float):
    while not self._stop.wait(every_s):
      try:
        self._sync()
      except Exception as error:  # pylint: disable=broad-except  # Tried again next time.
        if self._failure is None:
          self.log(f"warning: copying the run to {self.url} failed (tried again every "
                   f"{every_s:g} s; the mirror {self.local} keeps everything): "
                   f"{errors.one_line(error, 200)}")
        self._failure = error
      else:
        self._failure = None

  def close(self):
    """Stops the background copy and makes the last one (waits for it): the bucket then holds
    the whole run. Raises SyncError (one line) when the bucket cannot take it."""
    if self.url is None or not self.writer:
      return
    self._stop.set()
    if self._thread is not None:
      self._thread.join()
    try:
      self._sync()
    except buckets.remote_errors() as error:
      raise SyncError(f"could not copy the run to {self.url} ({errors.one_line(error, 200)}); "
                      f"{self.local} holds all of it: resume on this machine to copy it, or "
                      "copy it yourself") from error

  def upload(self, rel: str):
    """Copies one file of the mirror to the bucket (a reader's output, e.g. eval/val.json)."""
    if self.url is not None:
      try:
        self.fs.put_file(os.path.join(self.local, rel), self._remote(rel))
      except buckets.remote_errors() as error:
        raise errors.UsageError(f"could not write {self._remote(rel)} (kept in {self.local}): "
                                f"{errors.one_line(error, 200)}") from None

  def _sync(self):
    with self._lock:
      # The files first, then the checkpoints: a file removed after this listing (the spent
      # rollback journal) leaves the bucket only in the next copy, once the checkpoint that
      # made it spent (complete before it was removed) is committed.
      present = {rel for rel in _files_under(self.local) if not _NOT_COPIED.search(rel)}
      complete = self._local_checkpoints()
      changed = self._upload_files(present)
      for name in sorted(set(complete) - set(self.state["commits"]), key=_step_of):
        changed |= self._upload_checkpoint(name, complete[name])
      changed |= self._move_damaged() | self._delete_gone(present, complete)
      if changed:
        self.state["syncs"] += 1
        self._claim()

  def _move_damaged(self) -> bool:
    """Damaged checkpoints leave the bucket's checkpoints/ once their local copies (in
    unreadable_checkpoints/, just uploaded) are there: the record first, then the files."""
    for root, step in sorted(self._damaged):
      commit = self._remote(f"{root}commits/{step}.json")
      if self.fs.exists(commit):
        self.fs.rm_file(commit)
      self._remove_remote_dir(f"{root}checkpoints/{step}")
    moved, self._damaged = bool(self._damaged), set()
    return moved

  def _local_checkpoints(self) -> dict[str, str]:
    """{"<root>checkpoints/<step>": its directory} of every complete checkpoint in the mirror
    (orbax renames a save to its step only when it is complete)."""
    found = {}
    for parent, names, _ in os.walk(self.local):
      if os.path.basename(parent) == "checkpoints":
        rel = os.path.relpath(parent, self.local)
        found.update({f"{'' if rel == 'checkpoints' else rel[:-len('checkpoints')]}"
                      f"checkpoints/{n}": os.path.join(parent, n) for n in names if n.isdigit()})
        names[:] = []  # Not inside the checkpoints.
    return found

  def _upload_files(self, present: set[str]) -> bool:
    changed = False
    for rel in sorted(present):
      path = os.path.join(self.local, rel)
      try:
        stamp = _stamp(path)
        if self.state["files"].get(rel) == stamp:
          continue
        with open(path, "rb") as f:
          data = f.read()  # Whole, then one PUT: a file being appended is copied as it was.
      except FileNotFoundError:
        continue  # Removed since it was listed (the journal): deleted at the next sync.
      self.fs.pipe_file(self._remote(rel), data)
      self.state["files"][rel] = stamp
      changed = True
    return changed

  def _upload_checkpoint(self, name: str, directory: str) -> bool:
    try:
      files = {rel: [os.path.getsize(os.path.join(directory, rel)),
                     _sha256(os.path.join(directory, rel))] for rel in _files_under(directory)}
      self.fs.put([os.path.join(directory, rel) for rel in files],
                  [self._remote(f"{name}/{rel}") for rel in files])
    except FileNotFoundError:
      if os.path.isdir(directory):
        raise  # The bucket's (a missing bucket), not orbax's.
      self._remove_remote_dir(name)  # orbax removed it meanwhile (checkpoint.keep).
      return False
    root, step = name.rsplit("checkpoints/", 1)
    self.fs.pipe_file(self._remote(f"{root}commits/{step}.json"),
                      json.dumps({"step": int(step), "files": files}).encode())
    self.state["commits"][name] = files
    return True

  def _remove_remote_dir(self, name: str):
    if self.fs.exists(self._remote(name)):
      self.fs.rm(self._remote(name), recursive=True)

  def _delete_gone(self, present: set[str], complete: dict[str, str]) -> bool:
    """Removes from the bucket what the mirror no longer holds: files (the journal once spent)
    and checkpoints orbax removed or the resume set aside (the record first)."""
    gone = sorted(set(self.state["files"]) - present)
    for rel in gone:
      if self.fs.exists(self._remote(rel)):
        self.fs.rm_file(self._remote(rel))
      del self.state["files"][rel]
    newest = {}  # Per root: the newest committed checkpoint, kept even when gone here (its
    # successor may not be committed yet: the bucket never holds none).
    for name in self.state["commits"]:
      root = name.rsplit("checkpoints/", 1)[0]
      newest[root] = max(newest.get(root, name), name, key=_step_of)
    removed = sorted(set(self.state["commits"]) - set(complete) - set(newest.values()))
    for name in removed:
      root, step = name.rsplit("checkpoints/", 1)
      if self.fs.exists(self._remote(f"{root}commits/{step}.json")):
        self.fs.rm_file(self._remote(f"{root}commits/{step}.json"))
      self._remove_remote_dir(name)
      del self.state["commits"][name]
    return bool(gone or removed)


def _is_local(error: BaseException, local: str) -> bool:
  """Whether an OSError came from the local disk (the mirror) rather than the bucket."""
  return isinstance(error, OSError) and (
      str(getattr(error, "filename", "") or "").startswith(local)
      or error.errno in (errno.ENOSPC, errno.EDQUOT, errno.EROFS))


def _step_of(name: str) -> int:
  return int(name.rsplit("/", 1)[1])


def _stamp(path: str) -> list[int]:
  """What tells a file changed: its size and modification time."""
  stat = os.stat(path)
  return [stat.st_size, stat.st_mtime_ns]


def open_run(workdir: str, mirror_root: str | None = None, log=print) -> RunDir:
  """The run directory of a run that writes `workdir` (main, tune, convert's import): for a
  URL, its mirror filled from the bucket. Bad URLs and buckets are one line, before any work."""
  if errors.is_url(workdir):
    import jax  # pylint: disable=g-import-not-at-top
    if jax.process_count() > 1:
      raise errors.UsageError(f"--workdir={workdir!r}: a run on object storage takes one "
                              f"process ({jax.process_count()} here); with several, give them "
                              "a shared file system (a mounted bucket: gcsfuse, mountpoint-s3)")
  return RunDir(workdir, mirror_root, writer=True, log=log).open("all")


def open_for_reading(workdir: str, mirror_root: str | None = None, checkpoints="newest",
                     log=print) -> RunDir:
  """The run directory of a tool that reads `workdir` (evaluate, convert's export, report):
  for a URL, a read mirror with the logs and `checkpoints` ("newest", a step, None)."""
  return RunDir(workdir, mirror_root, writer=False, log=log).open(checkpoints)


class Output:
  """A directory a tool writes whole (`report --out`): for a URL, a temporary local directory
  whose files `upload` copies to the bucket (one PUT each), then removes."""

  def __init__(self, path: str, name: str = "--out"):
    self.url, self.local = None, path
    if errors.is_url(path):
      self.url = path.rstrip("/")
      self.fs = buckets.filesystem(self.url, name)
      buckets.check_bucket(self.fs, self.url, name, writable=True)
      self.local = tempfile.mkdtemp(prefix="slw_output_")

  def upload(self):
    if self.url is None:
      return
    files = _files_under(self.local)
    try:
      self.fs.put([os.path.join(self.local, rel) for rel in files],
                  [f"{self.url}/{rel}" for rel in files])
    except buckets.remote_errors() as error:
      raise errors.UsageError(f"could not write {self.url} (kept in {self.local}): "
                              f"{errors.one_line(error, 200)}") from None
    shutil.rmtree(self.local)
