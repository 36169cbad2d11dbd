import sys

from cbios.node.manager import main

sys.exit(main())
