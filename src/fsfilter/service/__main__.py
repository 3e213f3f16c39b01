"""``python -m fsfilter.service``: fsfilterd."""

import sys

from fsfilter.service.daemon import main

sys.exit(main())
