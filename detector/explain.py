"""Which columns made a table row anomalous: each column's share of the likelihood term.

For a table model (``detector.schema``), a row's reconstruction term is a sum over its columns:
a numeric cell's Gaussian term, a categorical cell's surprise -log p(category | z). A column's
*contribution* is its term above the best case (``VAE.surprise_features``): 0.5 * z^2 for a
numeric cell whose standardised residual is z sigmas, the surprise for a category, 0 for a
missing cell; in nats, comparable across columns whatever their units. The top columns of a
flagged row are where to look first. (Cf. the per-feature reconstruction errors of
autoencoder-based explanations, e.g. Antwarg et al., "Explaining anomalies detected by
autoencoders using SHAP", 2021: the error's share per feature, here in nats.)
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import numpy.typing as npt
import torch

from detector.errors import ConfigError

if TYPE_CHECKING:
    from detector.detector import Detector

DEFAULT_TOP = 3


@dataclass(frozen=True)
class Explanation:
    """Per row and column: the column's contribution in nats; the columns, by name."""

    columns: list[str]
    contributions: npt.NDArray[np.float64]  # (N, n_columns)

    def top(self, k: int = DEFAULT_TOP) -> list[list[str]]:
        """The ``k`` columns with the largest contributions, per row, largest first (columns
        contributing nothing are left out)."""
        order = np.argsort(-self.contributions, axis=1, kind="stable")[:, :k]
        return [
            [self.columns[j] for j in row if self.contributions[i, j] > 0]
            for i, row in enumerate(order.tolist())
        ]

    def records(self) -> list[dict[str, float]]:
        return [dict(zip(self.columns, row, strict=True)) for row in self.contributions.tolist()]


@torch.inference_mode()
def explain_rows(detector: Detector, x: npt.NDArray[np.float32]) -> Explanation:
    """The column contributions of rows already validated for ``detector`` (a table model)."""
    schema = detector.input_spec.schema
    if schema is None:
        raise ConfigError("column explanations need a model trained on a table")
    model = detector.model
    out: list[Any] = []
    for start in range(0, x.shape[0], detector.batch_size):
        xb = torch.from_numpy(x[start : start + detector.batch_size]).to(detector.device)
        xb = xb.reshape(xb.shape[0], -1)
        mu, _ = model.encode(xb)
        out.append(model.surprise_features(xb, model.decode(mu)).double().cpu().numpy())
    per_feature = np.concatenate(out) if out else np.zeros((0, schema.n_encoded))
    return Explanation(schema.names, schema.column_contributions(per_feature))
