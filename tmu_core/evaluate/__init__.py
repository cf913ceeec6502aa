"""Evaluation: alignment metrics against the gold model and the protocol harness (table, JSON, CSV, PNG).

```python
from tmu_core.evaluate import builtin_protocol, customize, run_protocol, format_table
result = run_protocol(builtin_protocol("digits-tiny"), out_dir, device)
print(format_table(result))
```
"""

from tmu_core.evaluate.harness import run_protocol
from tmu_core.evaluate.metrics import (
    AttackResult,
    accuracy,
    activation_distance,
    correct_mask,
    delta,
    generalization_label_accuracy,
    loss_threshold_attack,
    sample_losses,
)
from tmu_core.evaluate.protocols import (
    DataSource,
    MethodSpec,
    Protocol,
    builtin_protocol,
    customize,
    default_methods,
    list_protocols,
    tmu_variants,
)
from tmu_core.evaluate.report import format_table, write_outputs
from tmu_core.evaluate.results import MethodResult, OriginalSummary, ProtocolResult, SplitSummary, mean_rows
from tmu_core.evaluate.sequential import run_sequential

__all__ = [
    "AttackResult",
    "DataSource",
    "MethodResult",
    "MethodSpec",
    "OriginalSummary",
    "Protocol",
    "ProtocolResult",
    "SplitSummary",
    "accuracy",
    "activation_distance",
    "builtin_protocol",
    "correct_mask",
    "customize",
    "default_methods",
    "delta",
    "format_table",
    "generalization_label_accuracy",
    "list_protocols",
    "loss_threshold_attack",
    "mean_rows",
    "run_protocol",
    "run_sequential",
    "sample_losses",
    "tmu_variants",
    "write_outputs",
]
