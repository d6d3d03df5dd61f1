"""What couriers do with the boxes: find free capacity, hold a compartment, plan red-box pickups.

Where it sits in a message's journey: after ingest. Capacity is read from the latest state ingest
committed (``box_state``) minus the holds in ``reservations``; a hold goes back to the box as a
``reserve_compartment`` command over MQTT (``backend.operations.commands``), and the box's events
come back through ingest as always. Modelled on carrier locker APIs (GLS/NXT: compartment types
in mm, precise booking rejections such as ``LOCKER_IS_FULL``).
"""
