"""Measured kernel choices, kept per machine: the state behind resfused.set_tuning / resfused.tune.

With tuning on, the op layer times the kernels that can take a call and runs the fastest
(ops/selection.py, `select_measured`); this module holds the on/off switch and the choices, in
memory and in a JSON file per machine signature so that the next process starts tuned:

    $RESFUSED_CACHE_DIR/tuning-<signature hash>.json   (default: $XDG_CACHE_HOME/resfused, else
                                                        ~/.cache/resfused)

The signature is what a timing depends on: the CPU model and the ISA extensions the kernels use,
the thread count, ATen's CPU capability, and the torch and resfused versions. A file whose
signature differs (another machine or version), that is not valid JSON (truncated) or that has
another layout is never trusted: it is ignored with a one-line warning and rewritten with the
choices measured from then on. Writers merge with what is on disk under a lock file and then
replace the file atomically (a temporary file in the same directory, then os.replace), so
concurrent processes never leave a partial file. Deleting the file clears it (`clear()`, or
`python -m resfused.tuning --clear`).

Imports nothing of the op layer (runtime is the bottom layer).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import platform
import sys
import tempfile
import threading
import warnings

import torch

FORMAT = 1  # bumped when the file's layout changes; another value reads as foreign

# The CPU flags that decide which kernel paths exist and how fast they are (from /proc/cpuinfo).
_ISA_FLAGS = (
    "avx2", "fma", "avx512f", "avx512bw", "avx512vl", "avx512_vnni", "avx512_bf16", "avx512_fp16",
    "amx_tile", "amx_bf16", "amx_int8",
)  # fmt: skip

_enabled = os.environ.get("RESFUSED_TUNING", "").strip().lower() in ("1", "true", "yes", "on")
_cache_dir_override: str | None = None
_lock = threading.RLock()
_caches: dict[tuple[str, str], _Cache] = {}
_cpu: tuple[str, tuple[str, ...]] | None = None


def enabled() -> bool:
    """Whether calls choose their kernel by measuring (RESFUSED_TUNING=1, set_tuning(True))."""
    return _enabled


def set_enabled(on: bool) -> None:
    global _enabled
    if not isinstance(on, bool):
        raise TypeError(f"resfused.set_tuning: 'on' must be a bool, got {type(on).__name__}")
    _enabled = on


@contextlib.contextmanager
def enabled_as(on: bool):
    """Tuning on (or off) inside the block, as it was after."""
    previous = _enabled
    set_enabled(on)
    try:
        yield
    finally:
        set_enabled(previous)


def _read_cpu() -> tuple[str, tuple[str, ...]]:
    global _cpu
    if _cpu is None:
        model, flags = "", set()
        try:
            with open("/proc/cpuinfo") as f:
                for line in f:
                    key, _, value = line.partition(":")
                    key = key.strip()
                    if key == "model name" and not model:
                        model = value.strip()
                    elif key == "flags" and not flags:
                        flags = set(value.split())
                    if model and flags:
                        break
        except OSError:  # not Linux: the processor string is what there is
            pass
        _cpu = (model or platform.processor() or platform.machine(), tuple(f for f in _ISA_FLAGS if f in flags))
    return _cpu


def signature() -> dict:
    """What this process's timings depend on; a cache file holds the signature it was measured under."""
    model, isa = _read_cpu()
    resfused = sys.modules.get("resfused")
    return {
        "cpu": model,
        "isa": list(isa),
        "machine": platform.machine(),
        "aten_capability": torch.backends.cpu.get_cpu_capability(),
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "resfused": getattr(resfused, "__version__", "unknown"),
    }


def cache_dir() -> str:
    """Where the cache files live: set_cache_dir(), else $RESFUSED_CACHE_DIR, else
    $XDG_CACHE_HOME/resfused, else ~/.cache/resfused."""
    if _cache_dir_override is not None:
        return _cache_dir_override
    if os.environ.get("RESFUSED_CACHE_DIR"):
        return os.environ["RESFUSED_CACHE_DIR"]
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "resfused")


def set_cache_dir(path: str | os.PathLike | None) -> None:
    """Keep cache files in `path` from now on (None: back to the environment / default)."""
    global _cache_dir_override
    _cache_dir_override = None if path is None else os.fspath(path)


def _file_name(sig: dict) -> str:
    digest = hashlib.sha256(json.dumps(sig, sort_keys=True).encode()).hexdigest()[:16]
    return f"tuning-{digest}.json"


def cache_path() -> str:
    """The cache file of this machine signature (it may not exist yet)."""
    return os.path.join(cache_dir(), _file_name(signature()))


def _parse(text: str, sig: dict) -> tuple[dict | None, str | None]:
    """(entries, None) for a file this process may trust, else (None, why not)."""
    try:
        data = json.loads(text)
    except ValueError as e:
        return None, f"not valid JSON ({e.msg} at character {e.pos}; truncated?)"
    if not isinstance(data, dict) or data.get("format") != FORMAT or not isinstance(data.get("entries"), dict):
        return None, f"not a format-{FORMAT} resfused tuning cache"
    theirs = data.get("signature")
    if theirs != sig:
        if not isinstance(theirs, dict):
            return None, "it has no machine signature"
        differ = sorted(k for k in set(sig) | set(theirs) if sig.get(k) != theirs.get(k))
        return None, "measured on another machine or version (" + ", ".join(
            f"{k}: {theirs.get(k)!r}, here {sig.get(k)!r}" for k in differ
        ) + ")"  # fmt: skip
    for key, entry in data["entries"].items():
        if not (isinstance(entry, dict) and isinstance(entry.get("kernel"), str)):
            return None, f"entry {key!r} names no kernel"
        ms = entry.get("ms", {})
        if not (isinstance(ms, dict) and all(isinstance(v, (int, float)) for v in ms.values())):
            return None, f"entry {key!r} has malformed timings"
    return data["entries"], None


class _Cache:
    """The choices of one signature: the file's entries, then what this process measured."""

    def __init__(self, directory: str, sig: dict):
        self.sig = sig
        self.path = os.path.join(directory, _file_name(sig))
        self.entries: dict[str, dict] = {}
        self.warned: set[str] = set()
        self.write_failed = False
        self._load()

    def _warn(self, why: str, rebuilt: bool = True) -> None:
        if why not in self.warned:  # once per file and reason, one line each
            self.warned.add(why)
            then = "; it will be rebuilt" if rebuilt else ""
            warnings.warn(f"resfused: ignoring tuning cache {self.path}: {why}{then}", RuntimeWarning, stacklevel=4)

    def _read_disk(self) -> dict:
        try:
            with open(self.path, encoding="utf-8") as f:
                text = f.read()
        except FileNotFoundError:
            return {}
        except (OSError, UnicodeDecodeError) as e:
            self._warn(f"cannot read it ({e})")
            return {}
        entries, why = _parse(text, self.sig)
        if why is not None:
            self._warn(why)
            return {}
        return entries

    def _load(self) -> None:
        self.entries = dict(self._read_disk())

    def store(self, key: str, entry: dict) -> None:
        self.entries[key] = entry
        self._save()

    def _save(self) -> None:
        directory = os.path.dirname(self.path)
        try:
            os.makedirs(directory, exist_ok=True)
            with _file_lock(self.path + ".lock"):
                # Merge what other processes wrote since we read, ours winning for the same key.
                merged = {**self._read_disk(), **self.entries}
                data = {"format": FORMAT, "signature": self.sig, "entries": merged}
                fd, tmp = tempfile.mkstemp(prefix=".tuning-", suffix=".tmp", dir=directory)
                try:
                    with os.fdopen(fd, "w", encoding="utf-8") as f:
                        json.dump(data, f, indent=1, sort_keys=True)
                    os.replace(tmp, self.path)  # atomic: readers see the old file or the new one
                except BaseException:
                    with contextlib.suppress(OSError):
                        os.unlink(tmp)
                    raise
            self.entries = merged
        except OSError as e:
            if not self.write_failed:  # keep measuring in memory; say so once
                self.write_failed = True
                warnings.warn(
                    f"resfused: cannot write the tuning cache {self.path} ({e}); choices are kept in memory only",
                    RuntimeWarning,
                    stacklevel=4,
                )


@contextlib.contextmanager
def _file_lock(path: str):
    """An exclusive lock between processes (fcntl where there is one; elsewhere the atomic replace
    alone still keeps the file whole, but a concurrent writer's new entries may be lost)."""
    try:
        import fcntl
    except ImportError:
        yield
        return
    with open(path, "a") as f:
        fcntl.flock(f.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f.fileno(), fcntl.LOCK_UN)


def _current() -> _Cache:
    sig = signature()
    key = (cache_dir(), json.dumps(sig, sort_keys=True))
    cache = _caches.get(key)
    if cache is None:
        with _lock:
            cache = _caches.get(key)
            if cache is None:
                cache = _caches[key] = _Cache(key[0], sig)
    return cache


def lookup(key: str) -> dict | None:
    """The measured choice for `key` ({"kernel": name, "table": name, "ms": {name: ms}}), if any."""
    with _lock:
        return _current().entries.get(key)


def store(key: str, kernel: str, table: str, ms: dict[str, float]) -> None:
    """Remember (in memory and on disk) that `kernel` measured fastest for `key`."""
    entry = {"kernel": kernel, "table": table, "ms": {k: round(v, 4) for k, v in ms.items()}}
    with _lock:
        _current().store(key, entry)


def entries() -> dict[str, dict]:
    """Every choice known for this signature (the file's and this process's)."""
    with _lock:
        return dict(_current().entries)


def forget() -> None:
    """Drop what this process read or measured (the files stay): the next lookup reads the file again."""
    with _lock:
        _caches.clear()


def clear() -> list[str]:
    """Delete every tuning cache file in cache_dir() (any signature, with their lock files) and
    forget this process's choices; returns the cache files removed. Modules keep the kernels they
    already chose until their weights change (or resfused.refresh)."""
    removed = []
    with _lock:
        _caches.clear()
        directory = cache_dir()
        try:
            names = os.listdir(directory)
        except FileNotFoundError:
            return removed
        for name in names:
            if name.startswith("tuning-") and name.endswith((".json", ".json.lock")):
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(os.path.join(directory, name))
                    if name.endswith(".json"):  # the lock files go too, unreported
                        removed.append(os.path.join(directory, name))
    return removed
