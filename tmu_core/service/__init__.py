"""Forget requests: version registry, audit log, job queue and worker, forget pipeline, the extension service.

Importing this package loads nothing heavy; import the submodules you need
(``tmu_core.service.registry``, ``.audit``, ``.jobs``, ``.pipeline``, ``.app``, ``.server``).
"""
