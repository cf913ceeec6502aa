"""The management extension: its HTTP app, server, client, the serving stack, hot swap, rollback and purge.

Importing this package loads nothing heavy; import the submodules you need
(``tmu_core.service.app``, ``.server``, ``.client``, ``.stack``, ``.swap``, ``.rollback``).
"""
