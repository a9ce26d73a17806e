"""The ``Detector`` facade: ``Detector.load(path).score(x)``.

Score direction, stated once and repeated in every Returns section: **higher score = more
anomalous**. ``is_anomaly`` is ``score > threshold``; ``p_value`` is small for anomalies.
"""

from __future__ import annotations

import importlib.util
import os
import warnings
from collections.abc import Callable
from typing import Any

import numpy as np
import numpy.typing as npt
import torch

from detector import artifact as _artifact
from detector.complexity import complexity_nats
from detector.errors import (
    ArtifactIntegrityError,
    ConfigError,
    InputError,
    NotCalibratedError,
)
from detector.model import VAE
from detector.neighbours import DEFAULT_K, Search, reference_widths
from detector.result import DetectionResult
from detector.score import ScoreConfig, ScoreParts, score_batch
from detector.spec import InputSpec, validate_samples
from detector.threshold import Calibration
from detector.transforms import TransformHead

DEFAULT_BATCH_SIZE = 512
# What runs the network: torch (its forward pass traced into TorchScript), or onnxruntime (the
# same graph exported to ONNX and run by ONNX Runtime on the CPU; detector.export): the same
# parts to float32 precision. auto: onnxruntime on the CPU, where it is faster (single rows
# 1.2-1.5x, batches 1.1x; README "Serving"), torch on a GPU.
RUNTIMES: tuple[str, ...] = ("auto", "torch", "onnxruntime")  # serving.settings.RUNTIMES too


class ELBOGraph(torch.nn.Module):
    """The ELBO score's ops as one module: x -> (-ELBO, reconstruction, kl, E[z|x]); traced for
    the torch runtime, exported for ONNX (``detector.export``)."""

    def __init__(self, model: VAE) -> None:
        super().__init__()
        self.model = model

    def forward(
        self, x: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        # the ops of detector.score.elbo_score, plus the posterior mean for the neighbour term
        mu, logvar = self.model.encode(x)  # (B, latent) each
        reconstruction = self.model.nll(x, self.model.decode(mu))  # (B,)
        kl = self.model.kl(mu, logvar)  # (B,)
        return reconstruction + kl, reconstruction, kl, mu


def _has_onnxruntime() -> bool:
    return all(importlib.util.find_spec(m) is not None for m in ("onnx", "onnxruntime"))


def resolve_device(device: str | torch.device = "auto") -> torch.device:
    """``"auto"`` -> CUDA when available, else CPU; ``"cuda"`` without a GPU is an error."""
    if isinstance(device, torch.device):
        return device
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(
            f"device {device!r} was asked for, but no CUDA GPU is available "
            "(torch.cuda.is_available() is False); use --device cpu or auto"
        )
    if device != "cpu" and not device.startswith("cuda"):
        raise ConfigError(f"unknown device {device!r}; choose auto, cpu or cuda[:N]")
    return torch.device(device)


class Detector:
    """A trained VAE plus its calibration: scores, p-values and anomaly flags.

    Build one from an artifact with :meth:`load`, or from a freshly trained model with
    ``Detector(model, calibration, input_spec)``.
    """

    def __init__(
        self,
        model: VAE,
        calibration: Calibration | None,
        input_spec: InputSpec,
        *,
        model_version: str = "unsaved",
        metadata: dict[str, Any] | None = None,
        device: str | torch.device = "cpu",
        batch_size: int = DEFAULT_BATCH_SIZE,
        reference: npt.ArrayLike | torch.Tensor | None = None,
        runtime: str = "torch",
        head: TransformHead | None = None,
    ) -> None:
        if batch_size < 1:
            raise ConfigError(f"batch_size must be >= 1, got {batch_size}")
        self.device = resolve_device(device)
        if runtime not in RUNTIMES:
            raise ConfigError(f"unknown runtime {runtime!r}; choose one of {RUNTIMES}")
        if runtime == "onnxruntime" and self.device.type != "cpu":
            raise ConfigError("the onnxruntime runtime runs on the CPU; use --device cpu")
        if runtime == "auto":
            runtime = "onnxruntime" if self.device.type == "cpu" and _has_onnxruntime() else "torch"
        self.runtime = runtime
        self.model = model.to(self.device).eval()
        # The training rows in the neighbour term's space (detector.neighbours): (N, latent)
        # posterior means or (N, n_features) input features.
        self.reference: torch.Tensor | None = None
        if reference is not None:
            ref = torch.as_tensor(np.asarray(reference, dtype=np.float32))
            space = calibration.score_config.neighbour_space if calibration else None
            widths = sorted(reference_widths(model.config, space))
            if ref.ndim != 2 or ref.shape[1] not in widths or ref.shape[0] < 1:
                raise ConfigError(
                    f"neighbour reference must be (N >= 1, {' or '.join(map(str, widths))}), "
                    f"got {tuple(ref.shape)}"
                )
            self.reference = ref.to(self.device)
        self._search: dict[str, Search] = {}
        if calibration is not None and calibration.score_config.neighbour_weight > 0:
            n = 0 if self.reference is None else int(self.reference.shape[0])
            if n != calibration.n_reference:
                raise ConfigError(
                    f"the calibration's neighbour term needs {calibration.n_reference} reference "
                    f"rows, got {n}"
                )
        # the transformation head (detector.transforms): images, beside the VAE
        if head is not None and head.config.n_features != model.config.n_features:
            raise ConfigError(
                f"the transformation head takes {head.config.n_features} features, the model "
                f"{model.config.n_features}"
            )
        if head is None and calibration and calibration.score_config.transformation_weight:
            raise ConfigError("the calibration's transformation term needs the head; none given")
        self.head = head.to(self.device).eval() if head is not None else None
        self.calibration = calibration
        self._definition: tuple[ScoreConfig, str] | None = None
        self.input_spec = input_spec
        self.model_version = model_version
        self.metadata = metadata or {}
        self.batch_size = batch_size
        self._traced: torch.jit.ScriptModule | None = None
        self._onnx: Any = None  # detector.export.OnnxRuntimeScorer, built on first use

    @classmethod
    def load(
        cls,
        path: str | os.PathLike[str],
        *,
        device: str | torch.device = "cpu",
        batch_size: int = DEFAULT_BATCH_SIZE,
        runtime: str = "auto",
    ) -> Detector:
        """Verify (checksums) and load an artifact directory; ``runtime``: see ``RUNTIMES``
        (auto: ONNX Runtime on the CPU, torch on a GPU)."""
        dev = resolve_device(device)
        art = _artifact.load(path, device=dev)
        det = cls(
            art.model,
            art.calibration,
            art.input_spec,
            model_version=art.model_version,
            metadata={
                "path": str(art.path),
                "config": art.config,
                "metrics": art.metrics,
                "manifest": art.manifest,
            },
            device=dev,
            batch_size=batch_size,
            reference=art.reference,
            runtime=runtime,
            head=art.head,
        )
        det._probe(art.path)
        return det

    def _probe(self, path: Any) -> None:
        """Score two inputs from the middle of the input range: an artifact whose checksums
        verify but whose numbers cannot score (NaN weights that slipped through, a broken
        graph) is refused at load, not served."""
        lo, hi = self.input_spec.value_range or (0.0, 0.0)
        # a table's probe: rows of missing cells (zeros could lie beyond a column's bounds)
        mid = np.nan if self.input_spec.schema is not None else (lo + hi) / 2
        x = np.full((2, *self.input_spec.shape), mid, np.float32)
        try:
            parts = self.score_parts(x)
        except (RuntimeError, ValueError) as e:
            raise ArtifactIntegrityError(
                f"{path}: the model cannot score a probe input: {e}"
            ) from e
        if not np.isfinite(parts["score"]).all():
            raise ArtifactIntegrityError(f"{path}: the model scores a probe input as NaN")

    @property
    def threshold(self) -> float:
        return self.require_calibration().threshold

    @property
    def score_config(self) -> ScoreConfig:
        """The calibration's score settings; the plain -ELBO for an uncalibrated detector."""
        return self.calibration.score_config if self.calibration else ScoreConfig()

    @property
    def score_definition(self) -> str:
        cfg = self.score_config  # every response carries it: worded once per score config
        if self._definition is None or self._definition[0] is not cfg:
            m = self.model.config.members
            ensemble = f"; reconstruction and kl are the means of {m} VAEs' (a seed ensemble)"
            self._definition = (cfg, cfg.definition() + (ensemble if m > 1 else ""))
        return self._definition[1]

    def require_calibration(self) -> Calibration:
        """The calibration, or NotCalibratedError: what thresholds, p-values and flags need."""
        if self.calibration is None:
            raise NotCalibratedError(
                "this detector has no threshold yet; calibrate it on held-out normal data first"
            )
        return self.calibration

    def with_target_fpr(self, target_fpr: float) -> Detector:
        """A detector sharing this model, thresholded for another target FPR."""
        other = Detector(
            self.model,
            self.require_calibration().with_fpr(target_fpr),
            self.input_spec,
            model_version=self.model_version,
            metadata=self.metadata,
            device=self.device,
            batch_size=self.batch_size,
            reference=self.reference,
            runtime=self.runtime,
            head=self.head,
        )
        other._traced, other._onnx = self._traced, self._onnx  # same model, same graphs
        return other

    # -- scoring ----------------------------------------------------------------------------
    def score_parts(
        self, x: Any, *, config: ScoreConfig | None = None, name: str = "X"
    ) -> dict[str, npt.NDArray[np.float64]]:
        """Validate ``x``; return score, reconstruction, kl, complexity, neighbour,
        transformation (each (N,)). Higher = more anomalous.

        Needs no calibration: ``config`` defaults to the calibration's score settings
        (:attr:`score_config`). The ``neighbour`` part is computed whenever reference rows exist.
        ``name`` is what error messages call ``x``.
        """
        arr = validate_samples(x, self.input_spec, name=name)
        return self._score_array(arr, config or self.score_config)

    def score_validated(self, x: npt.NDArray[np.float32]) -> dict[str, npt.NDArray[np.float64]]:
        """Score parts of rows already shaped (N, *input_shape) by ``validate_samples``."""
        return self._score_array(x, self.score_config)

    def score(self, x: Any, *, name: str = "X") -> DetectionResult:
        """Validate ``x`` ((N, features) or (N, *shape)) and score it.

        Returns:
            DetectionResult: score (higher = more anomalous), reconstruction, kl, p_value (small =
            anomalous), is_anomaly (score > threshold), and the threshold used.
        """
        cal = self.require_calibration()
        return DetectionResult.from_parts(self.score_parts(x, name=name), cal)

    def predict(self, x: Any) -> npt.NDArray[np.bool_]:
        """True for anomalies (score > threshold)."""
        return self.score(x).is_anomaly

    @torch.no_grad()
    def reconstruct(self, x: Any) -> npt.NDArray[np.float32]:
        """Expected reconstruction at the posterior mean, shaped like the validated input."""
        arr = validate_samples(x, self.input_spec)
        return self._per_batch(
            arr, lambda xb: self.model.mean_prediction(self.model(xb)[0])
        ).reshape(arr.shape)

    @torch.no_grad()
    def encode(self, x: Any) -> npt.NDArray[np.float32]:
        """Posterior means E[z | x]: (N, code_dim)."""
        return self._per_batch(
            validate_samples(x, self.input_spec), lambda xb: self.model.encode(xb)[0]
        )

    @torch.no_grad()
    def input_features(self, x: Any) -> npt.NDArray[np.float32]:
        """The encoder's input, flat: (N, n_features) (the input-space neighbour term's rows)."""
        return self._per_batch(validate_samples(x, self.input_spec), self.model.input_features)

    def _per_batch(
        self, arr: npt.NDArray[np.float32], fn: Callable[[torch.Tensor], torch.Tensor]
    ) -> npt.NDArray[np.float32]:
        """``fn`` over ``arr`` in batches of ``batch_size`` (shaped as the model's input)."""
        shape = self.model.config.input_shape
        outs = []
        for start in range(0, arr.shape[0], self.batch_size):
            xb = torch.from_numpy(arr[start : start + self.batch_size]).to(self.device)
            outs.append(fn(xb.reshape(xb.shape[0], *shape)).float().cpu().numpy())
        return np.concatenate(outs)

    @torch.no_grad()
    def decode(self, z: npt.ArrayLike) -> npt.NDArray[np.float32]:
        """Expected samples decoded from latent codes ``z`` (N, code_dim: latent_dim, or an
        ensemble's members' blocks side by side), shaped like inputs."""
        zt = torch.as_tensor(np.asarray(z, dtype=np.float32), device=self.device)
        if zt.ndim != 2 or zt.shape[1] != self.model.config.code_dim:
            raise InputError(
                f"latent codes must be (N, {self.model.config.code_dim}), got {tuple(zt.shape)}"
            )
        out = self.model.mean_prediction(self.model.decode(zt)).float().cpu().numpy()
        return out.reshape(len(out), *self.input_spec.shape)

    def _elbo_graph(self) -> torch.jit.ScriptModule:
        """The ELBO score traced into one TorchScript graph: the same ops as ``elbo_score``, run
        in C++ without the GIL between them (faster when other Python threads are busy)."""
        if self._traced is None:
            example = torch.zeros(2, *self.model.config.input_shape, device=self.device)
            with warnings.catch_warnings(), torch.no_grad():
                warnings.simplefilter("ignore")  # TracerWarnings about Python ints in shapes
                self._traced = torch.jit.trace(ELBOGraph(self.model), example, check_trace=False)
        return self._traced

    def _score_array(
        self, arr: npt.NDArray[np.float32], config: ScoreConfig
    ) -> dict[str, npt.NDArray[np.float64]]:
        if config.neighbour_weight > 0 and self.reference is None:
            raise ConfigError("the neighbour term needs reference rows; this detector has none")
        parts = self._model_parts(
            arr, config.kind, config.samples, config.neighbour_k, config.neighbour_space
        )
        if config.reconstruction_weight != 1:  # the elbo score only (ScoreConfig)
            parts["score"] = config.reconstruction_weight * parts["reconstruction"] + parts["kl"]
        if config.complexity_weight:
            if self.input_spec.value_range is None:
                raise ConfigError(
                    "the complexity correction needs inputs with a known value range; this "
                    "model's input spec has none"
                )
            parts["complexity"] = complexity_nats(
                arr,
                self.input_spec.value_range,
                level=config.complexity_level,
                codec=config.complexity_codec,
                image_filter=config.complexity_filter,
                shape=self.input_spec.shape,
            )
            credit = parts["complexity"]
            if config.complexity_cap is not None:
                credit = np.minimum(credit, config.complexity_cap)
            if config.complexity_floor is not None:  # simpler than the normal data's range
                credit = credit - np.maximum(0.0, config.complexity_floor - parts["complexity"])
            parts["score"] = parts["score"] - config.complexity_weight * credit
        else:
            parts["complexity"] = np.zeros_like(parts["score"])
        if config.neighbour_weight:
            parts["score"] = parts["score"] + config.neighbour_weight * parts["neighbour"]
        if config.transformation_weight:
            if self.head is None:
                raise ConfigError("the transformation term needs the head; this detector has none")
            parts["score"] = parts["score"] + config.transformation_term(parts["transformation"])
        return parts

    def _model_parts(
        self,
        arr: npt.NDArray[np.float32],
        kind: str,
        samples: int,
        neighbour_k: int = DEFAULT_K,
        space: str = "latent",
    ) -> dict[str, npt.NDArray[np.float64]]:
        """The model's parts per row, and the neighbour distance when reference rows exist."""
        search = self.searcher(space)
        if self.runtime == "onnxruntime" and kind == "elbo":
            if self._onnx is None:
                from detector.export import OnnxRuntimeScorer

                self._onnx = OnnxRuntimeScorer(self)
            return self._onnx.parts(arr, self.batch_size, search, neighbour_k)
        with torch.inference_mode():  # (the ONNX path enters it for its neighbour search alone)
            chunks: list[ScoreParts] = []
            near: list[torch.Tensor] = []
            surprise: list[torch.Tensor] = []
            graph = self._elbo_graph() if kind == "elbo" else None
            shape = self.model.config.input_shape
            for start in range(0, arr.shape[0], self.batch_size):
                xb = torch.from_numpy(arr[start : start + self.batch_size]).to(self.device)
                xb = xb.reshape(xb.shape[0], *shape)
                mu: torch.Tensor | None = None
                if graph is not None:
                    score, reconstruction, kl, mu = graph(xb)
                    chunks.append(ScoreParts(score, reconstruction, kl))
                else:
                    chunks.append(score_batch(self.model, xb, kind, samples))
                    if search is not None and space == "latent":
                        mu = self.model.encode(xb)[0]
                if search is not None:
                    near.append(search.distance(self.model, xb, mu, neighbour_k))
                if self.head is not None:
                    surprise.append(self.head.nll(xb))
            out = {
                name: torch.cat([getattr(c, name) for c in chunks]).double().cpu().numpy()
                for name in ("score", "reconstruction", "kl")
            }
            for name, got in (("neighbour", near), ("transformation", surprise)):
                part = torch.cat(got).double().cpu().numpy() if got else np.zeros_like(out["score"])
                out[name] = part
            return out

    def searcher(self, space: str) -> Search | None:
        """The reference rows as a neighbour search in ``space``; None without reference rows."""
        if self.reference is None:
            return None
        if space not in self._search:
            self._search[space] = Search(self.reference, space)
        return self._search[space]

    def describe(self) -> dict[str, Any]:
        """Metadata for ``info`` and serving: version, input spec, threshold, provenance."""
        cal = self.calibration
        cfg = self.metadata.get("config", {})
        return {
            "model_version": self.model_version,
            "score_definition": self.score_definition,
            "reconstruction_weight": self.score_config.reconstruction_weight,
            "complexity_weight": self.score_config.complexity_weight,
            "complexity_cap": self.score_config.complexity_cap,
            "complexity_floor": self.score_config.complexity_floor,
            "neighbour_weight": self.score_config.neighbour_weight,
            "neighbour_space": self.score_config.neighbour_space,
            "transformation_weight": self.score_config.transformation_weight,
            "transformation_head": self.head.config.to_dict() if self.head is not None else None,
            "n_reference": 0 if self.reference is None else int(self.reference.shape[0]),
            "input": self.input_spec.to_dict(),
            "model": self.model.config.to_dict(),
            "threshold": cal.threshold if cal else None,
            "target_fpr": cal.target_fpr if cal else None,
            "score_kind": cal.score_config.kind if cal else None,
            "n_calibration": cal.n if cal else 0,
            "training": cfg.get("training", {}),
            "data": cfg.get("data", {}),
            "versions": cfg.get("versions", {}),
            "created_at": self.metadata.get("manifest", {}).get("created_at"),
        }
