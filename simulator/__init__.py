"""The simulator: the 50 Aalborg boxes and the people and vans around them, in SimPy.

Where it sits in a message's journey: at the very start. In live mode it drives
``firmware_stub`` boxes that publish over MQTT; in batch mode it runs the model alone. It is being
built under issue #3; until then ``molo demo`` drives stand-in boxes (``molo/fleet.py``).
"""
