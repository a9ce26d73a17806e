"""The bulk histogram update equals observing values one by one."""

from __future__ import annotations

import numpy as np
from prometheus_client import CollectorRegistry, Histogram, generate_latest

from serving.metrics import observe_many


def _histogram(registry: CollectorRegistry) -> Histogram:
    return Histogram("h", "test", buckets=(-5.0, 0.0, 1.5, 10.0), registry=registry)


def test_observe_many_equals_one_by_one() -> None:
    values = np.concatenate(
        [np.random.default_rng(0).normal(0, 5, 1000), [-5.0, 0.0, 1.5, 10.0, 1e9, -1e9]]
    )
    one, bulk = CollectorRegistry(), CollectorRegistry()
    h1, h2 = _histogram(one), _histogram(bulk)
    for v in values.tolist():
        h1.observe(v)
    observe_many(h2, values[:500])
    observe_many(h2, values[500:])
    observe_many(h2, np.array([]))
    text1, text2 = generate_latest(one).decode(), generate_latest(bulk).decode()

    def counts(text: str) -> list[str]:
        return [x for x in text.splitlines() if x.startswith(("h_bucket", "h_count"))]

    assert counts(text1) == counts(text2)
    assert 'h_bucket{le="+Inf"} 1006.0' in counts(text2)
    assert f'h_bucket{{le="0.0"}} {float((values <= 0).sum())}' in counts(text2)
    # (the exposition omits _sum when a bucket is negative; read the stored sums)
    assert abs(h1._sum.get() - h2._sum.get()) < 1e-6 * max(1.0, abs(h1._sum.get()))
