#!/usr/bin/env python3
"""BIDS-App entry point: ``run.py bids_dir output_dir {participant,group} [options]``.

The same as the ``msxplain`` console script; containers use it as their ENTRYPOINT.
"""
import sys
from pathlib import Path

if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from bids_app.cli.run import main

    sys.exit(main())
