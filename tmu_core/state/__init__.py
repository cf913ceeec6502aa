"""The state database (``<home>/state.sqlite``): model versions, forget jobs and the audit log.

:class:`tmu_core.state.store.StateStore` owns the file and its transactions; the tables are
``tmu_core.state.versions`` (every version with its training membership), ``tmu_core.state.jobs`` (the forget
queue) and ``tmu_core.state.audit`` (the hash-chained audit log).
"""
