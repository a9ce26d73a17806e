"""The one exception tree of vae-anomaly.

Every error says what is wrong and, where it can, what to do instead::

    VAEAnomalyError                  base of everything raised on purpose
     ├── ConfigError                 a setting is invalid (ValueError)
     │    └── FPRError               a target false-positive rate is out of range
     ├── InputError                  samples to score are malformed (ValueError)
     ├── NotCalibratedError          flags asked of a detector that has no threshold
     ├── ArtifactError               a model artifact cannot be used
     │    ├── ArtifactNotFoundError  the directory or one of its files is missing
     │    └── ArtifactIntegrityError a file is modified, truncated or unreadable
     └── DataError                   a data set is missing, corrupt or cannot be fetched

Serving maps this tree to HTTP status codes in one place; the command line prints the message on
one line and exits non-zero.
"""

from __future__ import annotations


class VAEAnomalyError(Exception):
    """Base class of every error vae-anomaly raises on purpose."""


class ConfigError(VAEAnomalyError, ValueError):
    """A setting (model, training, calibration) is invalid."""


class FPRError(ConfigError):
    """A target false-positive rate is outside what the calibration set supports."""


class InputError(VAEAnomalyError, ValueError):
    """Samples to score have the wrong shape, type or values."""


class NotCalibratedError(VAEAnomalyError):
    """Anomaly flags or p-values were asked of a detector without a calibrated threshold."""


class ArtifactError(VAEAnomalyError):
    """A model artifact cannot be used."""


class ArtifactNotFoundError(ArtifactError):
    """The artifact directory, or a file it must contain, does not exist."""


class ArtifactIntegrityError(ArtifactError):
    """A file of the artifact does not match its manifest, or cannot be parsed."""


class DataError(VAEAnomalyError):
    """A data set is missing, corrupt, or cannot be fetched."""
