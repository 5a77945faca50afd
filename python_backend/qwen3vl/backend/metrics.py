"""Counters and gauges on Triton's metrics endpoint (`pb_utils.MetricFamily`), one table per model."""

from __future__ import annotations


class Counters:
    """`spec`: {key: (metric name, description)}; every counter carries `labels`. Each
    increment is an IPC to the server: zero increments are skipped."""

    kind = "COUNTER"

    def __init__(self, pb, spec: dict[str, tuple[str, str]], labels: dict[str, str]):
        kind = getattr(pb.MetricFamily, self.kind)
        # The family must outlive its metric: keep both.
        self.families = {k: pb.MetricFamily(name=name, description=description, kind=kind)
                         for k, (name, description) in spec.items()}
        self.metrics = {k: family.Metric(labels=labels) for k, family in self.families.items()}

    def add(self, key: str, value: float) -> None:
        if value:
            self.metrics[key].increment(value)


class Gauges(Counters):
    """Like Counters, set instead of incremented; a value equal to the last one set is skipped
    (each set is an IPC)."""

    kind = "GAUGE"

    def __init__(self, pb, spec: dict[str, tuple[str, str]], labels: dict[str, str]):
        super().__init__(pb, spec, labels)
        self.last: dict[str, float] = {}

    def set(self, values: dict[str, float]) -> None:
        for key, value in values.items():
            if self.last.get(key) != value:
                self.metrics[key].set(value)
                self.last[key] = value
