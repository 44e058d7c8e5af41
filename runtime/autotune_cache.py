"""The autotune cache on disk: one JSON file per tuned kernel key, so a second process (or
another machine, through export/import) starts with the configurations already chosen.

Layout: ``<root>/autotune/<device tag>/<kernel>-<hash>.json``. The device tag names the GPU,
its compute capability and the torch and triton versions; the hash covers the kernel, the
source of the kernel templates and the tuning key. An entry carries all of these again, so a
file that is corrupt, or sits where it does not belong, is recognised, ignored with a warning
and tuned anew; it never crashes a launch. Writes go to a temporary file in the same folder
and are renamed into place, so readers never see half an entry.

root: ``cache_dir`` argument, else ``QCOMPILE_CACHE_DIR``, else ``$XDG_CACHE_HOME/qcompile``
(``~/.cache/qcompile``).
"""
import hashlib
import io
import json
import os
import re
import tarfile
import tempfile
import time
import warnings
from pathlib import Path

import torch
import triton

FORMAT = 1
_NAME = re.compile(r"^autotune/[A-Za-z0-9][A-Za-z0-9._+-]*/[A-Za-z0-9_-]+\.json$")
MAX_ENTRY_BYTES = 1 << 20


def default_root() -> Path:
    env = os.environ.get("QCOMPILE_CACHE_DIR")
    if env:
        return Path(env)
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "qcompile"


def device_tag(device: torch.device) -> str:
    """What a tuned configuration depends on besides the kernel and its key."""
    if device.type == "cuda":
        major, minor = torch.cuda.get_device_capability(device)
        name = f"{torch.cuda.get_device_name(device)}-sm{major}{minor}"
    else:
        name = f"{device.type}-interpreter"
    return re.sub(r"[^A-Za-z0-9._+-]", "_", f"{name}-torch{torch.__version__}-triton{triton.__version__}")


def _entry_name(kernel: str, source: str, key: list) -> str:
    digest = hashlib.sha256(json.dumps([kernel, source, key]).encode()).hexdigest()[:32]
    return f"{kernel}-{digest}.json"


def _check(entry, tag: str, name: str) -> str | None:
    """Why ``entry`` (parsed JSON found under ``tag/name``) is not a valid entry, or None."""
    if not isinstance(entry, dict) or entry.get("format") != FORMAT:
        return f"not a format-{FORMAT} entry"
    fields = ("device", "kernel", "source", "key", "config")
    if any(f not in entry for f in fields) or not isinstance(entry["key"], list):
        return f"missing one of the fields {fields}"
    if entry["device"] != tag:
        return f"made for {entry['device']}"
    if _entry_name(entry["kernel"], entry["source"], entry["key"]) != name:
        return "its contents do not match its file name"
    cfg = entry["config"]
    if not (isinstance(cfg, dict) and isinstance(cfg.get("kernel"), str) and isinstance(cfg.get("kwargs"), dict)
            and isinstance(cfg.get("num_warps"), int) and isinstance(cfg.get("num_stages"), int)):
        return "malformed config"
    return None


def _write_atomic(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    # not *.json: ls, clear and export (and readers elsewhere) must never take a half-written file
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".tmp-", suffix=".part")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise


class AutotuneCache:
    def __init__(self, root: str | os.PathLike | None = None):
        self.root = Path(root) if root is not None else default_root()

    @property
    def folder(self) -> Path:
        return self.root / "autotune"

    def _path(self, tag: str, kernel: str, source: str, key: list) -> Path:
        return self.folder / tag / _entry_name(kernel, source, key)

    def load(self, device, kernel: str, source: str, key: tuple, candidates: list):
        """The cached choice among ``candidates`` (objects with ``to_json()``), or None
        (missing, invalid or stale: warned). ``kernel`` names the op the choice is for."""
        tag, key = device_tag(device), json.loads(json.dumps(list(key)))
        path = self._path(tag, kernel, source, key)
        try:
            entry = json.loads(path.read_bytes())
        except FileNotFoundError:
            return None
        except (OSError, ValueError) as e:
            warnings.warn(f"qcompile: ignoring unreadable autotune cache entry {path} ({e}); tuning again")
            return None
        why = _check(entry, tag, path.name)
        if why is None and entry["key"] != key:
            why = "made for another key"
        if why is None:
            for cfg in candidates:
                if cfg.to_json() == entry["config"]:
                    return cfg
            why = "its config is not among this shape's candidates"
        warnings.warn(f"qcompile: ignoring autotune cache entry {path} ({why}); tuning again")
        return None

    def store(self, device, kernel: str, source: str, key: tuple, cfg, timings: dict) -> Path:
        tag, key = device_tag(device), json.loads(json.dumps(list(key)))
        entry = {"format": FORMAT, "device": tag, "kernel": kernel, "source": source, "key": key,
                 "config": cfg.to_json(), "timings_us": timings,
                 "created": time.strftime("%Y-%m-%dT%H:%M:%S")}
        path = self._path(tag, kernel, source, key)
        _write_atomic(path, json.dumps(entry, indent=1).encode())
        return path

    def entries(self) -> list[dict]:
        """Every file under the cache, parsed; invalid ones carry ``error`` instead."""
        out = []
        for path in sorted(self.folder.glob("*/*.json")):
            try:
                entry = json.loads(path.read_bytes())
                why = _check(entry, path.parent.name, path.name)
            except (OSError, ValueError) as e:
                entry, why = {}, str(e)
            out.append({**(entry if why is None else {}), "path": str(path), **({"error": why} if why else {})})
        return out

    def clear(self) -> int:
        paths = list(self.folder.glob("*/*.json"))
        for p in paths:
            p.unlink()
        return len(paths)

    def export(self, dest: str | os.PathLike) -> int:
        """Write the valid entries to a .tar.gz; returns how many."""
        good = [e for e in self.entries() if "error" not in e]
        with tarfile.open(dest, "w:gz") as tar:
            for e in good:
                tar.add(e["path"], arcname=str(Path(e["path"]).relative_to(self.root)))
        return len(good)

    def import_(self, src: str | os.PathLike) -> tuple[int, int]:
        """Add the entries of an exported .tar.gz; (added, skipped). A member that is not a
        valid entry (odd name, not a file, too big, corrupt, contents that do not match its
        name) is skipped with a warning; nothing outside the cache folder is written."""
        added = skipped = 0
        with tarfile.open(src, "r:gz") as tar:
            for member in tar.getmembers():
                why = None
                if not member.isfile() or not _NAME.match(member.name):
                    why = "not an autotune entry path"
                elif member.size > MAX_ENTRY_BYTES:
                    why = "too large"
                else:
                    tag, name = member.name.split("/")[1:]
                    data = tar.extractfile(member).read()
                    try:
                        why = _check(json.load(io.BytesIO(data)), tag, name)
                    except ValueError as e:
                        why = f"not JSON ({e})"
                if why:
                    if not member.isdir():
                        warnings.warn(f"qcompile: skipping {member.name} from {src}: {why}")
                        skipped += 1
                    continue
                _write_atomic(self.folder / tag / name, data)
                added += 1
        return added, skipped
