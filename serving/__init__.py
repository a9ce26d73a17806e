"""vae-anomaly's serving side: the HTTP API, batch scoring of files, Prometheus metrics.

Not built yet beyond this package; the command line's ``score`` subcommand scores .npy files with
``detector.Detector`` directly.
"""
