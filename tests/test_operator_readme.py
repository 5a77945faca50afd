"""The operator's documents stay true: their tables are the generated ones (qwen3vl-serve's own
flags in docs/serving.md, the metrics in docs/operating.md), every file and test the documents
name exists, every link between them leads to a file and a heading that exist, and the numbers
for the 30B-A3B are the arithmetic of that model's config."""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path

from qwen3vl.backend.metrics import metrics_table
from qwen3vl.cli.serve import build_parser, flags_table
from qwen3vl.settings import ServingConfig

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()
DOCS = ROOT / "docs"


def doc(name: str) -> str:
    return (DOCS / name).read_text()


def anchor(heading: str) -> str:
    """GitHub's anchor for a markdown heading: lower case, punctuation dropped, spaces to '-'."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def test_the_flags_table_is_the_generated_one_and_with_the_settings_covers_every_flag():
    assert flags_table() in doc("serving.md"), \
        "docs/serving.md's flags table is stale: paste qwen3vl.cli.serve.flags_table() into it"
    in_tables = set(re.findall(r"`(--[a-z0-9-]+)`", flags_table()))
    in_tables |= {f.metadata["flag"] for f in dataclasses.fields(ServingConfig) if f.metadata["flag"]}
    every = {o for a in build_parser()._actions for o in a.option_strings if o.startswith("--") and o != "--help"
             and not o.startswith("--no-")}  # a switch's --no- form goes with it
    assert every <= in_tables, every - in_tables


def test_the_metrics_table_is_the_generated_one():
    assert metrics_table() in doc("operating.md"), \
        "docs/operating.md's metrics table is stale: paste qwen3vl.backend.metrics.metrics_table()"


def test_the_files_and_tests_the_documents_name_exist():
    ops = README + "".join(p.read_text() for p in DOCS.glob("*.md"))
    for path in set(re.findall(r"`((?:docker|tests|python_backend)/[\w./-]+)`", ops)):
        assert (ROOT / path).exists(), path
    tests = "".join(p.read_text() for p in (ROOT / "tests").glob("test_*.py"))
    for name in set(re.findall(r"`(test_[a-z0-9_]+)`", ops)):
        assert f"def {name}(" in tests, name


def test_what_the_opening_claims_is_what_sizing_says():
    """The 235B runs split across GPUs: the opening, the sizing section and the tensor-parallel
    document say so alike (its per-GPU numbers: tests/test_tensor_parallel.py)."""
    opening = README[:README.index("\n## ")]
    assert "runs split across GPUs" in opening and "docs/tensor-parallel.md" in opening
    assert "--tensor-parallel-size" in doc("operating.md")
    assert "| Qwen3-VL-235B-A22B | TP8 bf16, with EP | 54.9 GiB |" in doc("tensor-parallel.md")


def test_the_30b_numbers_are_its_configs_arithmetic():
    layers, kv_heads, head_dim, hidden, deepstack, bf16 = 48, 4, 128, 2048, 3, 2
    assert 2 * layers * kv_heads * head_dim * bf16 == 96 * 1024
    assert (1 + deepstack) * hidden * bf16 == 16 * 1024
    ops = doc("operating.md")
    assert "| 96 KiB (a 4,096-token sequence: 384 MiB) |" in ops
    assert "16 KiB (a 1024x1024 image, 1,024 visual tokens: 16 MiB)" in ops
    assert "16 KiB for the\n30B-A3B in bf16" in doc("reliability.md")


def test_every_link_between_the_documents_leads_somewhere():
    """The README is short and links to docs/: a moved or renamed section must not leave a dead
    link (relative links to files of the repository and to their headings)."""
    for page in [ROOT / "README.md", *DOCS.glob("*.md")]:
        text = re.sub(r"```.*?```", "", page.read_text(), flags=re.S)
        for target in re.findall(r"\]\(([^)\s]+)\)", text):
            if re.match(r"[a-z]+:", target):
                continue
            path, _, fragment = target.partition("#")
            dest = (page.parent / path).resolve() if path else page
            assert dest.exists(), f"{page.name}: {target}"
            if fragment:
                bare = re.sub(r"```.*?```", "", dest.read_text(), flags=re.S)
                headings = {anchor(h) for h in re.findall(r"^#+ (.+)$", bare, flags=re.M)}
                assert fragment in headings, f"{page.name}: {target}"
    listed = set(re.findall(r"\]\(docs/([\w.-]+\.md)\)", README))
    assert listed == {p.name for p in DOCS.glob("*.md")}, "every document under docs/ is linked from the README"
