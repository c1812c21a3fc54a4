import sys

from carecl.cli import main

sys.exit(main())
