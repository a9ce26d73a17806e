"""Offline batch scoring of files: NPY, CSV and Parquet in, CSV or Parquet out, streamed in chunks.

``score_files(detector, inputs, output, options)`` reads each input in chunks of rows, scores each
chunk and appends it to the output, so peak memory depends on the chunk size, not on the files'
sizes. The output (and the rejects file and the JSON summary beside it) is written to a temporary
file and renamed into place only when the run completes: an interrupted or failed run leaves no
file at the output path.

Rows are numbered from 0 within their file (the header line of a CSV file does not count; blank
lines are skipped). Errors name the file and its line (CSV: 1-based line of the file, header
included) or row (NPY, Parquet). A malformed row stops the run, unless ``on_error="skip"``: then it
goes to the rejects file (source, line or row, reason) and the run goes on.

The feature columns of a CSV or Parquet file: every column except the id column and the
pass-through columns. A file with exactly one column more than the model's features (the common
MNIST layout ``label, pixel0..pixel783``) has its first column passed through as its label.

The package: ``options`` (BatchOptions, Block, Summary), ``files`` (inputs and the output's
side files), ``readers`` (NPY, Parquet, CSV; the row checks; the rejects file), ``writer``
(scored rows to CSV or Parquet), ``run`` (``score_files``) and ``ray_engine`` (the same on Ray
Data, ``score_files_ray``).
"""

from serving.batch.files import check_output, expand_inputs, side_files
from serving.batch.options import (
    DEFAULT_CHUNK_ROWS,
    INPUT_SUFFIXES,
    OUTPUT_SUFFIXES,
    RESULT_COLUMNS,
    BatchOptions,
    Block,
    RowError,
    Summary,
)
from serving.batch.readers import Rejects, read_blocks, read_npy
from serving.batch.run import drift_files, peak_rss_mb, score_files
from serving.batch.writer import Writer, score_block

__all__ = [
    "DEFAULT_CHUNK_ROWS",
    "INPUT_SUFFIXES",
    "OUTPUT_SUFFIXES",
    "RESULT_COLUMNS",
    "BatchOptions",
    "Block",
    "Rejects",
    "RowError",
    "Summary",
    "Writer",
    "check_output",
    "drift_files",
    "expand_inputs",
    "peak_rss_mb",
    "read_blocks",
    "read_npy",
    "score_block",
    "score_files",
    "side_files",
]
