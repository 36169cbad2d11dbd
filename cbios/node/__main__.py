import sys

from cbios.node.cli import main

sys.exit(main())
