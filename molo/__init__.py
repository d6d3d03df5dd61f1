"""The command line on top of everything: ``molo <command>`` (see ``molo --help``).

It wires settings to the pieces below it (contract, firmware_stub, backend, simulator) and starts
whatever services the main job needs; nothing below imports it.
"""
