"""``python -m jupyter_remote_provisioner …``: the same program as ``remote_kernel``."""

import sys

from .cli import main

sys.exit(main())
