"""The training index: the samples a deployed model was trained on and its held-out test split.

Metadata lives in SQLite (``<root>/index.sqlite``), encoded image bytes in an append-only ``<root>/blobs.bin``.
Forgetting a sample tombstones it and zeroes its bytes for good.
"""

from tmu_core.index.ingest import ingest_digits, ingest_image_folder, ingest_zip
from tmu_core.index.records import ForgetResult, IndexInfo, SampleRecord, Tombstone, VerifyReport
from tmu_core.index.store import TrainingIndex

__all__ = [
    "ForgetResult",
    "IndexInfo",
    "SampleRecord",
    "Tombstone",
    "TrainingIndex",
    "VerifyReport",
    "ingest_digits",
    "ingest_image_folder",
    "ingest_zip",
]
