import sys

from carecl.cli.main import main

sys.exit(main())
