"""`dbl-scale export --run-dir RUN --out DIR`: a finished run's target towers as Hugging Face
folders (`export.export`)."""
from __future__ import annotations

from ..export import export


def cmd_export(args) -> int:
    out = export(args.run_dir, args.out)
    print(f"exported {args.run_dir} to {out} (vision/, text/ with tokenizer, heads.pt)")
    return 0


def add_parser(sub) -> None:
    p = sub.add_parser("export", help="a finished run's target towers as Hugging Face folders")
    p.add_argument("--run-dir", required=True, help="the run folder (runs/<name>)")
    p.add_argument("--out", required=True)
    p.set_defaults(func=cmd_export)
