"""Source models on the driver's machine: each registered version downloaded once, and used from
there while the registry is unreachable (a resumed sweep during an outage). The driver hands the
weights to the trials (driver.resolve_source); no other node asks the registry.
"""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
import tempfile
from pathlib import Path

from tlcore.config import cache_dir
from tlcore.tracking import registry, store

STAMP = "tlcore_registry_entry.json"  # in a cached weights folder: which registry entry it holds
log = logging.getLogger("tlcore")


def cached_model(uri: str, model_uri: str) -> tuple[registry.ModelRef, Path]:
    """The weights folder of a registered model version, downloaded once per machine.

    The registry is still asked which version `model_uri` is (a store rebuilt at the same
    address may hold other weights under the same version), but when it cannot be reached a
    pinned version already on this machine is used. `latest` and aliases are cached under the
    version they resolve to (no download left in a temp folder); concurrent callers (a driver and
    a notebook) share the folder safely.
    """
    m = registry.MODEL_URI.match(model_uri)
    pinned = m is not None and (m["version"] or "").isdigit()

    def folder_of(name: str, version: str) -> Path:
        key = hashlib.sha256(f"{uri}|models:/{name}/{version}".encode()).hexdigest()[:16]
        return cache_dir() / "models" / f"{name}-{key}"

    try:
        with store.short_retries():
            ref = registry.resolve_model(uri, model_uri)
    except registry.ModelNotFoundError as e:
        stamp = folder_of(m["name"], m["version"]) / STAMP if pinned else None
        if not (stamp and stamp.exists() and store.is_transient(e.__cause__ or e)):
            raise
        log.warning("MLflow at %s unreachable; using the cached weights of %s", uri, model_uri)
        return registry.ModelRef(**json.loads(stamp.read_text())), stamp.parent
    folder = folder_of(ref.name, ref.version)

    def installed() -> bool:  # this exact version, by this or another trial on the node
        try:
            return json.loads((folder / STAMP).read_text()) == ref.__dict__
        except (OSError, ValueError):
            return False

    if installed():
        return ref, folder
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".download-", dir=folder.parent))
    try:
        got = registry.download_model(uri, ref, tmp / "dl")
        (got / STAMP).write_text(json.dumps(ref.__dict__))
        if installed():  # another trial finished first: keep its folder, which it may be reading
            return ref, folder
        try:  # stale (another model under the same name/version): moved aside in one step
            folder.rename(tmp / "stale")
        except FileNotFoundError:
            pass
        try:
            got.rename(folder)  # atomic: trials on one node may fetch the same model at once
        except OSError:
            if not installed():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return ref, folder
