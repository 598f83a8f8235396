"""`dbl-scale export --run-dir RUN --out DIR`: a finished run's target as a folder transformers
loads alone (`AutoModel.from_pretrained(DIR, trust_remote_code=True)`), with each tower alone
beside it (`export.export`). `--log` also logs it to the run's MLflow run in MLflow's model
format, and `--register NAME` registers that model (a new version of NAME)."""
from __future__ import annotations

import json
from pathlib import Path

from ..config import load_config
from ..export import export, log_model


def cmd_export(args) -> int:
    out = export(args.run_dir, args.out)
    print(f"exported {args.run_dir} to {out}: AutoModel.from_pretrained('{out}', trust_remote_code=True); "
          "vision/ and text/ hold each tower alone")
    if args.log or args.register:
        run_dir = Path(args.run_dir)
        run = json.loads((run_dir / "run.json").read_text())
        uri = args.tracking_uri or run.get("tracking_uri") or load_config(run_dir / "config.yaml").tracking.uri
        model_uri = log_model(out, uri, run["mlflow_run_id"], register=args.register)
        print(f"logged to MLflow run {run['mlflow_run_id']} as {model_uri}"
              + (f"; registered as models:/{args.register}" if args.register else ""))
    return 0


def add_parser(sub) -> None:
    p = sub.add_parser("export", help="a finished run's target for transformers (and MLflow's model format)")
    p.add_argument("--run-dir", required=True, help="the run folder (runs/<name>)")
    p.add_argument("--out", required=True)
    p.add_argument("--log", action="store_true", help="also log it to the run's MLflow run as an MLflow model")
    p.add_argument("--register", metavar="NAME", help="log it and register it in the model registry as NAME")
    p.add_argument("--tracking-uri", help="default: the run's own")
    p.set_defaults(func=cmd_export)
