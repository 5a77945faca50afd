"""Counters on Triton's metrics endpoint (`pb_utils.MetricFamily`), one table per model."""

from __future__ import annotations


class Counters:
    """`spec`: {key: (metric name, description)}; every counter carries `labels`. Each
    increment is an IPC to the server: zero increments are skipped."""

    def __init__(self, pb, spec: dict[str, tuple[str, str]], labels: dict[str, str]):
        # The family must outlive its metric: keep both.
        self.families = {k: pb.MetricFamily(name=name, description=description, kind=pb.MetricFamily.COUNTER)
                         for k, (name, description) in spec.items()}
        self.counters = {k: family.Metric(labels=labels) for k, family in self.families.items()}

    def add(self, key: str, value: float) -> None:
        if value:
            self.counters[key].increment(value)
