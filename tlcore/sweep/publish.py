"""Publishing a trial's checkpoint as a registered source model, with its run configuration and a
model card beside the weights."""

from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path

from tlcore.config import DATASETS_2D, TrialConfig, write_run_config
from tlcore.data.layouts import num_classes
from tlcore.models.networks import spec_for_config
from tlcore.tracking import registry, store
from tlcore.tracking.trial_runs import SweepRuns


def model_card(cfg: TrialConfig, task: str) -> dict:
    """What a registered model is (tlcore_model.json beside its weights), derived from the run
    configuration it was trained with (run_config.json, also beside them)."""
    spec = spec_for_config(cfg)
    if cfg.dataset in DATASETS_2D:
        return {"architecture": f"{spec.name}+fastai_head", "num_classes": 2, "image_size": cfg.image_size, "task": task}
    return {"architecture": spec.name, "in_channels": len(cfg.modalities), "num_classes": num_classes(cfg),
            "head": cfg.head, "spacing": list(cfg.spacing), "modalities": list(cfg.modalities),
            "label_map": cfg.label_map, "task": task}


def publish_model(runs: SweepRuns, result, checkpoint, iteration: int, metrics: dict, registry_name: str,
                  task: str) -> registry.ModelRef:
    """Log a checkpoint's weights, run configuration and model card to its trial's run and
    register them as `registry_name`; `metrics` (its test scores) are logged at the checkpoint's
    `iteration`."""
    uri, parent = runs.uri, runs.parent_run_id
    run_id = runs.trial_run(result)
    per_subject = metrics.pop("per_subject", None)
    for rid in {run_id, parent}:
        store.log_metrics(uri, rid, metrics, step=iteration)
    if per_subject is not None:
        store.log_dict(uri, run_id, per_subject, "test_per_subject_dice.json")
    with checkpoint.as_directory() as d, tempfile.TemporaryDirectory() as out:
        shutil.copy(Path(d) / "model.safetensors", Path(out) / "model.safetensors")
        cfg = TrialConfig.from_dict(result.config)
        write_run_config(cfg, Path(out))
        (Path(out) / "tlcore_model.json").write_text(json.dumps(model_card(cfg, task), indent=1))
        store.log_artifacts(uri, run_id, out, "model")
    ref = registry.register_model(uri, registry_name, run_id, "model",
                                  tags={"source_run_id": run_id, "sweep_parent_run_id": parent,
                                        "checkpoint_iteration": iteration,
                                        **{k: round(v, 4) for k, v in metrics.items()}})
    store.set_tags(uri, parent, {"registered_model": ref.uri})
    print(f"[tlcore] registered {ref.uri} (run {run_id}, {metrics})")
    return ref
