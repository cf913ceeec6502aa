"""Unlearning methods behind one interface: ``tmu`` and the baselines, looked up by name.

```python
from tmu_core.unlearn import UnlearnData, get_method
data = UnlearnData(index, forget_ids, retain_ids, twin_ids)
method = get_method("tmu", noise_std=8.0)
method.prepare(model, meta, data, device, workdir)        # once per model version
outcome = method.unlearn(model, meta, data, device, workdir)
```
"""

from tmu_core.unlearn.base import (
    UnlearnMethod,
    UnlearnOutcome,
    get_method,
    list_methods,
    parse_method_spec,
    register_method,
)
from tmu_core.unlearn.data import LazyImages, SampleSource, TensorSource, UnlearnData

# Importing the method modules registers them.
from tmu_core.unlearn import (  # noqa: F401  isort: skip
    bad_teacher, baselines, fisher, l1_sparse, neg_grad_plus, salun, scrub, tmu,
)
from tmu_core.unlearn.options import TmuOptions

__all__ = [
    "LazyImages",
    "SampleSource",
    "TensorSource",
    "TmuOptions",
    "UnlearnData",
    "UnlearnMethod",
    "UnlearnOutcome",
    "get_method",
    "list_methods",
    "parse_method_spec",
    "register_method",
]
