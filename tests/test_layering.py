"""How the package's modules depend on each other: the client library stays torch-free, and
imports point down only (entry points -> tools -> serving libraries), read from the source."""

from __future__ import annotations

import subprocess
import sys


def test_the_client_library_does_not_import_torch():
    """A client machine needs tritonclient and numpy, not torch (nor transformers)."""
    code = ("import sys, qwen3vl.client, qwen3vl.client.cancel, qwen3vl.cli.client; "
            "print(sorted(m for m in ('torch', 'transformers') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"
