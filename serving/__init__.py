"""vae-anomaly's serving side: the HTTP API (``app``, ``server``), the micro-batcher, Prometheus
metrics, streaming batch scoring of files and its Ray engine (``batch``)."""
