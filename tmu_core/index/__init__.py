"""The training index: the samples a deployed model was trained on and its held-out test split.

Metadata lives in SQLite (``<root>/index.sqlite``), encoded image bytes in an append-only ``<root>/blobs.bin``,
the key that hides owner ids in tombstones in ``<root>/id.key``; the folder is 0700, its files 0600.
Forgetting a sample (of either split) tombstones it and zeroes its bytes for good; a rebuild keeps the
tombstones and never stores a forgotten image again.
"""

from tmu_core.index.carry import ForgottenFilter
from tmu_core.index.ingest import add_images, ingest_digits, ingest_image_folder, ingest_zip
from tmu_core.index.records import AddResult, BuildRecord, ForgetResult, IndexInfo, SampleRecord, Tombstone, VerifyReport
from tmu_core.index.store import TrainingIndex
from tmu_core.index.view import IndexView

__all__ = [
    "AddResult",
    "BuildRecord",
    "ForgetResult",
    "ForgottenFilter",
    "IndexInfo",
    "IndexView",
    "SampleRecord",
    "Tombstone",
    "TrainingIndex",
    "VerifyReport",
    "add_images",
    "ingest_digits",
    "ingest_image_folder",
    "ingest_zip",
]
