"""The forget pipeline, in the order a request travels through it.

``intake`` checks a request and resolves it against the training index and the versions' memberships;
``dispatcher`` claims queued jobs and starts a ``worker`` process per job; the worker runs ``pipeline`` (load,
unlearn, evaluate, save, package, register); ``commit`` is the point of no return (the new version becomes the
serving one in the state database), after which the job only goes forward (set default, drain, retire the old
version, delete derived copies, wipe the pixels); ``undo`` puts things back for a job that failed before its
commit. ``artifacts`` holds the per-version prepared state, ``report`` what a job measured.
"""
