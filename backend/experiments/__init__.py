"""What-if experiments over the API: researchers submit an experiment file, a worker runs it.

Where it sits: on top of the runner (:mod:`simulator.experiment`), beside the rest of the backend.
A job is a row of ``experiments`` (migration 0009) and a job of the procrastinate queue
(:mod:`backend.experiments.schema` installs its schema); ``molo worker`` takes jobs from the queue and
runs each in a child process (:mod:`backend.experiments.child`) that stores every replication in the
job's results folder as it ends, so a job cancelled, or whose worker died, keeps what finished and a
new worker resumes from it.

Modules: ``endpoints`` (``/api/v1/experiments``), ``service`` (checking, sizing and submitting a file,
cancelling, reading results), ``repository`` (the SQL), ``queue`` (the procrastinate app and task
name), ``worker`` (``molo worker``), ``child`` (one job's runner process), ``schema`` (the queue's
schema). docs/experiments.md, "Over the API".
"""
