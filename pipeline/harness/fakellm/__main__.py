"""``python -m pipeline.harness.fakellm``: the fake model without the full CLI's imports."""

import sys

from pipeline.harness.fakellm.server import main

sys.exit(main())
