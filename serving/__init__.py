"""vae-anomaly's serving side: the HTTP API (``app``, ``server``), the micro-batcher, Prometheus
metrics, streaming batch scoring of files (``batch``) and its Ray engine (``batch_ray``)."""
