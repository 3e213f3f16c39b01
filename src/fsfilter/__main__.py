import sys

from fsfilter.cli import main

sys.exit(main())
