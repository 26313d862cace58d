import sys

from kuas.cli import main

sys.exit(main())
