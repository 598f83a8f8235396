"""The `dbl-scale` commands (`main.py` builds the parser), one module per command, and the
rank-side entry points that the launchers start (`python -m dbl_scale.cli.train`, ...).
The library (`dbl_scale/*`) never imports from here."""
