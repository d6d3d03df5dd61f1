"""Numbered SQL migrations (``NNNN_name.sql``), applied in order by :mod:`backend.migrate`.

A file may come in two variants, ``NNNN_name.postgres.sql`` and ``NNNN_name.timescale.sql``; the
runner applies the one for the database's flavour. A first line ``-- molo:no-transaction`` runs the
file statement by statement outside a transaction (TimescaleDB continuous aggregates need that).
"""
