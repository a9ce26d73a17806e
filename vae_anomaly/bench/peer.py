"""The bare endpoint ``vae-anomaly loadtest --peer`` compares the service with: what a user
writes in 20 lines around ``Detector.score`` (the library's defaults, FastAPI and uvicorn), run
as ``uvicorn vae_anomaly.bench.peer:app --workers N`` with ``PEER_MODEL_DIR`` set. No batching,
metrics, request ids, access log, p-values or validation beyond the detector's own."""

from __future__ import annotations

import os
from typing import Any

import numpy as np
from fastapi import FastAPI
from pydantic import BaseModel

from detector import Detector

detector = Detector.load(os.environ["PEER_MODEL_DIR"])
app = FastAPI()


class Instances(BaseModel):
    instances: list[Any]


@app.get("/readyz")
def ready() -> dict[str, str]:
    return {"status": "ready"}


@app.post("/score")
def score(body: Instances) -> dict[str, Any]:
    r = detector.score(np.asarray(body.instances, dtype=np.float32))
    return {
        "threshold": r.threshold,
        "results": [
            {"score": float(s), "is_anomaly": bool(a)}
            for s, a in zip(r.score, r.is_anomaly, strict=True)
        ],
    }
