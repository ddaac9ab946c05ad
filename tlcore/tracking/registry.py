"""The MLflow model registry: where source models live. A model URI (`models:/name/3`,
`models:/name/latest`, `models:/name@alias`) resolves to one pinned version and its weights."""

from __future__ import annotations

import re
import tempfile
from dataclasses import dataclass
from pathlib import Path

import mlflow
from mlflow.exceptions import MlflowException

from tlcore.tracking.store import client


@dataclass(frozen=True)
class ModelRef:
    name: str
    version: str
    source: str          # artifact URI of the weights folder
    run_id: str          # the run that produced the model (lineage)

    @property
    def uri(self) -> str:
        return f"models:/{self.name}/{self.version}"




class ModelNotFoundError(LookupError):
    pass


MODEL_URI = re.compile(r"^models:/(?P<name>[^/@]+)(?:/(?P<version>[^/]+)|@(?P<alias>[^/]+))$")


def register_model(uri: str, name: str, run_id: str, artifact_path: str = "model",
                   tags: dict | None = None) -> ModelRef:
    """Register the weights folder `artifact_path` of run `run_id` as a new version of `name`."""
    c = client(uri)
    try:
        c.create_registered_model(name)
    except MlflowException as e:
        if "already exists" not in str(e).lower() and "RESOURCE_ALREADY_EXISTS" not in str(e):
            raise
    source = f"{c.get_run(run_id).info.artifact_uri}/{artifact_path}"
    mv = c.create_model_version(name, source=source, run_id=run_id,
                                tags={k: str(v) for k, v in (tags or {}).items()})
    return ModelRef(name, str(mv.version), source, run_id)


def resolve_model(uri: str, model_uri: str) -> ModelRef:
    """`models:/name/3`, `models:/name/latest` or `models:/name@alias` -> a concrete version."""
    m = MODEL_URI.match(model_uri)
    if not m:
        raise ModelNotFoundError(f"{model_uri!r} is not a model URI (models:/<name>/<version|latest> "
                                 "or models:/<name>@<alias>)")
    c, name = client(uri), m["name"]
    try:
        if m["alias"]:
            mv = c.get_model_version_by_alias(name, m["alias"])
        elif m["version"] == "latest":
            versions = c.search_model_versions(f"name = '{name}'")
            if not versions:
                raise ModelNotFoundError(f"model {name!r} has no versions in the registry at {uri}")
            mv = max(versions, key=lambda v: int(v.version))
        else:
            mv = c.get_model_version(name, m["version"])
    except MlflowException as e:
        raise ModelNotFoundError(f"{model_uri} not found in the MLflow registry at {uri}: {e.message}") from e
    return ModelRef(name, str(mv.version), mv.source, mv.run_id or "")


def download_model(uri: str, ref: ModelRef, dst: str | Path | None = None) -> Path:
    """Download a registered model's weights folder; returns the local folder."""
    dst = Path(dst or tempfile.mkdtemp(prefix=f"tlcore-{ref.name}-{ref.version}-"))
    return Path(mlflow.artifacts.download_artifacts(artifact_uri=ref.source, dst_path=str(dst),
                                                   tracking_uri=uri))
