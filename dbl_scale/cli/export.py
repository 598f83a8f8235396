"""`dbl-scale export --run-dir RUN --out DIR`: a finished run's target as a folder transformers
loads alone (`AutoModel.from_pretrained(DIR, trust_remote_code=True)`), with each tower alone
beside it (`export.export`). `--log` also logs it to the run's MLflow run in MLflow's model
format, and `--register NAME` registers that model (a new version of NAME)."""
from __future__ import annotations

import json
from pathlib import Path

from .checks import run_folder, sqlite_store


def cmd_export(args) -> int:
    run_dir = run_folder(args.run_dir, checkpoint_ok=True)  # a wrong run is one line before any rank starts
    from ..config import load_config
    from ..export import export, log_model  # heavy (torch, transformers)

    uri = run_id = None
    if args.log or args.register:  # where to log, known before anything is written
        if not (run_dir / "run.json").is_file():
            raise ValueError(f"{run_dir} has no run.json (the MLflow run it was tracked in): export without "
                             "--log / --register")
        run = json.loads((run_dir / "run.json").read_text())
        uri = args.tracking_uri or run.get("tracking_uri") or load_config(run_dir / "config.yaml").tracking.uri
        sqlite_store(uri)
        run_id = run["mlflow_run_id"]
    out = export(run_dir, args.out)
    print(f"exported {run_dir} to {out}: AutoModel.from_pretrained('{out}', trust_remote_code=True); "
          f"{out}/README.md shows how to embed images and captions; vision/ and text/ hold each tower alone")
    if uri:
        model_uri = log_model(out, uri, run_id, register=args.register)
        print(f"logged to MLflow run {run_id} as {model_uri}"
              + (f"; registered as models:/{args.register}" if args.register else ""))
    return 0


def publish(run_dir: Path, tracking_uri: str) -> None:
    """After a run (`tracking.log_model`): its target exported to <run>/model and logged to its
    MLflow run. A failure is reported and costs nothing else: the run's results are saved, and
    `dbl-scale export --run-dir RUN --out DIR --log` does it later."""
    import logging

    from ..export import export, log_model

    log = logging.getLogger("dbl_scale.export")
    try:
        run_id = json.loads((run_dir / "run.json").read_text())["mlflow_run_id"]
        folder = export(run_dir, run_dir / "model")
        log.info("model exported to %s and logged to MLflow as %s", folder, log_model(folder, tracking_uri, run_id))
    except Exception as exc:  # noqa: BLE001 - the run's results are already saved
        log.warning("the model was not exported or logged (%s); later: dbl-scale export --run-dir %s --out DIR --log",
                    exc, run_dir)


def add_parser(sub) -> None:
    p = sub.add_parser("export", help="a finished run's target for transformers (and MLflow's model format)",
                       description=__doc__,
                       epilog="examples:\n"
                              "  dbl-scale export --run-dir runs/demo-dbl-20261207-101500 --out exported/demo-dbl\n"
                              "  dbl-scale export --run-dir runs/coco-dbl --out exported/coco-dbl --register coco-dbl")
    p.add_argument("--run-dir", required=True, help="the run folder (runs/<name>)")
    p.add_argument("--out", required=True, help="folder to write the model to (replaced if it exists)")
    p.add_argument("--log", action="store_true", help="also log it to the run's MLflow run as an MLflow model")
    p.add_argument("--register", metavar="NAME", help="log it and register it in the model registry as NAME")
    p.add_argument("--tracking-uri", help="MLflow store to log to (default: the run's own)")
    p.set_defaults(func=cmd_export)
