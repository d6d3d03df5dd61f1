"""``python -m firmware_stub``: run one box as its own process (see :mod:`firmware_stub.cli`)."""

from firmware_stub.cli import main

raise SystemExit(main())
