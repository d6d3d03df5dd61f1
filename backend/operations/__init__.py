"""Operations (issue 5): alerts raised and cleared from ingested data, the monitor sweep, commands to
boxes, and the live feed of status changes.

Where it sits in a message's journey: beside ingest and the API. Ingest calls
:mod:`backend.operations.alerts` inside its batch transaction (so an alert is raised exactly once
with the rows that caused it) and runs :mod:`backend.operations.monitor` between batches; the API
sends commands with :mod:`backend.operations.commands` and relays :mod:`backend.operations.live`
notifications to browsers. See docs/operations.md.
"""
