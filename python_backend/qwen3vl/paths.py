"""Where this package is imported from and, in an editable install, the checkout around it: the
defaults that name the checkout's files (the model repository, the demo checkpoint, `.work/`)
start here, so that no module counts its own depth below the checkout."""

from __future__ import annotations

from pathlib import Path

PACKAGE_ROOT = Path(__file__).resolve().parents[1]  # the directory `qwen3vl` is imported from
REPO_ROOT = PACKAGE_ROOT.parent                     # the checkout (python_backend/..), for an editable install
