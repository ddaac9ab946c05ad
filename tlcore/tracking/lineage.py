"""The chain of models behind a model or a run: ImageNet -> MURA -> ChestX-ray, scratch -> IXI -> BraTS.

    python -m tlcore.tracking.lineage models:/mura_densenet121/1
    python -m tlcore.tracking.lineage models:/ixi_hippocampus@champion --mlflow-uri http://127.0.0.1:5000
    python -m tlcore.tracking.lineage runs:/<run id>

Every trial run records where its weights came from (param `source_model`: a pinned registry
version, `imagenet`, a weights file or `scratch`; tag `source_run_id`), and every registered
version records the run that produced it; this follows those links back to the start.
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass

from tlcore.config import MEANVAR, weights_of
from tlcore.tracking import registry, store
from tlcore.tracking.credentials import tracking_uri_flag

HEADLINE = ("test_dice", "test_accuracy", "test_auc", "best_val_dice", "val_dice", "val_accuracy")


@dataclass(frozen=True)
class Link:
    start: str              # models:/name/version, runs:/id, imagenet, scratch or a file
    run_id: str = ""
    experiment: str = ""
    run_name: str = ""
    metric: str = ""        # the run's headline result, e.g. "test_dice 0.712"

    def __str__(self) -> str:
        if not self.run_id:
            return {"imagenet": "imagenet (torchvision DenseNet121 IMAGENET1K_V1)",
                    "scratch": "scratch (random initialisation)"}.get(self.start, self.start)
        where = f"run {self.run_id[:8]} in {self.experiment}" + (f" '{self.run_name}'" if self.run_name else "")
        return f"{self.start}  ({where}{', ' + self.metric if self.metric else ''})"


def _run_link(uri: str, start: str, run_id: str) -> tuple[Link, str]:
    run = store.get_run(uri, run_id)
    metric = next((f"{k} {run.metrics[k]:.3f}" for k in HEADLINE if k in run.metrics), "")
    return Link(start, run_id, run.experiment, run.name, metric), run.params.get("source_model", "scratch")


def chain(uri: str, start: str, max_depth: int = 20) -> list[Link]:
    """Links from `start` (a model URI, runs:/<id>, or a start such as imagenet) back to the origin."""
    links, seen = [], set()
    while start and len(links) < max_depth:
        if start in seen:
            links.append(Link(f"{start} (cycle)"))
            break
        seen.add(start)
        if start.startswith(MEANVAR):  # random weights with the statistics of the start behind it
            link = Link(f"{start} (Mean-Var control: that model's weight statistics, none of its features)")
            start = weights_of(start)
        elif start.startswith("models:/"):
            ref = registry.resolve_model(uri, start)
            link, start = _run_link(uri, ref.uri, ref.run_id) if ref.run_id else (Link(ref.uri), "")
        elif start.startswith("runs:/"):
            link, start = _run_link(uri, start, start[len("runs:/"):].strip("/"))
        else:
            links.append(Link(start))
            break
        links.append(link)
    return links


def describe(links: list[Link]) -> str:
    return "\n".join(("  <- " if i else "") + str(link) for i, link in enumerate(links))


def chain_line(links: list[Link]) -> str:
    """One line, origin first: 'imagenet -> models:/mura_densenet121/1 -> runs:/...'."""
    return " -> ".join(link.start for link in reversed(links))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m tlcore.tracking.lineage", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("start", help="models:/<name>/<version|latest>, models:/<name>@<alias> or runs:/<run id>")
    p.add_argument("--mlflow-uri", default=None, type=tracking_uri_flag, help=f"default {store.default_tracking_uri()}")
    args = p.parse_args(argv)
    if not args.start.startswith(("models:/", "runs:/", MEANVAR)):  # chain() takes any other start as the origin
        print(f"[tlcore] error: {args.start!r} is neither models:/<name>/<version> nor runs:/<run id> "
              "(the run id is on the run's page in the MLflow UI)", file=sys.stderr)
        return 2
    try:
        links = chain(args.mlflow_uri or store.default_tracking_uri(), args.start)
    except LookupError as e:  # a model or run the store does not hold
        print(f"[tlcore] error: {e}", file=sys.stderr)
        return 2
    print(describe(links))
    return 0


if __name__ == "__main__":
    sys.exit(main())
