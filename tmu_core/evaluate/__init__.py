"""Evaluation: alignment metrics against the gold model and the protocol harness (table, JSON, CSV, PNG).

```python
from tmu_core.evaluate import builtin_protocol, customize, run_protocol, format_table
result = run_protocol(builtin_protocol("digits-tiny"), out_dir, device)
print(format_table(result))
```

``customize(protocol, mia="lira", lira_shadows=8)`` adds the per-example LiRA membership test (``lira``) to every row.
"""

from tmu_core.evaluate.harness import run_protocol
from tmu_core.evaluate.lira import (
    LiraResult,
    ShadowStats,
    fit_shadow_stats,
    likelihood_ratio,
    logit_confidence,
    membership_test,
    shadow_membership,
)
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
from tmu_core.evaluate.results import (
    MethodResult,
    OriginalSummary,
    ProtocolResult,
    ShadowSummary,
    SplitSummary,
    mean_rows,
)
from tmu_core.evaluate.sequential import run_sequential

__all__ = [
    "AttackResult",
    "DataSource",
    "LiraResult",
    "MethodResult",
    "MethodSpec",
    "OriginalSummary",
    "Protocol",
    "ProtocolResult",
    "ShadowStats",
    "ShadowSummary",
    "SplitSummary",
    "accuracy",
    "activation_distance",
    "builtin_protocol",
    "correct_mask",
    "customize",
    "default_methods",
    "delta",
    "fit_shadow_stats",
    "format_table",
    "generalization_label_accuracy",
    "likelihood_ratio",
    "list_protocols",
    "logit_confidence",
    "loss_threshold_attack",
    "mean_rows",
    "membership_test",
    "run_protocol",
    "run_sequential",
    "sample_losses",
    "shadow_membership",
    "tmu_variants",
    "write_outputs",
]
