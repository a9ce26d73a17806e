"""vae-anomaly's training side: data, the training loop, calibration, evaluation, the report."""
