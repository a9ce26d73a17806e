"""``python -m vae_anomaly`` runs the ``vae-anomaly`` command."""

import sys

from vae_anomaly.cli import main

if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
