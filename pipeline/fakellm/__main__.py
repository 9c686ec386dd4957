"""``python -m pipeline.fakellm``: the fake model without the full CLI's imports."""

import sys

from pipeline.fakellm.server import main

sys.exit(main())
