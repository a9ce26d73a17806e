"""Public tabular anomaly-detection sets for the benchmark, with their normal / anomaly rules.

Each set is a table of numeric features and a rule for which rows are anomalous, following the
conventions of ODDS (Rayana, 2016) and ADBench (Han et al., NeurIPS 2022): the minority or
"positive" class is the anomaly. Nothing is downloaded: scikit-learn ships breast cancer and wine,
and Debian's package ``r-cran-kernlab`` ships spam, musk and ticdata as R data files
(``/usr/lib/R/site-library/kernlab/data/*.rda``), read with ``pyreadr`` (no R needed).

Protocol (:func:`tabular_split`): a seeded 60 % of the normal rows is the training pool (the
detector splits it further into train / validation / calibration); the test set is the other 40 %
of the normal rows plus every anomalous row. Three split seeds per set in the benchmark.

Each set is read as a user's table would be (``detector.schema``): number columns numeric, R
factors (text) categorical, NA cells missing; the rows are encoded with the schema of the normal
rows (numbers as they are, one-hot blocks for categories, NaN for a missing cell). The
detector reads that natively; the baselines get the same rows with each missing cell set to its
column's mean over their fit rows, as a user's ``SimpleImputer`` would. The label column is
dropped.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import pyarrow as pa

from detector.errors import DataError
from detector.schema import TableSchema
from training.data import Split, split_normal

KERNLAB_DIR = Path("/usr/lib/R/site-library/kernlab/data")
ENV_KERNLAB_DIR = "VAE_ANOMALY_KERNLAB_DIR"


@dataclass
class TabularSet:
    """Normal and anomalous rows of one public table."""

    name: str
    x_normal: npt.NDArray[np.float32]  # (n_normal, d)
    x_anomalous: npt.NDArray[np.float32]  # (n_anomalous, d)
    features: list[str]
    rule: str  # which rows are anomalous, in words
    source: str
    provenance: dict[str, Any] = field(default_factory=dict)
    schema: TableSchema | None = None  # the normal rows' columns; x_* are encoded with it

    @property
    def n_features(self) -> int:
        return int(self.x_normal.shape[1])


@dataclass(frozen=True)
class _Entry:
    rule: str
    source: str
    load: Callable[[], TabularSet]


def _sklearn(name: str) -> TabularSet:
    from sklearn import datasets

    if name == "breast-cancer":
        b = datasets.load_breast_cancer()
        anomalous = b.target == 0  # 0 = malignant
    else:
        b = datasets.load_wine()
        anomalous = b.target == 0  # cultivar 1 (ODDS "wine": classes 2 and 3 are normal)
    names = [str(f) for f in b.feature_names]
    table = pa.table({n: np.asarray(b.data[:, j], np.float64) for j, n in enumerate(names)})
    source = TABULAR_SETS[name].source
    return _encoded(name, table, anomalous, names, {"dataset": name, "source": source})


def _encoded(
    name: str,
    table: pa.Table,
    anomalous: npt.NDArray[np.bool_],
    names: list[str],
    provenance: dict[str, Any],
) -> TabularSet:
    """Rows encoded with the schema of the normal rows (categories seen among them)."""
    normal = table.filter(pa.array(~anomalous))
    schema = TableSchema.infer(normal, source=name)
    x = schema.encode([table.column(c.name) for c in schema.columns]).x
    entry = TABULAR_SETS[name]
    return TabularSet(
        name, x[~anomalous], x[anomalous], names, entry.rule, entry.source, provenance, schema
    )


_KERNLAB: dict[str, tuple[str, str]] = {  # set -> (label column, anomalous label)
    "spam": ("type", "spam"),
    "musk": ("Class", "1"),
    "ticdata": ("CARAVAN", "insurance"),
    "income": ("INCOME", "-10.000)"),
}


def kernlab_dir() -> Path:
    env = os.environ.get(ENV_KERNLAB_DIR)
    return Path(env) if env else KERNLAB_DIR


def _kernlab(name: str) -> TabularSet:
    path = kernlab_dir() / f"{name}.rda"
    if not path.is_file():
        raise DataError(
            f"{path} not found: the {name} table comes from Debian's package r-cran-kernlab "
            f"(apt-get install r-cran-kernlab), or set ${ENV_KERNLAB_DIR} to a folder of its .rda "
            "files"
        )
    try:
        import pyreadr
    except ImportError:
        raise DataError(
            f"reading {path} needs pyreadr: pip install -e '.[bench]' (or pip install pyreadr)"
        ) from None
    try:
        frames = pyreadr.read_r(str(path))
    except Exception as e:  # pyreadr raises its own LibrdataError and friends
        raise DataError(f"cannot read {path}: {e}") from e
    df = next(iter(frames.values()))
    label, anomalous_value = _KERNLAB[name]
    if label not in df.columns:
        raise DataError(f"{path} has no label column {label!r}")
    anomalous = (df[label].astype(str) == anomalous_value).to_numpy()
    feats = df.drop(columns=[label])
    cols = {}
    for c in feats.columns:
        s = feats[c]
        if hasattr(s, "cat"):  # an R factor: its labels as text, NA missing
            cols[str(c)] = pa.array([None if v != v else str(v) for v in s.astype(object)])
        else:
            cols[str(c)] = pa.array(np.asarray(s, np.float64))
    return _encoded(
        name, pa.table(cols), anomalous, list(cols), {"dataset": name, "source": str(path)}
    )


TABULAR_SETS: dict[str, _Entry] = {
    "breast-cancer": _Entry(
        "malignant tumours are anomalous (212), benign normal (357); 30 features",
        "sklearn.datasets.load_breast_cancer (UCI WDBC)",
        lambda: _sklearn("breast-cancer"),
    ),
    "wine": _Entry(
        "cultivar 1 is anomalous (59), cultivars 2 and 3 normal (119); 13 features (as ODDS)",
        "sklearn.datasets.load_wine (UCI Wine)",
        lambda: _sklearn("wine"),
    ),
    "spam": _Entry(
        "spam is anomalous (1,813), non-spam normal (2,788); 57 features",
        "r-cran-kernlab spam.rda (UCI Spambase)",
        lambda: _kernlab("spam"),
    ),
    "musk": _Entry(
        "musk molecules are anomalous (207), non-musk normal (269); 166 features",
        "r-cran-kernlab musk.rda (UCI Musk, version 1)",
        lambda: _kernlab("musk"),
    ),
    "ticdata": _Entry(
        "caravan-insurance holders are anomalous (586), the rest normal (9,236); 85 features, "
        "62 of them categorical (R factors: customer type, percentage and amount bands)",
        "r-cran-kernlab ticdata.rda (UCI Insurance Company Benchmark, CoIL 2000)",
        lambda: _kernlab("ticdata"),
    ),
    "income": _Entry(
        "households with an income under 10,000 (mostly teenagers living with their family) are "
        "anomalous (1,745), the rest normal (7,248); 13 categorical features, 23.5 % of the "
        "rows with a missing cell",
        "r-cran-kernlab income.rda (Impact Resources' marketing survey, ESL's income data)",
        lambda: _kernlab("income"),
    ),
}


def load_tabular(name: str) -> TabularSet:
    """One of :data:`TABULAR_SETS` by name."""
    if name not in TABULAR_SETS:
        raise DataError(f"unknown tabular set {name!r}; choose one of {', '.join(TABULAR_SETS)}")
    return TABULAR_SETS[name].load()


def tabular_split(
    ts: TabularSet,
    *,
    seed: int,
    train_fraction: float = 0.6,
    cal_fraction: float = 0.1,
    val_fraction: float = 0.1,
) -> Split:
    """60 % of the normal rows to train on (split again into train / val / cal); the rest of the
    normal rows and every anomalous row to test (``y_test`` 1 = anomalous)."""
    n = ts.x_normal.shape[0]
    perm = np.random.default_rng(seed).permutation(n)
    n_pool = round(train_fraction * n)
    pool, rest = ts.x_normal[np.sort(perm[:n_pool])], ts.x_normal[np.sort(perm[n_pool:])]
    split = split_normal(pool, cal_fraction=cal_fraction, val_fraction=val_fraction, seed=seed)
    split.x_test = np.concatenate([rest, ts.x_anomalous])
    split.y_test = np.r_[np.zeros(len(rest)), np.ones(len(ts.x_anomalous))].astype(np.int64)
    split.info.update(
        dataset=ts.name,
        split_seed=seed,
        train_fraction=train_fraction,
        n_pool=int(n_pool),
        n_test=int(split.y_test.size),
        n_test_normal=len(rest),
        n_test_anomalous=len(ts.x_anomalous),
    )
    return split
