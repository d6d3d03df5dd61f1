"""Avoided trips and CO2 from ingested events: the backend's side of the one method (``accounting``)."""
