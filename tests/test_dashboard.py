"""docker/grafana-dashboard.json: loadable as is (a dashboard object whose datasource is a
variable, every panel placed on the grid without overlap), and it queries the metrics the models
expose: every qwen3vl_* name it uses is in backend/metrics.py's tables, with labels those
metrics carry, and every table's metric is on it."""

from __future__ import annotations

import json
import re
from pathlib import Path

from qwen3vl.backend import metrics as m

DASHBOARD = Path(__file__).resolve().parents[1] / "docker" / "grafana-dashboard.json"
SELECTOR = re.compile(r"\b(qwen3vl_[a-z0-9_]+)(\{[^}]*\})?")


def dashboard() -> dict:
    return json.loads(DASHBOARD.read_text())


def exprs() -> list[str]:
    return [t["expr"] for p in dashboard()["panels"] for t in p.get("targets", [])]


def test_it_is_a_dashboard_grafana_imports():
    d = dashboard()
    assert d["title"] and d["uid"] and isinstance(d["schemaVersion"], int)
    (var,) = d["templating"]["list"]
    assert var["type"] == "datasource" and var["query"] == "prometheus"
    ids = [p["id"] for p in d["panels"]]
    assert len(ids) == len(set(ids))
    cells = set()
    for p in d["panels"]:
        g = p["gridPos"]
        assert 0 <= g["x"] and g["x"] + g["w"] <= 24 and g["h"] > 0, p["title"]
        mine = {(x, y) for x in range(g["x"], g["x"] + g["w"]) for y in range(g["y"], g["y"] + g["h"])}
        assert not mine & cells, f"{p['title']} overlaps another panel"
        cells |= mine
        if p["type"] != "row":
            assert p["datasource"]["uid"] == "${datasource}" and p["targets"], p["title"]
            assert all(t["datasource"]["uid"] == "${datasource}" for t in p["targets"])


def test_every_query_names_exposed_metrics_with_their_labels():
    exposed = m.exposed_names()
    labels_of = {}
    for model, tables in m.TABLES.items():
        for kind, table in tables.items():
            for name, *_ in table.values():
                keys = {"model", "mode"} if model == "qwen3_encoder" else {"model"}
                suffixes = ("_bucket", "_sum", "_count") if kind == "histogram" else ("",)
                labels_of.update({name + s: keys | ({"le"} if s == "_bucket" else set()) | {"instance", "job"}
                                  for s in suffixes})
    for expr in exprs():
        assert expr.count("(") == expr.count(")"), expr
        found = SELECTOR.findall(expr)
        assert found, expr
        for name, selector in found:
            assert name in exposed, f"{name} is in no metric table: {expr}"
            used = set(re.findall(r"([a-z_]+)\s*=~?", selector or ""))
            assert used <= labels_of[name], (name, used)
        for grouped in re.findall(r"by \(([^)]*)\)", expr):
            assert {g.strip() for g in grouped.split(",")} <= {"le", "instance", "model", "mode", "job"}


def test_every_metric_of_the_tables_is_on_the_dashboard():
    used = {name for expr in exprs() for name, _ in SELECTOR.findall(expr)}
    families = {name + ("_bucket" if kind == "histogram" else "")
                for tables in m.TABLES.values() for kind, table in tables.items() for name, *_ in table.values()}
    assert families <= used, families - used
